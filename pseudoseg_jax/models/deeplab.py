"""DeepLabv3+ with an image-level classification head (SPEC section 1), in Flax NNX.

  backbone: stage4  -> ASPP -> upsample to stride 4 --+
            stride4 -> 1x1 projection (48) -----------+-> concat -> 2 x 3x3 conv -> 1x1 logits
            stage4  -> global average pool -> dropout -> linear (num_classes - 1): cls_logits
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

from pseudoseg_jax.models.normalization import from_signed_unit
from pseudoseg_jax.models.resize import resize_bilinear
from pseudoseg_jax.models.resnet import ConvBN, NormConfig, ResNet, conv2d

# DeepLab initialises its logits layers with a small normal (stddev 0.01) so training starts near
# uniform predictions.
logits_init = nnx.initializers.normal(stddev=0.01)
classifier_init = nnx.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")


class ASPP(nnx.Module):
  """Atrous spatial pyramid pooling: image pooling + 1x1 + atrous 3x3 branches, 1x1 projection."""

  def __init__(self, in_features: int, channels: int, rates: Sequence[int], *, dropout: float,
               norm: NormConfig, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    layer = dict(norm=norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.image_pooling = ConvBN(in_features, channels, 1, **layer)
    self.conv_1x1 = ConvBN(in_features, channels, 1, **layer)
    self.atrous = nnx.List([ConvBN(in_features, channels, 3, dilation=rate, **layer)
                            for rate in rates])
    self.projection = ConvBN((2 + len(rates)) * channels, channels, 1, **layer)
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
               channels: int, num_classes: int, norm: NormConfig, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    layer = dict(norm=norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.low_level_projection = ConvBN(low_level_in, low_level_channels, 1, **layer)
    self.fuse = nnx.List([ConvBN(aspp_features + low_level_channels, channels, 3, **layer),
                          ConvBN(channels, channels, 3, **layer)])
    self.logits = conv2d(channels, num_classes, 1, use_bias=True, kernel_init=logits_init,
                         dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, aspp_out: jax.Array, low_level: jax.Array, *, train: bool) -> jax.Array:
    low_level = self.low_level_projection(low_level, train=train)
    aspp_out = resize_bilinear(aspp_out, low_level.shape[1:3])
    x = jnp.concatenate([aspp_out, low_level], axis=-1)
    for conv in self.fuse:
      x = conv(x, train=train)
    return self.logits(x)


class ClassificationHead(nnx.Module):
  """Image-level multi-label classifier: global average pool -> dropout -> linear, one output per
  foreground class (background excluded)."""

  def __init__(self, in_features: int, num_outputs: int, *, dropout: float, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.dropout = nnx.Dropout(dropout)
    # The original's head inherits the backbone's initializer (slim's variance_scaling_initializer:
    # truncated normal, fan-in, scale 2), not the decoder's small logits init; its spread matters
    # because the first image labels PseudoSeg predicts are sigmoid(cls_logits) >= 0.5.
    self.linear = nnx.Linear(in_features, num_outputs, kernel_init=classifier_init, dtype=dtype,
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


class DeepLabV3Plus(nnx.Module):
  """DeepLabv3+ segmentation model with a classification head.

  __call__(images, *, train, rngs=None) takes NHWC images normalized as x / 127.5 - 1 (converted
  to `input_normalization`, what the backbone's weights expect, inside) and returns
    'logits':     [N, ceil(H/4), ceil(W/4), num_classes] at decoder (stride-4) resolution, float32;
    'cls_logits': [N, num_classes - 1], float32;
    'features':   the backbone's dict ('stride4', 'stage2', 'stage3', 'stage4'), compute dtype.
  train=True uses batch statistics (and updates the running ones) and dropout, which needs `rngs`;
  with norm.group_size G > 0 (model.bn_group_size) the statistics are per group of G consecutive
  images, and G must divide the batch.
  """

  def __init__(self, backbone: ResNet, num_classes: int, *, aspp_rates: Sequence[int],
               aspp_channels: int = 256, decoder_channels: int = 256,
               low_level_channels: int = 48, aspp_dropout: float = 0.1, cls_dropout: float = 0.5,
               sgc_attention_dim: int = 128, norm: NormConfig = NormConfig(),
               input_normalization: str = "signed_unit", dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    layer = dict(norm=norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.input_normalization = input_normalization
    self.backbone = backbone
    self.aspp = ASPP(backbone.out_features["stage4"], aspp_channels, aspp_rates,
                     dropout=aspp_dropout, **layer)
    self.decoder = Decoder(aspp_channels, backbone.out_features["stride4"],
                           low_level_channels=low_level_channels, channels=decoder_channels,
                           num_classes=num_classes, **layer)
    self.cls_head = ClassificationHead(backbone.out_features["stage4"], num_classes - 1,
                                       dropout=cls_dropout, dtype=dtype, param_dtype=param_dtype,
                                       rngs=rngs)
    # Hypercolumn of the last two stages, as the original's strides (15, 16).
    self.sgc = SGCHead(backbone.out_features["stage3"] + backbone.out_features["stage4"],
                       num_classes, attention_dim=sgc_attention_dim,
                       norm_group_size=norm.group_size, param_dtype=param_dtype, rngs=rngs)
    self.uses_dropout = aspp_dropout > 0 or cls_dropout > 0

  def __call__(self, images: jax.Array, *, train: bool,
               rngs: nnx.Rngs | None = None) -> dict[str, jax.Array | dict[str, jax.Array]]:
    if train and self.uses_dropout and rngs is None:
      raise ValueError("DeepLabV3Plus(train=True) needs `rngs` (with a 'dropout' or 'default' "
                       "stream) for dropout.")
    features = self.backbone_features(images, train=train)
    aspp_out = self.aspp(features["stage4"], train=train, rngs=rngs)
    logits = self.decoder(aspp_out, features["stride4"], train=train)
    cls_logits = self.cls_head(features["stage4"], train=train, rngs=rngs)
    # Losses and pseudo labels want float32 even when the network computes in bfloat16.
    return {"logits": logits.astype(jnp.float32), "cls_logits": cls_logits.astype(jnp.float32),
            "features": features}

  def backbone_features(self, images: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """The backbone's features of canonical images (x / 127.5 - 1), converted first to the input
    its weights expect (models/normalization.py)."""
    return self.backbone(from_signed_unit(images, self.input_normalization), train=train)
