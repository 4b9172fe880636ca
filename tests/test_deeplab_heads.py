"""DeepLab's own head details as config fields: separable ASPP / decoder convs, the heads' BN
momentum, Xception's classifier init, biases at a multiple of the learning rate.

The reference architecture is DeepLab's layer list for xception_65 + ASPP + decoder
(googleinterns/wss core/model.py extract_features and refine_by_decoder with
aspp_with_separable_conv and decoder_use_separable_conv, third_party/deeplab/common.py:71,96),
written out here independently of the model code.
Xception-65 is only built abstractly (nnx.eval_shape); real compute uses resnet_tiny, narrow heads.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pseudoseg_jax import recipes, steps
from pseudoseg_jax.config import base_config, validate
from pseudoseg_jax.models import build_model, conv
from pseudoseg_jax.models.deeplab import ClassificationHead, Decoder, SeparableConvBN
from pseudoseg_jax.models.resnet import GhostBatchNorm, NormConfig
from test_models import tiny_config
from test_xception import deeplab_backbone_shapes

NUM_CLASSES = 21
# A truncated normal cut at 2 stddev (TF's and JAX's) has 0.8796 times the stddev of the normal.
TRUNCATED_STD_RATIO = 0.8796


def count(tree) -> int:
  return sum(int(np.prod(np.shape(a))) for a in jax.tree.leaves(tree))


def deeplab_head_shapes(num_classes: int = NUM_CLASSES, features: int = 2048,
                        low_level: int = 256, depth: int = 256, projected: int = 48) -> dict:
  """DeepLab variable name -> shape of the ASPP and decoder (trainable variables only: weights,
  BN gamma/beta, logits biases), from its layer list."""
  shapes = {}

  def conv_bn(scope, kernel_shape, *, depthwise=False):
    leaf = "depthwise_weights" if depthwise else "weights"
    shapes[f"{scope}/{leaf}"] = kernel_shape
    channels = kernel_shape[2] if depthwise else kernel_shape[3]
    shapes[f"{scope}/BatchNorm/gamma"] = shapes[f"{scope}/BatchNorm/beta"] = (channels,)

  def split_separable(scope, in_channels, out_channels):
    conv_bn(f"{scope}_depthwise", (3, 3, in_channels, 1), depthwise=True)
    conv_bn(f"{scope}_pointwise", (1, 1, in_channels, out_channels))

  conv_bn("image_pooling", (1, 1, features, depth))
  conv_bn("aspp0", (1, 1, features, depth))
  for branch in (1, 2, 3):
    split_separable(f"aspp{branch}", features, depth)
  conv_bn("concat_projection", (1, 1, 5 * depth, depth))
  conv_bn("decoder/feature_projection0", (1, 1, low_level, projected))
  split_separable("decoder/decoder_conv0", depth + projected, depth)
  split_separable("decoder/decoder_conv1", depth, depth)
  shapes["logits/semantic/weights"] = (1, 1, depth, num_classes)
  shapes["logits/semantic/biases"] = (num_classes,)
  return shapes


def as_flax_shape(name, shape):
  """TF stores a depthwise kernel as [kh, kw, C, 1], flax as [kh, kw, 1, C]."""
  return (*shape[:2], 1, shape[2]) if name.endswith("depthwise_weights") else shape


def params_of(model) -> dict:
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.fixture(scope="module")
def xception_heads():
  """DeepLabV3Plus on Xception-65 with the original's heads, shapes only."""
  config = base_config()
  recipes.use_deeplab_xception_heads(config)
  return nnx.eval_shape(lambda: build_model(config.model, NUM_CLASSES, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def tiny_separable():
  return build_model(tiny_config(separable_heads=True, bn_momentum=0.5, head_bn_momentum=0.9997),
                     5, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))


# --- architecture -------------------------------------------------------------------------------

def test_xception_separable_heads_match_deeplabs_parameter_count(xception_heads):
  params = params_of(xception_heads)
  deeplab = deeplab_head_shapes()
  decoder_names = [n for n in deeplab if n.startswith(("decoder/", "logits/"))]
  deeplab_decoder = sum(int(np.prod(deeplab[n])) for n in decoder_names)
  deeplab_aspp = sum(int(np.prod(s)) for n, s in deeplab.items() if n not in decoder_names)
  assert count(params["aspp"]) == deeplab_aspp == 3_019_776
  assert count(params["decoder"]) == deeplab_decoder == 168_325
  ours = sorted(np.shape(a) for a in jax.tree.leaves((params["aspp"], params["decoder"])))
  assert ours == sorted(as_flax_shape(n, s) for n, s in deeplab.items())
  # The whole DeepLabv3+ but PseudoSeg's SGC head: xception_65 (no moving statistics), the heads,
  # and xception_65/logits, a 1x1 conv with biases to the 20 foreground classes.
  backbone = {n: s for n, s in deeplab_backbone_shapes().items() if "moving_" not in n}
  deeplab_total = sum(int(np.prod(s)) for s in [*backbone.values(), *deeplab.values()])
  deeplab_total += 2048 * 20 + 20
  ours_total = count({part: tree for part, tree in params.items() if part != "sgc"})
  assert ours_total == deeplab_total == 37_867_312 + 3_019_776 + 168_325 + 40_980


def test_dense_heads_stay_the_default():
  model = nnx.eval_shape(lambda: build_model(base_config().model, NUM_CLASSES,
                                             rngs=nnx.Rngs(0)))
  params = params_of(model)
  assert params["aspp"]["atrous"][0]["conv"]["kernel"].shape == (3, 3, 2048, 256)
  assert params["decoder"]["fuse"][1]["conv"]["kernel"].shape == (3, 3, 256, 256)
  for module in (model.aspp, model.decoder):
    for _, layer in module.iter_modules():
      if isinstance(layer, GhostBatchNorm):
        assert layer.momentum == 0.9


def test_separable_heads_shapes_and_train_forward(tiny_separable):
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 33, 33, 3)), jnp.float32)
  outputs = tiny_separable(images, train=True, rngs=nnx.Rngs(0))
  assert outputs["logits"].shape == (2, 9, 9, 5)
  assert outputs["cls_logits"].shape == (2, 4)
  assert np.isfinite(np.asarray(outputs["logits"])).all()
  params = params_of(tiny_separable)
  atrous = params["aspp"]["atrous"]
  assert [atrous[i]["conv_depthwise"]["kernel"].shape for i in range(3)] == [(3, 3, 1, 512)] * 3
  assert atrous[0]["conv_pointwise"]["kernel"].shape == (1, 1, 512, 16)
  assert params["decoder"]["fuse"][0]["conv_depthwise"]["kernel"].shape == (3, 3, 1, 24)
  for layer in tiny_separable.aspp.atrous:  # The project's conv path (CPU fast path for depthwise).
    assert layer.conv_depthwise.conv_general_dilated is conv.conv_general_dilated
    assert layer.conv_pointwise.conv_general_dilated is conv.conv_general_dilated
  assert [layer.conv_depthwise.kernel_dilation for layer in tiny_separable.aspp.atrous] == [
      6, 12, 18]


