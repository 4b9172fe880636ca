"""Xception-65 (DeepLab's) and the converter from DeepLab's TF checkpoints.

The reference is DeepLab's xception_65 written out here from its layer list and rules (scopes,
shapes, strides, 'SAME' vs fixed padding, where the ReLUs sit, BN epsilon 1e-3), independently of
the model's own tables: a TF1 checkpoint with DeepLab's variable names is written with the v1
Saver, converted, loaded into DeepLabV3Plus's backbone, and the backbone's features are compared
with the same network computed by tf.nn ops straight from the checkpoint's tensors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from flax import nnx

from pseudoseg_jax import convert
from pseudoseg_jax.config import base_config
from pseudoseg_jax.convert import deeplab_xception
from pseudoseg_jax.models import build_model
from pseudoseg_jax.models.xception import BlockLayout, block_layouts

NUM_CLASSES = 21
BN_LEAVES = ("gamma", "beta", "moving_mean", "moving_variance")
BN_EPSILON = 1e-3
# DeepLab's xception_65: (scope, input channels, depths, units, skip, stride,
# activation_fn_in_separable_conv).
DEEPLAB_BLOCKS = (
    ("entry_flow/block1", 64, (128, 128, 128), 1, "conv", 2, False),
    ("entry_flow/block2", 128, (256, 256, 256), 1, "conv", 2, False),
    ("entry_flow/block3", 256, (728, 728, 728), 1, "conv", 2, False),
    ("middle_flow/block1", 728, (728, 728, 728), 16, "sum", 1, False),
    ("exit_flow/block1", 728, (728, 1024, 1024), 1, "conv", 2, False),
    ("exit_flow/block2", 1024, (1536, 1536, 2048), 1, "none", 1, True),
)
# Variables DeepLab checkpoints hold besides the backbone; the converter must skip them.
NON_BACKBONE_SHAPES = {
    "logits/semantic/weights": (1, 1, 256, NUM_CLASSES),
    "logits/semantic/biases": (NUM_CLASSES,),
    "aspp0/weights": (1, 1, 2048, 256),
    "aspp1_depthwise/depthwise_weights": (3, 3, 2048, 1),
    "image_pooling/BatchNorm/gamma": (256,),
    "concat_projection/weights": (1, 1, 1280, 256),
    "decoder/feature_projection0/weights": (1, 1, 256, 48),
    "xception_65/logits/weights": (1, 1, 2048, 1001),
    "xception_65/logits/biases": (1001,),
    "xception_65/entry_flow/conv1_1/weights/Momentum": (3, 3, 3, 32),
    "xception_65/exit_flow/block2/unit_1/xception_module/separable_conv3_pointwise/BatchNorm/beta/"
    "ExponentialMovingAverage": (2048,),
}


def deeplab_backbone_shapes() -> dict[str, tuple[int, ...]]:
  """Name -> shape of every variable of DeepLab's xception_65 (no logits), from its layer list."""
  shapes = {}

  def conv(scope, kernel_shape, *, depthwise=False):
    leaf = "depthwise_weights" if depthwise else "weights"
    shapes[f"xception_65/{scope}/{leaf}"] = kernel_shape
    channels = kernel_shape[2] if depthwise else kernel_shape[3]
    for bn_leaf in BN_LEAVES:
      shapes[f"xception_65/{scope}/BatchNorm/{bn_leaf}"] = (channels,)

  conv("entry_flow/conv1_1", (3, 3, 3, 32))
  conv("entry_flow/conv1_2", (3, 3, 32, 64))
  for scope, in_channels, depths, units, skip, _, _ in DEEPLAB_BLOCKS:
    for unit in range(1, units + 1):
      prefix = f"{scope}/unit_{unit}/xception_module"
      channels = in_channels if unit == 1 else depths[-1]
      for index, depth in enumerate(depths, start=1):
        conv(f"{prefix}/separable_conv{index}_depthwise", (3, 3, channels, 1), depthwise=True)
        conv(f"{prefix}/separable_conv{index}_pointwise", (1, 1, channels, depth))
        channels = depth
      if skip == "conv":
        conv(f"{prefix}/shortcut", (1, 1, in_channels, depths[-1]))
  return shapes


def random_tensor(rng, name, shape):
  """Values that keep 65 layers of inference-mode activations in a sane range."""
  if name.endswith(("moving_variance", "gamma")):
    return rng.uniform(0.5, 1.5, shape).astype(np.float32)
  if name.endswith(("beta", "moving_mean")):
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)
  fan_in = shape[0] * shape[1] * (1 if "depthwise" in name else shape[2]) if len(shape) == 4 else 1
  return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def xception_config(**overrides):
  config = base_config().model
  config.backbone = "xception65"
  for field, value in overrides.items():
    config[field] = value
  return config


