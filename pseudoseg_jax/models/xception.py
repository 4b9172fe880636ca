"""Xception-65 as in DeepLab (the PseudoSeg paper's backbone), in Flax NNX.

Layout (DeepLab's xception_65, research/deeplab/core/xception.py):
  entry_flow: conv1_1 3x3/2 32, conv1_2 3x3 64 (each conv + BN + ReLU), then blocks 1-3: one unit of
              three separable convs 128/256/728 each, stride 2 on the third, 1x1 conv + BN shortcut.
  middle_flow: block1 = 16 units of three separable convs 728, identity shortcut.
  exit_flow: block1 = one unit 728/1024/1024, stride 2, conv shortcut; block2 = one unit
             1536/1536/2048 without shortcut.
A separable conv is depthwise 3x3 + BN, then pointwise 1x1 + BN (DeepLab splits it in two because
it does not regularize the depthwise weights). Where the ReLU sits differs between blocks, as in
DeepLab: every block but exit_flow/block2 applies ReLU to the INPUT of each separable conv and none
inside it (activation_fn_in_separable_conv=False), so unit outputs are un-rectified sums; exit_flow/
block2 has no ReLU on its input but one after each BN inside (depthwise and pointwise).

Output stride: the nominal stride is 32; for OS 16 / 8 DeepLab's stack_blocks_dense gives stride 1
to the units past the target and multiplies the atrous rate by the stride each would have had
(`block_layouts`). The exit_flow/block2 unit rates ("multi_grid") are DeepLab's default (1, 1, 1);
the PseudoSeg scripts never set multi_grid.

Padding: DeepLab pads strided convs explicitly ("fixed padding", total (k-1)*rate, pad_beg =
total // 2) and uses 'SAME' otherwise. With the 3x3 and 1x1 kernels here every case is symmetric
padding rate * (k - 1) // 2, so that is what we use: a 513 crop gives 257 after conv1_1, and each
stride-2 unit maps n -> ceil(n / 2) (129 / 65 / 33 for 513, 128 / 64 / 32 for 512).

Batch norm: epsilon is always 1e-3, DeepLab's xception_arg_scope (its heads use 1e-5): pretrained
weights only reproduce their activations with it, so it is part of the architecture here and
`norm.epsilon` from the config is ignored for the backbone. The momentum is the config's (DeepLab:
decay 0.9997). Kernels start as DeepLab's truncated normal with stddev 0.09.

Names mirror DeepLab's scopes without 'xception_65/', 'xception_module/' and slim's leaf names:
  xception_65/entry_flow/conv1_1/weights                  -> entry_flow/conv1_1/conv/kernel
  xception_65/middle_flow/block1/unit_16/xception_module/
      separable_conv3_depthwise/BatchNorm/moving_variance -> middle_flow/block1/unit_16/
                                                             separable_conv3_depthwise/bn/var
(see pseudoseg_jax/convert/deeplab_xception.py). Note DeepLab applies no weight decay to the
depthwise kernels (regularize_depthwise=False); their paths contain '_depthwise'.

Features returned (DeepLab / PseudoSeg end points):
  'stride4': entry_flow/block2/unit_1 separable_conv2_pointwise (256 ch, BN output, no ReLU): the
             DeepLabv3+ decoder's low-level feature for xception_65 (feature_extractor.py).
  'stage2':  entry_flow/block2 output (256 ch, stride 8), PseudoSeg's "stride 8" end point.
  'stage3':  exit_flow/block1 output (1024 ch), PseudoSeg's "stride 15" (SGC hypercolumn).
  'stage4':  exit_flow/block2 output (2048 ch), "stride 16": ASPP, classifier, CAM, hypercolumn.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from pseudoseg_jax.models import conv
from pseudoseg_jax.models.resnet import NormConfig, batch_norm

XCEPTION_BN_EPSILON = 1e-3
# xception_arg_scope: tf.truncated_normal_initializer(stddev=0.09) for every conv.
deeplab_weights_init = nnx.initializers.truncated_normal(stddev=0.09)
ROOT_STRIDE = 2  # conv1_1; the blocks see output_stride // 2.


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One DeepLab xception_block: `num_units` identical units of three separable convs."""
  flow: str
  name: str
  depths: tuple[int, int, int]
  skip: str  # 'conv' (1x1 conv + BN shortcut), 'sum' (identity) or 'none'.
  num_units: int
  stride: int  # Of the third separable conv (and the shortcut) of every unit.
  activation_inside: bool  # ReLU after each BN inside the separable convs, none on their inputs.
  unit_rates: tuple[int, int, int] = (1, 1, 1)