def test_separable_conv_is_depthwise_bn_relu_then_pointwise_bn_relu():
  """Against lax: atrous depthwise conv ('SAME'), BN, ReLU, 1x1 conv, BN, ReLU (inference BN with
  fresh statistics: x / sqrt(1 + eps))."""
  layer = SeparableConvBN(4, 3, dilation=2, norm=NormConfig(), rngs=nnx.Rngs(0))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 9, 9, 4)), jnp.float32)
  depthwise = jax.lax.conv_general_dilated(
      x, layer.conv_depthwise.kernel[...], (1, 1), "SAME", rhs_dilation=(2, 2),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=4)
  scale = 1 / np.sqrt(1 + 1e-5)
  hidden = jax.nn.relu(depthwise * scale)
  expected = jax.nn.relu(jnp.einsum("nhwc,co->nhwo", hidden,
                                    layer.conv_pointwise.kernel[...][0, 0]) * scale)
  np.testing.assert_allclose(layer(x, train=False), expected, rtol=1e-5, atol=1e-5)


# --- initializers, weight decay, BN momentum ----------------------------------------------------

def assert_truncated_normal(kernel, stddev):
  values = np.asarray(kernel).ravel()
  assert np.abs(values).max() <= 2 * stddev
  assert abs(values.mean()) < 4 * stddev / np.sqrt(values.size)
  np.testing.assert_allclose(values.std(), TRUNCATED_STD_RATIO * stddev, rtol=0.05)


