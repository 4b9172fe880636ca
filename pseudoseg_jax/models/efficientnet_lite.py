"""EfficientNet-Lite0 (Tan & Le 2019; TF's efficientnet/lite), a light ImageNet backbone for CPUs.

Lite0 is EfficientNet-B0 made friendly to mobile accelerators: no squeeze-excite, ReLU6 instead of
swish, and stem (32) and head (1280) widths never scaled. Layout:
  stem:   3x3/2 conv 32 + BN + ReLU6
  blocks: 16 MBConv blocks in 7 stages (`LITE0_STAGES`): 1x1 expand conv + BN + ReLU6 (absent
          when the expand ratio is 1), kxk depthwise conv + BN + ReLU6 (the block's stride),
          1x1 projection conv + BN with no activation, and an identity residual added when the
          block keeps its size and width (nominal stride 1, in == out channels).
  ImageNet head (not part of this backbone, see convert/efficientnet_lite.py): 1x1 conv 320 -> 1280
          + BN + ReLU6, average pool, fc 1280 -> 1000.
No conv has a bias. Drop-connect (stochastic depth) is left out: the segmentation recipes fine-tune
without it.

Batch norm: epsilon is always 1e-3, the value these weights were trained with (TF's
efficientnet_lite_builder: batch_norm_epsilon=1e-3), so it is part of the architecture here and
`norm.epsilon` from the config (1e-5, the heads') is ignored for the backbone; the momentum and the
group size are the config's. Every BN is resnet.batch_norm (GhostBatchNorm).

Input: the ImageNet weights expect RGB (x - 127) / 128 on 0-255 values (`normalize_images`);
DeepLabV3Plus converts its canonical x / 127.5 - 1 images to it (models/normalization.py,
'efficientnet_lite').

Padding: TF trained these weights with 'SAME' padding. A stride-1 conv's 'SAME' padding is
symmetric, (k - 1) // 2 * dilation on each side; a stride-2 conv's is symmetric too when its input
size is odd, and only then, so on the project's crops (4k + 1, 32k + 1: 225, 321, 513) every conv
pads exactly like TF and this model pads symmetrically everywhere (as resnet.conv2d). On an even
size (224) 'SAME' pads one more row and column at the bottom / right of each stride-2 conv than at
the top / left; our symmetric padding then shifts those features by half a pixel against TF's. Use
odd sizes (225) to reproduce the ImageNet activations exactly (tests/test_efficientnet_lite.py).

Output stride 32 / 16 / 8 follows DeepLab's MobileNet rule (slim mobilenet.py): once the running
stride reaches the target, a stride-2 block runs at stride 1 and multiplies the dilation of the
blocks after it by 2; its own depthwise conv keeps the previous dilation (`block_layouts`).

Names (torch keys of the lukemelas-style state dict in brackets, convert/efficientnet_lite.py):
  stem_conv [_conv_stem], stem_bn [_bn0],
  blocks/N/expand_conv [_blocks.N._expand_conv], blocks/N/expand_bn [_blocks.N._bn0],
  blocks/N/depthwise_conv [_blocks.N._depthwise_conv], blocks/N/depthwise_bn [_blocks.N._bn1],
  blocks/N/project_conv [_blocks.N._project_conv], blocks/N/project_bn [_blocks.N._bn2].
Depthwise kernels are HWIO with I = 1: [k, k, 1, C] (nnx.Conv with feature_group_count = C).

Features (the same keys as ResNet's, so DeepLabV3Plus reads them alike):
  'stride4': end of stage 2 (24 ch, stride 4), DeepLab's low-level feature;
  'stage2':  end of stage 3 (40 ch, stride 8);
  'stage3':  end of stage 5 (112 ch, the last stride-16 stage): the SGC hypercolumn's first half;
  'stage4':  end of stage 7 (320 ch; stride 16 at OS 16): ASPP, classifier, CAM, hypercolumn.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from pseudoseg_jax.models import conv
from pseudoseg_jax.models.resnet import NormConfig, batch_norm, conv2d

BN_EPSILON = 1e-3
INPUT_MEAN = 127.0
INPUT_STD = 128.0
STEM_FEATURES = 32
STEM_STRIDE = 2
# TF's EfficientNet initialises every conv as normal(0, sqrt(2 / fan_out)) with fan_out =
# k * k * output filters, where a depthwise conv has one output filter per channel: k * k.
kernel_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
depthwise_kernel_init = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One stage of MBConv blocks; the stride is its first block's."""
  expand_ratio: int
  kernel_size: int
  stride: int
  num_blocks: int
  out_features: int