XCEPTION65_BLOCKS = (
    BlockSpec("entry_flow", "block1", (128, 128, 128), "conv", 1, 2, False),
    BlockSpec("entry_flow", "block2", (256, 256, 256), "conv", 1, 2, False),
    BlockSpec("entry_flow", "block3", (728, 728, 728), "conv", 1, 2, False),
    BlockSpec("middle_flow", "block1", (728, 728, 728), "sum", 16, 1, False),
    BlockSpec("exit_flow", "block1", (728, 1024, 1024), "conv", 1, 2, False),
    BlockSpec("exit_flow", "block2", (1536, 1536, 2048), "none", 1, 1, True),
)
ROOT_CHANNELS = (32, 64)


@dataclasses.dataclass(frozen=True)
class BlockLayout:
  stride: int
  rate: int  # Atrous rate of the block, times the spec's unit_rates.


def block_layouts(output_stride: int, blocks=XCEPTION65_BLOCKS) -> tuple[BlockLayout, ...]:
  """Stride and rate of each block, DeepLab's stack_blocks_dense rule.

  Once the running stride has reached the target, a unit runs at stride 1 and the rate grows by
  the stride it would have had. OS 16: exit_flow/block1 (1, 1), exit_flow/block2 (1, 2); OS 8:
  entry_flow/block3 (1, 1), middle_flow (1, 2), exit_flow/block1 (1, 2), exit_flow/block2 (1, 4).
  """
  if output_stride not in (8, 16, 32):
    raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}.")
  target = output_stride // ROOT_STRIDE
  current_stride, rate, layouts = 1, 1, []
  for spec in blocks:
    if current_stride == target:
      layouts.append(BlockLayout(stride=1, rate=rate))
      rate *= spec.stride
    else:
      layouts.append(BlockLayout(stride=spec.stride, rate=1))
      current_stride *= spec.stride
  return tuple(layouts)