def test_separable_initializers_are_deeplabs():
  layer = SeparableConvBN(512, 256, norm=NormConfig(), rngs=nnx.Rngs(0))
  assert_truncated_normal(layer.conv_depthwise.kernel[...], 0.33)  # 4,608 samples.
  assert_truncated_normal(layer.conv_pointwise.kernel[...], 0.06)  # 131,072 samples.


def test_separable_heads_take_deeplabs_dense_and_logits_initializers():
  heads = build_model(tiny_config(separable_heads=True), 5, rngs=nnx.Rngs(0))
  for layer in (heads.aspp.image_pooling, heads.aspp.conv_1x1, heads.aspp.projection,
                heads.decoder.low_level_projection):
    kernel = np.asarray(layer.conv.kernel[...])
    fan_in, fan_out = kernel.shape[2], kernel.shape[3]
    limit = np.sqrt(6 / (fan_in + fan_out))  # Glorot uniform: U(-limit, limit).
    assert np.abs(kernel).max() <= limit
    np.testing.assert_allclose(kernel.std(), limit / np.sqrt(3), rtol=0.15)
  decoder = Decoder(256, 24, low_level_channels=48, channels=256, num_classes=21, separable=True,
                    norm=NormConfig(), rngs=nnx.Rngs(0))
  assert_truncated_normal(decoder.logits.kernel[...], 0.01)  # 5,376 samples.
  dense = build_model(tiny_config(), 5, rngs=nnx.Rngs(0))  # The default: He fan-out.
  kernel = np.asarray(dense.aspp.projection.conv.kernel[...])
  np.testing.assert_allclose(kernel.std(), np.sqrt(2 / kernel.shape[3]), rtol=0.15)


def test_classifier_init_is_xceptions_truncated_normal_when_asked():
  xception = ClassificationHead(2048, 20, dropout=0.5, init_stddev=0.09, rngs=nnx.Rngs(0))
  assert_truncated_normal(xception.linear.kernel[...], 0.09)
  assert not np.asarray(xception.linear.bias[...]).any()
  # Default: slim's variance_scaling_initializer (fan-in, scale 2) whose std is sqrt(2 / fan_in).
  default = ClassificationHead(2048, 20, dropout=0.5, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(default.linear.kernel[...]).std(), np.sqrt(2 / 2048),
                             rtol=0.05)


def test_separable_depthwise_kernels_are_not_weight_decayed(tiny_separable):
  mask = steps.weight_decay_mask(params_of(tiny_separable))
  for layer in [*mask["aspp"]["atrous"].values(), *mask["decoder"]["fuse"].values()]:
    assert layer["conv_depthwise"]["kernel"] is False
    assert layer["conv_pointwise"]["kernel"] is True
    assert not any(jax.tree.leaves((layer["bn_depthwise"], layer["bn_pointwise"])))
  assert mask["aspp"]["conv_1x1"]["conv"]["kernel"] is True


