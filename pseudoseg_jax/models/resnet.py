"""ResNet-50/101 backbones (torchvision or Keras layout), a tiny ResNet for tests and demos (NNX).

The default layout ("torchvision") follows torchvision so that its weights load with identical
activations:
  - stem: 7x7/2 conv + BN + ReLU, or the "deep stem" of the PyTorch peers (UniMatch, CPS, U2PL):
    3x3/2 conv 64 + BN + ReLU, 3x3 conv 64 + BN + ReLU, 3x3 conv 128, then BN + ReLU;
    then 3x3/2 max pool.
  - bottleneck blocks, stride on the 3x3 conv (ResNet v1.5), 1x1 conv + BN projection shortcut.
  - output stride 16 / 8 by trading the stride of the last one / two stages for dilation, with
    torchvision's replace_stride_with_dilation rule (see `stage_layouts`).
  - explicit symmetric padding dilation * (k - 1) // 2 (PyTorch), never 'SAME': for even inputs
    'SAME' pads bottom/right only and shifts every feature by half a pixel relative to torchvision.

The "keras" variant is Keras applications' ResNet v1 (keras.applications.ResNet50/101), so that
its ImageNet .h5 loads with identical activations (see `VARIANTS`): the stride sits on the FIRST 1x1
conv of a block (and on the projection), every conv has a bias, and BN uses epsilon 1.001e-5 (set
through config.model.bn_epsilon; the converter checks it). Keras's explicit ZeroPadding2D(3) before
the 'valid' 7x7/2 stem conv and its 'same' 3x3 stride-1 convs are the same symmetric padding as
ours; its ZeroPadding2D(1) + 'valid' 3x3/2 max pool equals our -inf padded pool because the pool
follows a ReLU (inputs >= 0). A stage dilated for output stride 16 / 8 gives its 1x1 stride 1 and
its 3x3 the dilation, by the same rule. There is no Keras deep stem.

Parameter names mirror torchvision; the Keras variant uses the same ones plus each conv's 'bias':
conv1, bn1, layer1[0].conv1/bn1/conv2/bn2/conv3/bn3, layer1[0].downsample.conv/.bn (torchvision:
downsample.0/.1; Keras: conv2_block1_1_conv ... conv2_block1_0_conv, see convert/keras_resnet.py).
Deep stem (UniMatch names in brackets): stem_conv1 [conv1.0], stem_bn1 [conv1.1],
stem_conv2 [conv1.3], stem_bn2 [conv1.4], stem_conv3 [conv1.6], then bn1 [bn1]. There is no
ImageNet fc layer.

Every batch norm of the models (here, in xception.py and deeplab.py) is `GhostBatchNorm`:
nnx.BatchNorm, with training statistics per group of config.model.bn_group_size images when > 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from pseudoseg_jax.models import conv

# torchvision initialises convs with kaiming_normal_(mode='fan_out', nonlinearity='relu').
he_normal_fan_out = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
  """Depth and widths of a bottleneck ResNet."""
  blocks_per_stage: tuple[int, int, int, int]
  stem_channels: int  # 7x7 stem output; the deep stem uses (w, w, 2w).
  bottleneck_widths: tuple[int, int, int, int]  # Stage output = 4 x width.


RESNET_SPECS = {
    "resnet50": ResNetSpec((3, 4, 6, 3), 64, (64, 128, 256, 512)),
    "resnet101": ResNetSpec((3, 4, 23, 3), 64, (64, 128, 256, 512)),
    # One block per stage, 1/4 of the widths: stage outputs 64/128/256/512. The head dominates the
    # cost: a train step on 16 97x97 crops took ~0.35 s with aspp/decoder_channels 64 (~0.26 s with
    # 32, ~1.6 s with the default 256) on 2 busy CPU cores.
    "resnet_tiny": ResNetSpec((1, 1, 1, 1), 16, (16, 32, 64, 128)),
}
EXPANSION = 4


@dataclasses.dataclass(frozen=True)
class Variant:
  """Where a bottleneck puts its stride, and whether convs carry biases."""
  stride_on_first_1x1: bool  # False: on the 3x3 (v1.5, torchvision); True: on the first 1x1 (v1).
  conv_bias: bool


VARIANTS = {
    "torchvision": Variant(stride_on_first_1x1=False, conv_bias=False),
    "keras": Variant(stride_on_first_1x1=True, conv_bias=True),
}


@dataclasses.dataclass(frozen=True)
class NormConfig:
  """BatchNorm settings, flax convention: running = momentum * running + (1 - momentum) * batch.

  group_size (config.model.bn_group_size): 0 = statistics of the whole batch of each forward pass
  (global under jit); G > 0 = statistics of each group of G consecutive images (GhostBatchNorm).
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  group_size: int = 0


