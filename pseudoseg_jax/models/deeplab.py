"""DeepLabv3+ with an image-level classification head (SPEC section 1), in Flax NNX.

  backbone: stage4  -> ASPP -> upsample to stride 4 --+
            stride4 -> 1x1 projection (48) -----------+-> concat -> 2 x 3x3 conv -> 1x1 logits
            stage4  -> global average pool -> dropout -> linear (num_classes - 1): cls_logits
  The 3x3 convs of the ASPP and the decoder are dense, or with `separable_heads` DeepLab's split
  separable convs (`SeparableConvBN`): about 3.0 M ASPP and 0.17 M decoder parameters instead of
  15.5 M and 1.3 M on Xception-65 / ResNet (2048-channel) features.
  SGCHead: parameters of self-attention Grad-CAM; the PseudoSeg loss applies them with
           pseudo_labels.sgc_logits to the features and CAMs it chooses (see steps.py)

All resizes are bilinear with align_corners=True. Dropout draws from the `rngs` given at call time,
never from RNG state stored in the module, so the model can be split into pure dicts of params /
batch stats and merged back inside jax.jit (see tests/test_models.py).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pseudoseg_jax.models import conv
from pseudoseg_jax.models.normalization import from_signed_unit
from pseudoseg_jax.models.resize import resize_bilinear
from pseudoseg_jax.models.resnet import ConvBN, NormConfig, ResNet, batch_norm, conv2d

# DeepLab initialises its logits layers with a small normal (stddev 0.01) so training starts near
# uniform predictions.
logits_init = nnx.initializers.normal(stddev=0.01)
classifier_init = nnx.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
# DeepLab's split_separable_conv2d (wss third_party/deeplab/core/utils.py:61-107): truncated normal
# stddev 0.33 for the depthwise kernel (utils.py:66,96-97), 0.06 for the pointwise one
# (utils.py:67,104-105); TF's truncated normal, like JAX's, redraws beyond 2 stddev, unrescaled.
separable_depthwise_init = nnx.initializers.truncated_normal(stddev=0.33)
separable_pointwise_init = nnx.initializers.truncated_normal(stddev=0.06)
# DeepLab's own heads also keep slim's default initializer (Glorot uniform) for their dense 1x1
# convs, whose arg_scopes set none (wss core/model.py:467-474, 727-734), and draw the logits from
# a truncated normal of stddev 0.01 (core/model.py:927-931).
deeplab_dense_init = nnx.initializers.glorot_uniform()
deeplab_logits_init = nnx.initializers.truncated_normal(stddev=0.01)


class SeparableConvBN(nnx.Module):
  """DeepLab's split_separable_conv2d, its ASPP and decoder 3x3 conv (wss core/model.py:541-547,
  861-873): a depthwise 3x3 conv (atrous `dilation`) + BN + ReLU, then a pointwise 1x1 conv + BN +
  ReLU, no biases (slim drops them under a normalizer_fn, core/model.py:467-471, 727-731).

  The depthwise kernel sits in `conv_depthwise`: steps.weight_decay_mask leaves names ending in
  '_depthwise' unregularized, as DeepLab does (weights_regularizer=None, utils.py:98); the pointwise
  kernel is decayed (utils.py:106).
  """

  def __init__(self, in_features: int, out_features: int, *, dilation: int = 1,
               norm: NormConfig, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    layer = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # 'SAME' for a stride-1 3x3 conv is the symmetric padding `dilation`.
    self.conv_depthwise = nnx.Conv(
        in_features, in_features, (3, 3), padding=((dilation, dilation), (dilation, dilation)),
        kernel_dilation=dilation, feature_group_count=in_features, use_bias=False,
        kernel_init=separable_depthwise_init, conv_general_dilated=conv.conv_general_dilated,
        **layer)
    self.bn_depthwise = batch_norm(in_features, norm, **layer)
    self.conv_pointwise = conv2d(in_features, out_features, 1,
                                 kernel_init=separable_pointwise_init, **layer)
    self.bn_pointwise = batch_norm(out_features, norm, **layer)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    use_running_average = not train
    x = nnx.relu(self.bn_depthwise(self.conv_depthwise(x), use_running_average=use_running_average))
    return nnx.relu(self.bn_pointwise(self.conv_pointwise(x),
                                      use_running_average=use_running_average))


def conv3x3_bn_relu(in_features: int, out_features: int, *, separable: bool, dilation: int = 1,
                    **layer) -> ConvBN | SeparableConvBN:
  """A head's 3x3 conv + BN + ReLU: dense, or DeepLab's split separable conv."""
  if separable:
    return SeparableConvBN(in_features, out_features, dilation=dilation, **layer)
  return ConvBN(in_features, out_features, 3, dilation=dilation, **layer)


class ASPP(nnx.Module):
  """Atrous spatial pyramid pooling: image pooling + 1x1 + atrous 3x3 branches, 1x1 projection."""

  def __init__(self, in_features: int, channels: int, rates: Sequence[int], *, dropout: float,
               separable: bool = False, norm: NormConfig, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    layer = dict(norm=norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dense = dict(layer, kernel_init=deeplab_dense_init) if separable else layer
    self.image_pooling = ConvBN(in_features, channels, 1, **dense)
    self.conv_1x1 = ConvBN(in_features, channels, 1, **dense)
    self.atrous = nnx.List([
        conv3x3_bn_relu(in_features, channels, separable=separable, dilation=rate, **layer)
        for rate in rates])
    self.projection = ConvBN((2 + len(rates)) * channels, channels, 1, **dense)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    pooled = self.image_pooling(jnp.mean(x, axis=(1, 2), keepdims=True), train=train)
    # Bilinear (align_corners) resizing of a 1x1 map is exactly a broadcast.
    pooled = jnp.broadcast_to(pooled, x.shape[:3] + pooled.shape[3:])
    branches = [pooled, self.conv_1x1(x, train=train)]
    branches += [branch(x, train=train) for branch in self.atrous]
    y = self.projection(jnp.concatenate(branches, axis=-1), train=train)
    return self.dropout(y, deterministic=not train, rngs=rngs)


class Decoder(nnx.Module):
  """DeepLabv3+ decoder: fuse the upsampled ASPP output with the projected stride-4 feature."""

  def __init__(self, aspp_features: int, low_level_in: int, *, low_level_channels: int,
               channels: int, num_classes: int, separable: bool = False, norm: NormConfig,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    layer = dict(norm=norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    dense = dict(layer, kernel_init=deeplab_dense_init) if separable else layer
    self.low_level_projection = ConvBN(low_level_in, low_level_channels, 1, **dense)
    self.fuse = nnx.List([
        conv3x3_bn_relu(aspp_features + low_level_channels, channels, separable=separable,
                        **layer),
        conv3x3_bn_relu(channels, channels, separable=separable, **layer)])
    self.logits = conv2d(channels, num_classes, 1, use_bias=True,
                         kernel_init=deeplab_logits_init if separable else logits_init,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, aspp_out: jax.Array, low_level: jax.Array, *, train: bool) -> jax.Array:
    low_level = self.low_level_projection(low_level, train=train)
    aspp_out = resize_bilinear(aspp_out, low_level.shape[1:3])
    x = jnp.concatenate([aspp_out, low_level], axis=-1)
    for layer in self.fuse:
      x = layer(x, train=train)
    return self.logits(x)


class ClassificationHead(nnx.Module):
  """Image-level multi-label classifier: global average pool -> dropout -> linear, one output per
  foreground class (background excluded)."""

  def __init__(self, in_features: int, num_outputs: int, *, dropout: float,
               init_stddev: float = 0.0, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dropout = nnx.Dropout(dropout)
    # The original's head inherits the backbone's initializer, not the decoder's small logits init;
    # its spread matters because the first image labels PseudoSeg predicts are
    # sigmoid(cls_logits) >= 0.5. init_stddev 0: slim's variance_scaling_initializer (truncated
    # normal, fan-in, scale 2), ResNet's arg scope; > 0: a truncated normal of that stddev,
    # Xception's 0.09 (wss third_party/deeplab/core/xception.py:504-505 under 928-931).
    kernel_init = (nnx.initializers.truncated_normal(stddev=init_stddev) if init_stddev > 0
                   else classifier_init)
    self.linear = nnx.Linear(in_features, num_outputs, kernel_init=kernel_init, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)

  def __call__(self, features: jax.Array, *, train: bool, rngs: nnx.Rngs | None) -> jax.Array:
    pooled = jnp.mean(features, axis=(1, 2))
    return self.linear(self.dropout(pooled, deterministic=not train, rngs=rngs))


class SGCHead(nnx.Module):
  """Parameters of the self-attention Grad-CAM head (SPEC 3): key and query 1x1 projections of the
  hypercolumn to `attention_dim`, a 1x1 conv num_classes -> num_classes, and the offset of its
  center-only norm. No biases. The arithmetic is `pseudo_labels.sgc_logits`.

  Kernels start as slim's default (Glorot uniform), the original's initializer for these layers.
  The center-only norm always uses batch statistics; `norm_group_size` (model.bn_group_size, 0 =
  the whole batch) groups them like every other BatchNorm of the model, as the original's
  per-replica SGC norm did. A static setting, not a parameter.
  """

  def __init__(self, hypercolumn_features: int, num_classes: int, *, attention_dim: int,
               norm_group_size: int = 0, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.norm_group_size = norm_group_size
    init = nnx.initializers.glorot_uniform()
    self.key = nnx.Param(init(rngs.params(), (hypercolumn_features, attention_dim), param_dtype))
    self.query = nnx.Param(init(rngs.params(), (hypercolumn_features, attention_dim),
                                param_dtype))
    self.mix = nnx.Param(init(rngs.params(), (num_classes, num_classes), param_dtype))
    self.offset = nnx.Param(jnp.zeros((num_classes,), param_dtype))

  def params(self) -> dict:
    """The arrays `pseudo_labels.sgc_logits` takes."""
    return {"key": self.key[...], "query": self.query[...], "mix": self.mix[...],
            "offset": self.offset[...]}


def drop_channels(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  """Channel-wise dropout of NHWC `x` (PyTorch's Dropout2d): one keep draw per image and channel."""
  keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0], 1, 1, x.shape[-1]))
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class DeepLabV3Plus(nnx.Module):
  """DeepLabv3+ segmentation model with a classification head.

  __call__(images, *, train, rngs=None) takes NHWC images normalized as x / 127.5 - 1 (converted
  to `input_normalization`, what the backbone's weights expect, inside) and returns
    'logits':     [N, ceil(H/4), ceil(W/4), num_classes] at decoder (stride-4) resolution, float32;
    'cls_logits': [N, num_classes - 1], float32;
    'features':   the backbone's dict ('stride4', 'stage2', 'stage3', 'stage4'), compute dtype.
  train=True uses batch statistics (and updates the running ones) and dropout, which needs `rngs`;
  with norm.group_size G > 0 (model.bn_group_size) the statistics are per group of G consecutive
  images, and G must divide the batch. `head_norm` (default `norm`) is the ASPP's and the decoder's:
  DeepLab's heads use decay 0.9997 whatever the backbone (wss core/model.py:457-462, 702-707).
  `separable_heads`: DeepLab's own heads: split separable 3x3 convs in the ASPP and decoder, and
  its initializers for their 1x1 convs and the logits;
  `cls_init_stddev`: see ClassificationHead.
  """

  def __init__(self, backbone: ResNet, num_classes: int, *, aspp_rates: Sequence[int],
               aspp_channels: int = 256, decoder_channels: int = 256,
               low_level_channels: int = 48, aspp_dropout: float = 0.1, cls_dropout: float = 0.5,
               sgc_attention_dim: int = 128, norm: NormConfig = NormConfig(),
               head_norm: NormConfig | None = None, separable_heads: bool = False,
               cls_init_stddev: float = 0.0, input_normalization: str = "signed_unit",
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    layer = dict(norm=head_norm or norm, separable=separable_heads, dtype=dtype,
                 param_dtype=param_dtype, rngs=rngs)
    self.input_normalization = input_normalization
    self.backbone = backbone
    self.aspp = ASPP(backbone.out_features["stage4"], aspp_channels, aspp_rates,
                     dropout=aspp_dropout, **layer)
    self.decoder = Decoder(aspp_channels, backbone.out_features["stride4"],
                           low_level_channels=low_level_channels, channels=decoder_channels,
                           num_classes=num_classes, **layer)
    self.cls_head = ClassificationHead(backbone.out_features["stage4"], num_classes - 1,
                                       dropout=cls_dropout, init_stddev=cls_init_stddev,
                                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # Hypercolumn of the last two stages, as the original's strides (15, 16).
    self.sgc = SGCHead(backbone.out_features["stage3"] + backbone.out_features["stage4"],
                       num_classes, attention_dim=sgc_attention_dim,
                       norm_group_size=norm.group_size, param_dtype=param_dtype, rngs=rngs)
    self.uses_dropout = aspp_dropout > 0 or cls_dropout > 0

  def __call__(self, images: jax.Array, *, train: bool, rngs: nnx.Rngs | None = None,
               feature_dropout: float = 0.0) -> dict[str, jax.Array | dict[str, jax.Array]]:
    """`feature_dropout` > 0 drops whole channels of the features the heads read (see heads)."""
    if train and self.uses_dropout and rngs is None:
      raise ValueError("DeepLabV3Plus(train=True) needs `rngs` (with a 'dropout' or 'default' "
                       "stream) for dropout.")
    features = self.backbone_features(images, train=train)
    return {**self.heads(features, train=train, rngs=rngs, feature_dropout=feature_dropout),
            "features": features}

  def heads(self, features: dict[str, jax.Array], *, train: bool, rngs: nnx.Rngs | None,
            feature_dropout: float = 0.0) -> dict[str, jax.Array]:
    """'logits' and 'cls_logits' of backbone features. With `feature_dropout` p > 0 each image's
    low-level and last-stage channels are zeroed with probability p (the rest scaled by 1 / (1 - p)):
    UniMatch's feature perturbation, drawn from `rngs`."""
    if feature_dropout > 0:
      dropped = {name: drop_channels(features[name], feature_dropout, rngs.dropout())
                 for name in ("stride4", "stage4")}
      features = {**features, **dropped}
    aspp_out = self.aspp(features["stage4"], train=train, rngs=rngs)
    logits = self.decoder(aspp_out, features["stride4"], train=train)
    cls_logits = self.cls_head(features["stage4"], train=train, rngs=rngs)
    # Losses and pseudo labels want float32 even when the network computes in bfloat16.
    return {"logits": logits.astype(jnp.float32), "cls_logits": cls_logits.astype(jnp.float32)}

  def backbone_features(self, images: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """The backbone's features of canonical images (x / 127.5 - 1), converted first to the input
    its weights expect (models/normalization.py)."""
    return self.backbone(from_signed_unit(images, self.input_normalization), train=train)