# EfficientNet-B0's stage table, which Lite0 keeps (width and depth multipliers 1.0).
LITE0_STAGES = (
    StageSpec(1, 3, 1, 1, 16),
    StageSpec(6, 3, 2, 2, 24),
    StageSpec(6, 5, 2, 2, 40),
    StageSpec(6, 3, 2, 3, 80),
    StageSpec(6, 5, 1, 3, 112),
    StageSpec(6, 5, 2, 4, 192),
    StageSpec(6, 3, 1, 1, 320),
)
# Feature name -> the stage (index into LITE0_STAGES) whose last block gives it.
FEATURE_STAGES = {"stride4": 1, "stage2": 2, "stage3": 4, "stage4": 6}


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  stride: int
  dilation: int  # Of the block's depthwise conv.


def block_layouts(output_stride: int,
                  stages=LITE0_STAGES) -> tuple[tuple[BlockLayout, ...], ...]:
  """Stride and dilation of every block, per stage, for `output_stride` (DeepLab's MobileNet rule).

  OS 16: stage 6's first block (1, 1), its other blocks and stage 7 (1, 2). OS 8: stage 4's first
  block (1, 1), then dilation 2 up to stage 6's first block, then 4.
  """
  if output_stride not in (8, 16, 32):
    raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}.")
  current_stride, dilation, layouts = STEM_STRIDE, 1, []
  for stage in stages:
    blocks = []
    for block in range(stage.num_blocks):
      stride = stage.stride if block == 0 else 1
      if stride > 1 and current_stride == output_stride:
        blocks.append(BlockLayout(stride=1, dilation=dilation))
        dilation *= stride
      else:
        blocks.append(BlockLayout(stride=stride, dilation=dilation))
        current_stride *= stride
    layouts.append(tuple(blocks))
  return tuple(layouts)


def normalize_images(images: jax.Array) -> jax.Array:
  """RGB 0-255 -> the ImageNet weights' input, (x - 127) / 128."""
  return (jnp.asarray(images, jnp.float32) - INPUT_MEAN) / INPUT_STD