@dataclasses.dataclass(frozen=True)
class StageLayout:
  stride: int
  first_block_dilation: int
  dilation: int  # Of the remaining blocks.


def stage_layouts(output_stride: int) -> tuple[StageLayout, ...]:
  """Stride and dilations of the four stages, torchvision's replace_stride_with_dilation rule.

  A dilated stage keeps stride 1 and multiplies the running dilation by 2, but its first block still
  uses the previous dilation (torchvision's `previous_dilation`). OS 16: stage 4 = (1, 1, 2);
  OS 8: stage 3 = (1, 1, 2), stage 4 = (1, 2, 4).
  """
  dilated_stages = {32: (), 16: (4,), 8: (3, 4)}
  if output_stride not in dilated_stages:
    raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}.")
  layouts = [StageLayout(stride=1, first_block_dilation=1, dilation=1)]
  dilation = 1
  for stage in (2, 3, 4):
    previous_dilation = dilation
    if stage in dilated_stages[output_stride]:
      dilation *= 2
      layouts.append(StageLayout(1, previous_dilation, dilation))
    else:
      layouts.append(StageLayout(2, previous_dilation, dilation))
  return tuple(layouts)


def conv2d(in_features: int, out_features: int, kernel_size: int, *, stride: int = 1,
           dilation: int = 1, use_bias: bool = False, kernel_init=he_normal_fan_out,
           dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
  """Conv with PyTorch's symmetric padding dilation * (k - 1) // 2 on each side."""
  pad = dilation * (kernel_size - 1) // 2
  return nnx.Conv(in_features, out_features, (kernel_size, kernel_size), strides=stride,
                  padding=((pad, pad), (pad, pad)), kernel_dilation=dilation, use_bias=use_bias,
                  kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype,
                  conv_general_dilated=conv.conv_general_dilated, rngs=rngs)


def image_groups(x: jax.Array, group_size: int) -> jax.Array:
  """[N, ...] -> [N / G, G, ...], groups of G consecutive images; G = 0 is one group of all N."""
  batch_size = x.shape[0]
  size = group_size or batch_size
  if not _is_group_size(group_size) or batch_size % size:
    raise ValueError(f"model.bn_group_size={group_size!r} must divide the batch given to the model "
                     f"({batch_size} images): batch statistics are computed per group of that many "
                     "consecutive images.")
  return x.reshape(batch_size // size, size, *x.shape[1:])


def group_moments(groups: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean and variance [N / G, C] of each group [N / G, G, ..., C] over its images and positions.

  As nnx.BatchNorm: in float32 at least (bfloat16 sums lose too much), variance as
  E[x^2] - E[x]^2 clipped at 0 (its default use_fast_variance).
  """
  groups = groups.astype(jnp.promote_types(groups.dtype, jnp.float32))
  axes = tuple(range(1, groups.ndim - 1))
  mean = jnp.mean(groups, axis=axes)
  mean_of_squares = jnp.mean(jnp.square(groups), axis=axes)
  return mean, jnp.maximum(0.0, mean_of_squares - jnp.square(mean))


def _is_group_size(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class GhostBatchNorm(nnx.BatchNorm):
  """nnx.BatchNorm whose training statistics are per group of `group_size` consecutive images.

  The original trained on 16 GPUs x 4 images, each replica normalizing with its own 4 images
  (no sync BN); group_size=4 reproduces that on any number of devices. In training each group is
  normalized with its own mean and variance (float32, channels last), and the running averages move
  towards the MEAN OVER GROUPS of the group means and of the group variances. slim's multi-clone
  training updated them from the first clone only, one group's statistics; the mean over groups
  has the same expectation (it is the unbiased counterpart) with less noise. The mean of the group
  variances is the within-group variance, smaller than the whole batch's, as the original's was.

  Eval mode (the running averages) is nnx.BatchNorm's own code path. Training always takes the
  grouped path (group size 0: one group of the whole batch), which gives nnx.BatchNorm's results
  bit for bit (tests/test_ghost_batch_norm.py) but writes the running averages with set_value():
  nnx.BatchNorm's `mean[...] =` compares the shardings of the traced values, and each such look at
  a tracer walks the whole trace so far to word an error message, so the tiny demo's train step
  took 12 s to trace with it and 5 s without. Parameters and statistics keep its names and
  shapes (scale, bias, mean, var): checkpoints and the converters do not see the group size.

  Under jit with the batch sharded over the 'data' mesh axis, groups that lie within one device's
  shard (per-device batch a multiple of G) normalize without cross-device traffic; only the
  running-average update takes a mean over groups, a [C]-vector reduction per layer.
  """

  def __init__(self, num_features: int, *, group_size: int = 0, **batch_norm_kwargs):
    if not _is_group_size(group_size):
      raise ValueError(f"model.bn_group_size must be an int >= 0, got {group_size!r}.")
    super().__init__(num_features, **batch_norm_kwargs)
    self.group_size = group_size

  def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average:
      return super().__call__(x, use_running_average=True)
    # Promote as nnx.BatchNorm does: everything in the compute dtype, statistics in float32.
    x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
    groups = image_groups(x, self.group_size)
    group_means, group_variances = group_moments(groups)
    self._update_running_averages(group_means, group_variances)
    stats_shape = (group_means.shape[0],) + (1,) * (groups.ndim - 2) + (group_means.shape[-1],)
    inverse_std = jax.lax.rsqrt(group_variances.reshape(stats_shape) + self.epsilon)
    y = (groups - group_means.reshape(stats_shape)) * (inverse_std * scale) + bias
    return y.reshape(x.shape).astype(x.dtype)

  def _update_running_averages(self, group_means: jax.Array, group_variances: jax.Array) -> None:
    momentum = self.momentum
    self.mean.set_value(jax.lax.stop_gradient(
        momentum * self.mean[...] + (1 - momentum) * jnp.mean(group_means, axis=0)))
    self.var.set_value(jax.lax.stop_gradient(
        momentum * self.var[...] + (1 - momentum) * jnp.mean(group_variances, axis=0)))


def batch_norm(features: int, norm: NormConfig, *, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs) -> GhostBatchNorm:
  return GhostBatchNorm(features, group_size=norm.group_size, momentum=norm.momentum,
                        epsilon=norm.epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
  """nn.MaxPool2d(3, stride=2, padding=1): padding is -inf, so it never wins the max.

  Keras pads with zeros instead (ZeroPadding2D(1), then a 'valid' pool): the same result here,
  because the pool follows a ReLU (inputs >= 0) and every window holds at least one real pixel.
  """
  return jax.lax.reduce_window(x, -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else
                               jnp.iinfo(x.dtype).min, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                               ((0, 0), (1, 1), (1, 1), (0, 0)))


class ConvBN(nnx.Module):
  """Conv + BatchNorm, optionally ReLU; also the projection shortcut."""

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int = 1,
               dilation: int = 1, use_bias: bool = False, norm: NormConfig,
               kernel_init=he_normal_fan_out, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.conv = conv2d(in_features, out_features, kernel_size, stride=stride, dilation=dilation,
                       use_bias=use_bias, kernel_init=kernel_init, dtype=dtype,
                       param_dtype=param_dtype, rngs=rngs)
    self.bn = batch_norm(out_features, norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool, relu: bool = True) -> jax.Array:
    x = self.bn(self.conv(x), use_running_average=not train)
    return nnx.relu(x) if relu else x


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 (dilation) -> 1x1 (x4), residual add, ReLU; the stride on the 3x3 (torchvision's
  Bottleneck) or on the first 1x1 (Keras's residual_block_v1), as `variant` says."""

  def __init__(self, in_features: int, width: int, *, stride: int, dilation: int,
               variant: Variant = VARIANTS["torchvision"], norm: NormConfig, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    out_features = width * EXPANSION
    norm_layer = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    layer = dict(use_bias=variant.conv_bias, **norm_layer)
    stride_1x1, stride_3x3 = (stride, 1) if variant.stride_on_first_1x1 else (1, stride)
    self.conv1 = conv2d(in_features, width, 1, stride=stride_1x1, **layer)
    self.bn1 = batch_norm(width, norm, **norm_layer)
    self.conv2 = conv2d(width, width, 3, stride=stride_3x3, dilation=dilation, **layer)
    self.bn2 = batch_norm(width, norm, **norm_layer)
    self.conv3 = conv2d(width, out_features, 1, **layer)
    self.bn3 = batch_norm(out_features, norm, **norm_layer)
    needs_projection = stride != 1 or in_features != out_features
    self.downsample = (ConvBN(in_features, out_features, 1, stride=stride, norm=norm, **layer)
                       if needs_projection else None)

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    use_running_average = not train
    y = nnx.relu(self.bn1(self.conv1(x), use_running_average=use_running_average))
    y = nnx.relu(self.bn2(self.conv2(y), use_running_average=use_running_average))
    y = self.bn3(self.conv3(y), use_running_average=use_running_average)
    shortcut = x if self.downsample is None else self.downsample(x, train=train, relu=False)
    return nnx.relu(y + shortcut)


class ResNet(nnx.Module):
  """Bottleneck ResNet returning stage features.

  __call__(images, *, train) -> {'stride4': stage 1 output (the DeepLab low-level feature),
  'stage2', 'stage3', 'stage4'}; for ResNet-50/101 they have 256/512/1024/2048 channels. Each
  stride-2 op maps n -> ceil(n / 2): a 513 crop gives 129 (stride4), 65, 33, 33 at OS 16.
  """

  def __init__(self, spec: ResNetSpec, *, deep_stem: bool = False, variant: str = "torchvision",
               output_stride: int = 16, norm: NormConfig = NormConfig(), dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if variant not in VARIANTS:
      raise ValueError(f"ResNet variant must be one of {tuple(VARIANTS)}, got {variant!r}.")
    if deep_stem and variant == "keras":
      raise ValueError("Keras applications' ResNets have no deep stem: set "
                       "config.model.deep_stem=False with config.model.resnet_variant=keras.")
    block_variant = VARIANTS[variant]
    layer = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.deep_stem = deep_stem
    stem = spec.stem_channels
    if deep_stem:
      self.stem_conv1 = conv2d(3, stem, 3, stride=2, **layer)
      self.stem_bn1 = batch_norm(stem, norm, **layer)
      self.stem_conv2 = conv2d(stem, stem, 3, **layer)
      self.stem_bn2 = batch_norm(stem, norm, **layer)
      stem_out = 2 * stem
      self.stem_conv3 = conv2d(stem, stem_out, 3, **layer)
    else:
      stem_out = stem
      self.conv1 = conv2d(3, stem_out, 7, stride=2, use_bias=block_variant.conv_bias, **layer)
    self.bn1 = batch_norm(stem_out, norm, **layer)

    in_features = stem_out
    stages = zip(spec.blocks_per_stage, spec.bottleneck_widths, stage_layouts(output_stride))
    for index, (num_blocks, width, stage) in enumerate(stages, start=1):
      blocks = []
      for block in range(num_blocks):
        blocks.append(Bottleneck(
            in_features, width, stride=stage.stride if block == 0 else 1,
            dilation=stage.first_block_dilation if block == 0 else stage.dilation,
            variant=block_variant, norm=norm, **layer))
        in_features = width * EXPANSION
      setattr(self, f"layer{index}", nnx.List(blocks))
    self.out_features = {"stride4": spec.bottleneck_widths[0] * EXPANSION,
                         "stage2": spec.bottleneck_widths[1] * EXPANSION,
                         "stage3": spec.bottleneck_widths[2] * EXPANSION,
                         "stage4": spec.bottleneck_widths[3] * EXPANSION}

  def _stem(self, x: jax.Array, *, train: bool) -> jax.Array:
    use_running_average = not train
    if self.deep_stem:
      x = nnx.relu(self.stem_bn1(self.stem_conv1(x), use_running_average=use_running_average))
      x = nnx.relu(self.stem_bn2(self.stem_conv2(x), use_running_average=use_running_average))
      x = self.stem_conv3(x)
    else:
      x = self.conv1(x)
    x = nnx.relu(self.bn1(x, use_running_average=use_running_average))
    return max_pool_3x3_stride2(x)

  def __call__(self, images: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    x = self._stem(images, train=train)
    features = {}
    for name, stage in zip(("stride4", "stage2", "stage3", "stage4"),
                           (self.layer1, self.layer2, self.layer3, self.layer4)):
      for block in stage:
        x = block(x, train=train)
      features[name] = x
    return features