def test_head_bn_momentum_reaches_the_head_batch_norms(tiny_separable, xception_heads):
  for model, backbone_momentum in ((tiny_separable, 0.5), (xception_heads, 0.9997)):
    momenta = {"aspp": set(), "decoder": set(), "backbone": set()}
    for part in momenta:
      for _, layer in getattr(model, part).iter_modules():
        if isinstance(layer, GhostBatchNorm):
          momenta[part].add(layer.momentum)
    assert momenta == {"aspp": {0.9997}, "decoder": {0.9997}, "backbone": {backbone_momentum}}


def test_head_bn_momentum_drives_the_running_averages(tiny_separable, monkeypatch):
  images = jnp.asarray(np.random.default_rng(2).normal(size=(2, 33, 33, 3)), jnp.float32)
  model = nnx.clone(tiny_separable)
  bn = model.aspp.projection.bn
  before = np.asarray(bn.mean[...])
  batch_means = []
  call = GhostBatchNorm.__call__

  def recording_call(self, x, use_running_average=None):
    if self is bn:
      batch_means.append(np.asarray(jnp.mean(x, axis=(0, 1, 2))))
    return call(self, x, use_running_average)

  monkeypatch.setattr(GhostBatchNorm, "__call__", recording_call)
  model(images, train=True, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(bn.mean[...], 0.9997 * before + 0.0003 * batch_means[0],
                             rtol=1e-5, atol=1e-7)


# --- biases at a multiple of the learning rate --------------------------------------------------

def optimizer_config(multiplier):
  config = base_config()
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.weight_decay = 0.0
  config.optimizer.poly_power = 0.0  # A constant rate.
  config.optimizer.bias_lr_multiplier = multiplier
  return config


def test_bias_multiplier_doubles_conv_and_linear_bias_steps_only():
  params = {"conv": {"kernel": jnp.ones(2), "bias": jnp.ones(2)},
            "bn": {"scale": jnp.ones(2), "bias": jnp.ones(2)}, "offset": jnp.ones(2)}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = steps.make_optimizer(optimizer_config(2.0))
  state = tx.init(params)
  first, state = tx.update(grads, state, params)
  second, _ = tx.update(grads, state, params)
  # SGD with momentum 0.9 at lr 0.1 on a gradient of 1: steps -0.1, then -0.19 (trace 1.9).
  expected_first = {"conv": {"kernel": -0.1, "bias": -0.2}, "bn": {"scale": -0.1, "bias": -0.1},
                    "offset": -0.1}
  expected_second = jax.tree.map(lambda v: 1.9 * v, expected_first)
  for got, want in ((first, expected_first), (second, expected_second)):
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, np.full(2, w), rtol=1e-6), got, want)
  # The optimizer state keeps its structure: a run may resume with another multiplier.
  plain = steps.make_optimizer(optimizer_config(1.0))
  assert jax.tree.structure(plain.init(params)) == jax.tree.structure(tx.init(params))


def test_bias_mask_picks_the_logits_and_classifier_biases(tiny_separable):
  mask = steps.layer_bias_mask(params_of(tiny_separable))
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert sorted(path for path, is_bias in flat.items() if is_bias) == [
      "['cls_head']['linear']['bias']", "['decoder']['logits']['bias']"]


# --- config and recipe --------------------------------------------------------------------------

@pytest.mark.parametrize("section, field, value", [
    ("model", "separable_heads", 1), ("model", "head_bn_momentum", 1.5),
    ("model", "cls_init_stddev", -0.1), ("optimizer", "bias_lr_multiplier", 0.0)])
def test_bad_values_name_the_field(section, field, value):
  config = base_config()
  with config.ignore_type():
    config[section][field] = value
  with pytest.raises(ValueError, match=f"{section}.{field}"):
    validate(config)


def test_xception_recipe_uses_the_originals_values():
  config = base_config()
  recipes.use_deeplab_xception_heads(config)
  validate(config)
  assert config.model.backbone == "xception65"
  assert config.model.separable_heads is True
  assert config.model.bn_momentum == config.model.head_bn_momentum == 0.9997
  assert config.model.cls_init_stddev == 0.09
  assert config.optimizer.bias_lr_multiplier == 2.0