def depthwise_conv2d(features: int, kernel_size: int, *, stride: int, dilation: int, dtype=None,
                     param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Conv:
  """Depthwise kxk conv (one filter per channel), symmetric padding dilation * (k - 1) // 2.

  On CPUs conv.conv_general_dilated runs it as a sum of per-tap products (conv.depthwise_tap_sum),
  many times faster than XLA:CPU's grouped convolution; elsewhere it is lax's.
  """
  pad = dilation * (kernel_size - 1) // 2
  return nnx.Conv(features, features, (kernel_size, kernel_size), strides=stride,
                  padding=((pad, pad), (pad, pad)), kernel_dilation=dilation,
                  feature_group_count=features, use_bias=False, kernel_init=depthwise_kernel_init,
                  dtype=dtype, param_dtype=param_dtype,
                  conv_general_dilated=conv.conv_general_dilated, rngs=rngs)


class MBConvBlock(nnx.Module):
  """Inverted residual: 1x1 expand + BN + ReLU6, depthwise + BN + ReLU6, 1x1 project + BN, + x."""

  def __init__(self, in_features: int, spec: StageSpec, layout: BlockLayout, *, nominal_stride: int,
               norm: NormConfig, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    layer = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    hidden = in_features * spec.expand_ratio
    if spec.expand_ratio != 1:
      self.expand_conv = conv2d(in_features, hidden, 1, kernel_init=kernel_init, **layer)
      self.expand_bn = batch_norm(hidden, norm, **layer)
    else:
      self.expand_conv = self.expand_bn = None
    self.depthwise_conv = depthwise_conv2d(hidden, spec.kernel_size, stride=layout.stride,
                                           dilation=layout.dilation, **layer)
    self.depthwise_bn = batch_norm(hidden, norm, **layer)
    self.project_conv = conv2d(hidden, spec.out_features, 1, kernel_init=kernel_init, **layer)
    self.project_bn = batch_norm(spec.out_features, norm, **layer)
    # TF's rule, on the nominal stride: a block turned to stride 1 by the output stride is the
    # first of its stage and changes the width anyway.
    self.residual = nominal_stride == 1 and in_features == spec.out_features

  def __call__(self, inputs: jax.Array, *, train: bool) -> jax.Array:
    use_running_average = not train
    x = inputs
    if self.expand_conv is not None:
      x = jax.nn.relu6(self.expand_bn(self.expand_conv(x), use_running_average=use_running_average))
    x = jax.nn.relu6(self.depthwise_bn(self.depthwise_conv(x),
                                       use_running_average=use_running_average))
    x = self.project_bn(self.project_conv(x), use_running_average=use_running_average)
    return x + inputs if self.residual else x


class EfficientNetLite(nnx.Module):
  """EfficientNet-Lite0 feature extractor (no ImageNet head).

  __call__(images, *, train) -> {'stride4', 'stage2', 'stage3', 'stage4'} with 24/40/112/320
  channels (see the module docstring). Each stride-2 conv maps n -> ceil(n / 2): a 225 crop gives
  57 (stride4), 29, 15, 15 at OS 16 and 57, 29, 15, 8 at OS 32.
  """

  def __init__(self, *, output_stride: int = 16, norm: NormConfig = NormConfig(),
               stages=LITE0_STAGES, frozen_blocks: int = 0, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    norm = dataclasses.replace(norm, epsilon=BN_EPSILON)
    # The stem and the first `frozen_blocks` blocks run in inference mode with no gradient
    # (config.model.frozen_backbone_blocks; steps.make_optimizer leaves their weights alone).
    self.frozen_blocks = frozen_blocks
    layer = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.stem_conv = conv2d(3, STEM_FEATURES, 3, stride=STEM_STRIDE, kernel_init=kernel_init,
                            **layer)
    self.stem_bn = batch_norm(STEM_FEATURES, norm, **layer)
    blocks, feature_blocks, in_features = [], {}, STEM_FEATURES
    for index, (spec, layouts) in enumerate(zip(stages, block_layouts(output_stride, stages))):
      for block, layout in enumerate(layouts):
        blocks.append(MBConvBlock(in_features, spec, layout,
                                  nominal_stride=spec.stride if block == 0 else 1, norm=norm,
                                  **layer))
        in_features = spec.out_features
      feature_blocks[index] = len(blocks) - 1
    self.blocks = nnx.List(blocks)
    # Block index -> feature name, for the blocks whose outputs are returned.
    self.feature_at = {feature_blocks[stage]: name for name, stage in FEATURE_STAGES.items()}
    self.out_features = {name: stages[stage].out_features
                         for name, stage in FEATURE_STAGES.items()}

  def __call__(self, images: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    frozen = self.frozen_blocks > 0
    x = self.stem_bn(self.stem_conv(images), use_running_average=not train or frozen)
    x = jax.nn.relu6(x)
    features = {}
    for index, block in enumerate(self.blocks):
      frozen = index < self.frozen_blocks
      x = block(x, train=train and not frozen)
      if frozen:  # Also cuts the decoder's path into the frozen blocks through 'stride4'.
        x = jax.lax.stop_gradient(x)
      if index in self.feature_at:
        features[self.feature_at[index]] = x
    return features