@pytest.fixture(scope="module")
def deeplab_arrays():
  rng = np.random.default_rng(0)
  shapes = {**deeplab_backbone_shapes(), **NON_BACKBONE_SHAPES}
  arrays = {name: random_tensor(rng, name, shape) for name, shape in shapes.items()}
  arrays["global_step"] = np.int64(30000)
  return arrays


@pytest.fixture(scope="module")
def checkpoint_prefix(deeplab_arrays, tmp_path_factory):
  """A TF1 checkpoint (v1 Saver: plain variable names) holding `deeplab_arrays`."""
  variables = {name: tf.Variable(value) for name, value in deeplab_arrays.items()}
  saver = tf.compat.v1.train.Saver(var_list=variables)
  return saver.save(None, str(tmp_path_factory.mktemp("deeplab") / "model.ckpt"),
                    write_meta_graph=False)


@pytest.fixture(scope="module")
def abstract_models():
  """Output stride -> DeepLabV3Plus on Xception-65, shapes only."""
  return {output_stride: nnx.eval_shape(lambda: build_model(
      xception_config(output_stride=output_stride), NUM_CLASSES, rngs=nnx.Rngs(0)))
          for output_stride in (16, 8)}


def zeros_state(model):
  """(params, batch_stats) pure dicts of zeros, as steps.init_model returns them."""
  _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  as_zeros = lambda state: jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                                        nnx.to_pure_dict(state))
  return as_zeros(params), as_zeros(stats)


def flat_backbone(params, stats):
  return {**convert.flatten(params["backbone"]), **convert.flatten(stats["backbone"])}


# --- architecture -------------------------------------------------------------------------------

def test_block_layouts_follow_deeplab_stack_blocks_dense():
  unstrided = [BlockLayout(stride=2, rate=1)] * 3
  assert block_layouts(16) == (*unstrided, BlockLayout(1, 1), BlockLayout(1, 1), BlockLayout(1, 2))
  assert block_layouts(8) == (*unstrided[:2], BlockLayout(1, 1), BlockLayout(1, 2),
                              BlockLayout(1, 2), BlockLayout(1, 4))
  assert block_layouts(32) == (*unstrided, BlockLayout(1, 1), BlockLayout(2, 1), BlockLayout(1, 1))
  with pytest.raises(ValueError, match="output_stride"):
    block_layouts(4)