class ConvNorm(nnx.Module):
  """Conv (or depthwise conv) without bias + BatchNorm: one DeepLab slim conv with normalizer_fn.

  Symmetric padding rate * (k - 1) // 2 equals DeepLab's fixed padding (strided) and 'SAME'
  (stride 1) for the odd kernels used here.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int, *, stride: int = 1,
               rate: int = 1, depthwise: bool = False, norm: NormConfig, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if depthwise and in_features != out_features:
      raise ValueError("A depthwise conv (depth multiplier 1) keeps the channel count.")
    pad = rate * (kernel_size - 1) // 2
    self.conv = nnx.Conv(in_features, out_features, (kernel_size, kernel_size), strides=stride,
                         padding=((pad, pad), (pad, pad)), kernel_dilation=rate,
                         feature_group_count=in_features if depthwise else 1, use_bias=False,
                         kernel_init=deeplab_weights_init, dtype=dtype, param_dtype=param_dtype,
                         conv_general_dilated=conv.conv_general_dilated, rngs=rngs)
    self.bn = batch_norm(out_features, norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, train: bool, relu: bool) -> jax.Array:
    x = self.bn(self.conv(x), use_running_average=not train)
    return nnx.relu(x) if relu else x


class XceptionUnit(nnx.Module):
  """DeepLab's xception_module: three separable convs (stride on the third) plus the shortcut.

  Attributes separable_conv{1,2,3}_{depthwise,pointwise} and `shortcut` (None unless skip='conv').
  """

  def __init__(self, in_features: int, spec: BlockSpec, layout: BlockLayout, *,
               norm: NormConfig, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    layer = dict(norm=norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.skip = spec.skip
    self.activation_inside = spec.activation_inside
    features = in_features
    for index, (depth, unit_rate) in enumerate(zip(spec.depths, spec.unit_rates), start=1):
      stride = layout.stride if index == 3 else 1
      setattr(self, f"separable_conv{index}_depthwise",
              ConvNorm(features, features, 3, stride=stride, rate=layout.rate * unit_rate,
                       depthwise=True, **layer))
      setattr(self, f"separable_conv{index}_pointwise", ConvNorm(features, depth, 1, **layer))
      features = depth
    self.shortcut = (ConvNorm(in_features, spec.depths[-1], 1, stride=layout.stride, **layer)
                     if spec.skip == "conv" else None)

  def separable_convs(self) -> list[tuple[ConvNorm, ConvNorm]]:
    return [(getattr(self, f"separable_conv{index}_depthwise"),
             getattr(self, f"separable_conv{index}_pointwise")) for index in (1, 2, 3)]

  def __call__(self, inputs: jax.Array, *, train: bool) -> tuple[jax.Array, list[jax.Array]]:
    """(unit output, the three separable conv outputs: DeepLab's '.../separable_conv{i}_pointwise'
    end points)."""
    inside = self.activation_inside
    residual, separable_outputs = inputs, []
    for depthwise, pointwise in self.separable_convs():
      if not inside:
        residual = nnx.relu(residual)
      residual = depthwise(residual, train=train, relu=inside)
      residual = pointwise(residual, train=train, relu=inside)
      separable_outputs.append(residual)
    if self.skip == "conv":
      # The shortcut sees the un-rectified unit input.
      residual = residual + self.shortcut(inputs, train=train, relu=False)
    elif self.skip == "sum":
      residual = residual + inputs
    return residual, separable_outputs


class XceptionBlock(nnx.Module):
  """Units unit_1 ... unit_n (DeepLab's scope names)."""

  def __init__(self, in_features: int, spec: BlockSpec, layout: BlockLayout, *,
               norm: NormConfig, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    self.num_units = spec.num_units
    for index in range(1, spec.num_units + 1):
      setattr(self, f"unit_{index}", XceptionUnit(
          in_features if index == 1 else spec.depths[-1], spec, layout, norm=norm, dtype=dtype,
          param_dtype=param_dtype, rngs=rngs))

  def units(self) -> list[XceptionUnit]:
    return [getattr(self, f"unit_{index}") for index in range(1, self.num_units + 1)]

  def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, list[jax.Array]]:
    """(block output, the separable conv outputs of its FIRST unit)."""
    first_unit, *other_units = self.units()
    x, first_unit_outputs = first_unit(x, train=train)
    for unit in other_units:
      x, _ = unit(x, train=train)
    return x, first_unit_outputs


class Xception65(nnx.Module):
  """DeepLab's Xception-65 returning the features DeepLabV3Plus and PseudoSeg take.

  __call__(images, *, train) -> {'stride4', 'stage2', 'stage3', 'stage4'} (see the module docstring)
  with 256 / 256 / 1024 / 2048 channels; a 513 crop gives 129 / 65 / 33 / 33 at OS 16 and
  129 / 65 / 65 / 65 at OS 8.
  """

  def __init__(self, *, output_stride: int = 16, norm: NormConfig = NormConfig(), dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    norm = dataclasses.replace(norm, epsilon=XCEPTION_BN_EPSILON)
    layer = dict(norm=norm, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.output_stride = output_stride
    self.entry_flow = nnx.Dict(
        conv1_1=ConvNorm(3, ROOT_CHANNELS[0], 3, stride=ROOT_STRIDE, **layer),
        conv1_2=ConvNorm(ROOT_CHANNELS[0], ROOT_CHANNELS[1], 3, **layer))
    self.middle_flow = nnx.Dict()
    self.exit_flow = nnx.Dict()
    in_features = ROOT_CHANNELS[1]
    for spec, layout in zip(XCEPTION65_BLOCKS, block_layouts(output_stride)):
      getattr(self, spec.flow)[spec.name] = XceptionBlock(in_features, spec, layout, **layer)
      in_features = spec.depths[-1]
    depth_of = {(spec.flow, spec.name): spec.depths for spec in XCEPTION65_BLOCKS}
    self.out_features = {"stride4": depth_of["entry_flow", "block2"][1],
                         "stage2": depth_of["entry_flow", "block2"][-1],
                         "stage3": depth_of["exit_flow", "block1"][-1],
                         "stage4": depth_of["exit_flow", "block2"][-1]}

  def __call__(self, images: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    x = self.entry_flow["conv1_1"](images, train=train, relu=True)
    x = self.entry_flow["conv1_2"](x, train=train, relu=True)
    outputs = {}
    for spec in XCEPTION65_BLOCKS:
      x, separable_outputs = getattr(self, spec.flow)[spec.name](x, train=train)
      outputs[spec.flow, spec.name] = x
      if (spec.flow, spec.name) == ("entry_flow", "block2"):
        outputs["low_level"] = separable_outputs[1]
    return {"stride4": outputs["low_level"], "stage2": outputs["entry_flow", "block2"],
            "stage3": outputs["exit_flow", "block1"], "stage4": outputs["exit_flow", "block2"]}