@pytest.mark.parametrize("output_stride, size, expected", [
    (16, 513, (129, 65, 33, 33)),
    (8, 513, (129, 65, 65, 65)),
    # Even sizes: DeepLab's fixed padding maps n -> ceil(n / 2) per stride 2 as well.
    (16, 512, (128, 64, 32, 32)),
    (16, 34, (9, 5, 3, 3)),
])
def test_feature_shapes_and_channels(abstract_models, output_stride, size, expected):
  backbone = abstract_models[output_stride].backbone
  features = nnx.eval_shape(lambda m, x: m(x, train=False), backbone,
                            jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
  channels = {"stride4": 256, "stage2": 256, "stage3": 1024, "stage4": 2048}
  assert backbone.out_features == channels
  for name, spatial in zip(("stride4", "stage2", "stage3", "stage4"), expected):
    assert features[name].shape == (2, spatial, spatial, channels[name]), name


def test_parameter_count_matches_deeplab_layer_list(abstract_models):
  params, stats = zeros_state(abstract_models[16])
  count = lambda tree: sum(int(np.prod(np.shape(a))) for a in jax.tree.leaves(tree))
  deeplab = deeplab_backbone_shapes()
  is_statistic = lambda name: name.endswith(("moving_mean", "moving_variance"))
  deeplab_params = sum(int(np.prod(s)) for n, s in deeplab.items() if not is_statistic(n))
  deeplab_stats = sum(int(np.prod(s)) for n, s in deeplab.items() if is_statistic(n))
  assert count(params["backbone"]) == deeplab_params == 37_867_312
  assert count(stats["backbone"]) == deeplab_stats == 185_200


def test_backbone_bn_epsilon_is_deeplabs_whatever_the_config(abstract_models):
  backbone = abstract_models[16].backbone
  assert backbone.entry_flow["conv1_1"].bn.epsilon == BN_EPSILON
  assert abstract_models[16].aspp.projection.bn.epsilon == base_config().model.bn_epsilon


# --- converter ----------------------------------------------------------------------------------

def test_deeplab_checkpoint_converts_and_loads_with_every_name_mapped(
    checkpoint_prefix, deeplab_arrays, abstract_models):
  weights = deeplab_xception.read_deeplab_xception(checkpoint_prefix, xception_config())
  params, stats = zeros_state(abstract_models[16])
  loaded_params, loaded_stats = convert.load_backbone(params, stats, weights,
                                                      source=checkpoint_prefix)
  loaded = flat_backbone(loaded_params, loaded_stats)
  backbone_names = deeplab_backbone_shapes()
  assert len(weights) == len(loaded) == len(backbone_names) == 660

  prefix = "xception_65/middle_flow/block1/unit_16/xception_module/separable_conv3"
  expected = {
      "entry_flow/conv1_1/conv/kernel": deeplab_arrays["xception_65/entry_flow/conv1_1/weights"],
      "entry_flow/conv1_2/bn/scale":
          deeplab_arrays["xception_65/entry_flow/conv1_2/BatchNorm/gamma"],
      "middle_flow/block1/unit_16/separable_conv3_depthwise/conv/kernel":
          deeplab_arrays[f"{prefix}_depthwise/depthwise_weights"].reshape(3, 3, 1, 728),
      "middle_flow/block1/unit_16/separable_conv3_pointwise/bn/var":
          deeplab_arrays[f"{prefix}_pointwise/BatchNorm/moving_variance"],
      "exit_flow/block1/unit_1/shortcut/bn/mean": deeplab_arrays[
          "xception_65/exit_flow/block1/unit_1/xception_module/shortcut/BatchNorm/moving_mean"],
      "exit_flow/block2/unit_1/separable_conv1_depthwise/bn/bias": deeplab_arrays[
          "xception_65/exit_flow/block2/unit_1/xception_module/separable_conv1_depthwise/"
          "BatchNorm/beta"],
  }
  for name, value in expected.items():
    np.testing.assert_array_equal(loaded[name], value, err_msg=name)
  # Every backbone tensor of the checkpoint landed somewhere (random values: sums are unique).
  fingerprint = lambda arrays: sorted(round(float(np.sum(a, dtype=np.float64)), 6) for a in arrays)
  assert fingerprint(loaded.values()) == fingerprint(deeplab_arrays[n] for n in backbone_names)
  # The heads are untouched.
  assert loaded_params["aspp"] is params["aspp"]


def test_converted_backbone_reproduces_deeplab_activations(
    checkpoint_prefix, deeplab_arrays, abstract_models):
  weights = deeplab_xception.read_deeplab_xception(checkpoint_prefix, xception_config())
  images = np.random.default_rng(1).uniform(-1, 1, (2, 35, 30, 3)).astype(np.float32)
  for output_stride in (16, 8):
    ours = backbone_features(abstract_models[output_stride], weights, images)
    reference = deeplab_reference_features(deeplab_arrays, images, output_stride)
    for name, value in reference.items():
      scale = float(np.max(np.abs(value)))
      assert ours[name].shape == value.shape, (output_stride, name)
      np.testing.assert_allclose(ours[name], value, rtol=0, atol=2e-5 * scale,
                                 err_msg=f"OS {output_stride} {name}")


def test_missing_wrongly_shaped_and_unknown_variables_are_named(deeplab_arrays, abstract_models):
  arrays = {name: deeplab_arrays[name] for name in deeplab_backbone_shapes()}
  scope = "xception_65/entry_flow/block3/unit_1/xception_module"
  del arrays[f"{scope}/separable_conv2_pointwise/BatchNorm/beta"]
  arrays[f"{scope}/shortcut/weights"] = np.zeros((1, 1, 256, 512), np.float32)
  arrays["xception_65/entry_flow/conv1_1/biases"] = np.zeros((32,), np.float32)
  weights = deeplab_xception.convert_variables(arrays)
  params, stats = zeros_state(abstract_models[16])
  with pytest.raises(ValueError) as error:
    convert.load_backbone(params, stats, weights, source="test.ckpt")
  message = str(error.value)
  assert "missing (1): entry_flow/block3/unit_1/separable_conv2_pointwise/bn/bias" in message
  assert "unexpected (1): xception_65/entry_flow/conv1_1/biases" in message
  assert ("shape mismatch: entry_flow/block3/unit_1/shortcut/conv/kernel: file (1, 1, 256, 512), "
          "model (1, 1, 256, 728)") in message


def test_skips_exactly_the_non_backbone_variables(deeplab_arrays):
  skipped = {name for name in deeplab_arrays if deeplab_xception.is_skipped(name)}
  assert skipped == {*NON_BACKBONE_SHAPES, "global_step"}


def test_refuses_other_backbones_and_other_checkpoints(checkpoint_prefix, tmp_path):
  with pytest.raises(ValueError, match="model.backbone is 'resnet50'"):
    deeplab_xception.read_deeplab_xception(checkpoint_prefix, xception_config(backbone="resnet50"))
  saver = tf.compat.v1.train.Saver(var_list={"resnet_v1_50/conv1/weights": tf.Variable(
      np.zeros((7, 7, 3, 64), np.float32))})
  other = saver.save(None, str(tmp_path / "resnet.ckpt"), write_meta_graph=False)
  with pytest.raises(ValueError, match="not a DeepLab Xception-65 checkpoint"):
    deeplab_xception.read_deeplab_xception(other, xception_config())


# --- helpers: our forward pass and DeepLab's, from the same tensors ------------------------------

def backbone_features(abstract_model, weights, images) -> dict[str, np.ndarray]:
  """Our backbone's inference features with `weights` loaded (heads left at zero)."""
  params, stats = convert.load_backbone(*zeros_state(abstract_model), weights, source="test")
  graphdef, param_state, stat_state = nnx.split(abstract_model, nnx.Param, nnx.BatchStat)

  @jax.jit
  def run(params, stats, images):
    nnx.replace_by_pure_dict(param_state, params)
    nnx.replace_by_pure_dict(stat_state, stats)
    model = nnx.merge(graphdef, param_state, stat_state)
    return model.backbone(images, train=False)

  return jax.tree.map(np.asarray, run(params, stats, images))


def deeplab_reference_features(arrays, images, output_stride) -> dict[str, np.ndarray]:
  """DeepLab's xception_65 in inference mode, by tf.nn ops on the checkpoint's tensors.

  DeepLab's rules: conv + BN (+ ReLU); stride-1 convs pad 'SAME', strided ones pad (k-1)*rate
  explicitly (pad_beg = total // 2) then 'VALID'; the blocks reach the output stride with
  stack_blocks_dense (stride 1 and a growing rate once the target stride is reached).
  """
  def conv_bn(x, scope, *, stride=1, rate=1, depthwise=False, relu=False, fixed_padding=True):
    kernel = arrays[f"xception_65/{scope}/{'depthwise_weights' if depthwise else 'weights'}"]
    padding = "SAME"
    if stride > 1 and fixed_padding:
      total = (kernel.shape[0] - 1) * rate
      begin, end = total // 2, total - total // 2
      x = tf.pad(x, [[0, 0], [begin, end], [begin, end], [0, 0]])
      padding = "VALID"
    if depthwise:
      x = tf.nn.depthwise_conv2d(x, kernel, [1, stride, stride, 1], padding,
                                 dilations=[rate, rate])
    else:
      x = tf.nn.conv2d(x, kernel, stride, padding, dilations=rate)
    bn = {leaf: arrays[f"xception_65/{scope}/BatchNorm/{leaf}"] for leaf in BN_LEAVES}
    x = tf.nn.batch_normalization(x, bn["moving_mean"], bn["moving_variance"], bn["beta"],
                                  bn["gamma"], BN_EPSILON)
    return tf.nn.relu(x) if relu else x

  x = conv_bn(tf.constant(images), "entry_flow/conv1_1", stride=2, relu=True)
  x = conv_bn(x, "entry_flow/conv1_2", relu=True)
  target, current_stride, rate, features = output_stride // 2, 1, 1, {}
  for scope, _, _, units, skip, block_stride, activation_inside in DEEPLAB_BLOCKS:
    for unit in range(1, units + 1):
      if current_stride == target:
        stride, unit_rate, rate = 1, rate, rate * block_stride
      else:
        stride, unit_rate, current_stride = block_stride, 1, current_stride * block_stride
      prefix = f"{scope}/unit_{unit}/xception_module"
      residual = x
      for index in (1, 2, 3):
        if not activation_inside:
          residual = tf.nn.relu(residual)
        residual = conv_bn(residual, f"{prefix}/separable_conv{index}_depthwise",
                           stride=stride if index == 3 else 1, rate=unit_rate, depthwise=True,
                           relu=activation_inside)
        residual = conv_bn(residual, f"{prefix}/separable_conv{index}_pointwise",
                           relu=activation_inside)
        if scope == "entry_flow/block2" and index == 2:
          features["stride4"] = residual
      if skip == "conv":
        # A plain slim.conv2d: 'SAME' even when strided.
        residual += conv_bn(x, f"{prefix}/shortcut", stride=stride, fixed_padding=False)
      elif skip == "sum":
        residual += x
      x = residual
    features[scope] = x
  return {"stride4": features["stride4"].numpy(), "stage2": features["entry_flow/block2"].numpy(),
          "stage3": features["exit_flow/block1"].numpy(),
          "stage4": features["exit_flow/block2"].numpy()}
