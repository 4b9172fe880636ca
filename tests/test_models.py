"""DeepLabv3+ / ResNet: shapes, dilation layout, BN and dropout modes, config checks, and the
split -> pure dicts -> jit(merge) round trip the trainer relies on.

Real compute only on resnet_tiny with narrow heads and small images; ResNet-50 via nnx.eval_shape.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pseudoseg_jax.config import base_config
from pseudoseg_jax.models import build_model, feature_size
from pseudoseg_jax.models.resnet import StageLayout, max_pool_3x3_stride2, stage_layouts

NUM_CLASSES = 5


def tiny_config(**overrides):
  config = base_config().model
  config.backbone = "resnet_tiny"
  config.aspp_channels = 16
  config.decoder_channels = 16
  config.low_level_channels = 8
  for field, value in overrides.items():
    config[field] = value
  return config


def output_shapes(model, input_shape, *, train=False):
  images = jax.ShapeDtypeStruct(input_shape, jnp.float32)
  outputs = nnx.eval_shape(
      lambda m, x: m(x, train=train, rngs=nnx.Rngs(0) if train else None), model, images)
  return jax.tree.map(lambda a: (a.shape, a.dtype), outputs)


def abstract_model(**overrides):
  config = base_config().model
  for field, value in overrides.items():
    config[field] = value
  return nnx.eval_shape(lambda: build_model(config, 21, rngs=nnx.Rngs(0)))


def batch_stats(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


def trees_equal(a, b):
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)))


@pytest.fixture(scope="module")
def resnet50_deep_stem_os8():
  return abstract_model(deep_stem=True, output_stride=8)


@pytest.fixture(scope="module")
def images():
  return jnp.asarray(np.random.default_rng(0).normal(size=(4, 65, 65, 3)), jnp.float32)


@pytest.fixture(scope="module")
def tiny_model():
  # An 'rbg' key: XLA compiles threefry initializers slowly on CPU (~15 s for this model vs ~4 s).
  return build_model(tiny_config(), NUM_CLASSES, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))


# --- layout -------------------------------------------------------------------------------------

def test_stage_layouts_follow_torchvision_replace_stride_with_dilation():
  undilated = StageLayout(stride=2, first_block_dilation=1, dilation=1)
  assert stage_layouts(16)[1:] == (undilated, undilated, StageLayout(1, 1, 2))
  assert stage_layouts(8)[1:] == (undilated, StageLayout(1, 1, 2), StageLayout(1, 2, 4))
  assert stage_layouts(32)[1:] == (undilated,) * 3


def test_resnet50_os8_block_dilations(resnet50_deep_stem_os8):
  backbone = resnet50_deep_stem_os8.backbone
  assert [block.conv2.kernel_dilation for block in backbone.layer3] == [1, 2, 2, 2, 2, 2]
  assert [block.conv2.kernel_dilation for block in backbone.layer4] == [2, 4, 4]
  assert [block.conv2.strides for block in backbone.layer3] == [1] * 6
  assert backbone.layer4[1].conv2.padding == ((4, 4), (4, 4))
  assert backbone.layer3[0].downsample.conv.strides == 1
  assert backbone.layer2[0].conv2.strides == 2


def test_max_pool_pads_with_minus_infinity():
  x = -jnp.ones((1, 5, 6, 2))
  out = max_pool_3x3_stride2(x)
  assert out.shape == (1, 3, 3, 2)
  np.testing.assert_array_equal(out, -1.0)


def test_feature_size():
  assert [feature_size(513, s) for s in (4, 8, 16)] == [129, 65, 33]
  assert [feature_size(97, s) for s in (4, 8, 16)] == [25, 13, 7]


# --- shapes -------------------------------------------------------------------------------------

def assert_resnet50_shapes_513(model, deep_size):
  shapes = output_shapes(model, (2, 513, 513, 3))
  assert shapes["logits"] == ((2, 129, 129, 21), jnp.float32)
  assert shapes["cls_logits"] == ((2, 20), jnp.float32)
  features = shapes["features"]
  assert features["stride4"][0] == (2, 129, 129, 256)
  assert features["stage2"][0] == (2, 65, 65, 512)
  assert features["stage3"][0] == (2, deep_size, deep_size, 1024)
  assert features["stage4"][0] == (2, deep_size, deep_size, 2048)


def test_resnet50_os16_shapes_513():
  assert_resnet50_shapes_513(abstract_model(output_stride=16), deep_size=33)


def test_resnet50_deep_stem_os8_shapes_513(resnet50_deep_stem_os8):
  assert_resnet50_shapes_513(resnet50_deep_stem_os8, deep_size=65)


def test_deep_stem_widths(resnet50_deep_stem_os8):
  backbone = resnet50_deep_stem_os8.backbone
  assert backbone.stem_conv1.kernel.shape == (3, 3, 3, 64)
  assert backbone.stem_conv1.strides == 2
  assert backbone.stem_conv3.kernel.shape == (3, 3, 64, 128)
  assert backbone.layer1[0].conv1.kernel.shape == (1, 1, 128, 64)
  assert not hasattr(backbone, "conv1")


def test_resnet50_deep_stem_matches_unimatch_parameter_count(resnet50_deep_stem_os8):
  params = nnx.to_pure_dict(nnx.state(resnet50_deep_stem_os8, nnx.Param))
  counts = {part: sum(x.size for x in jax.tree.leaves(tree)) for part, tree in params.items()}
  # UniMatch's PyTorch DeepLabv3+ (deep-stem ResNet-50, no classification or SGC head): 40,475,957.
  assert sum(counts.values()) - counts["cls_head"] - counts["sgc"] == 40_475_957
  assert counts["cls_head"] == 2048 * 20 + 20
  # Key and query 1x1 convs on the 1024 + 2048 hypercolumn, the 21 x 21 mix, the norm's offset.
  assert counts["sgc"] == 2 * (1024 + 2048) * 128 + 21 * 21 + 21


@pytest.mark.parametrize("output_stride,deep_size", [(16, 5), (8, 9)])
def test_tiny_shapes_65(output_stride, deep_size):
  config = tiny_config(output_stride=output_stride, deep_stem=True)
  model = nnx.eval_shape(lambda: build_model(config, NUM_CLASSES, rngs=nnx.Rngs(0)))
  shapes = output_shapes(model, (3, 65, 65, 3))
  assert shapes["logits"][0] == (3, 17, 17, NUM_CLASSES)
  assert shapes["cls_logits"][0] == (3, NUM_CLASSES - 1)
  assert shapes["features"]["stride4"][0] == (3, 17, 17, 64)
  assert shapes["features"]["stage4"][0] == (3, deep_size, deep_size, 512)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  config = tiny_config(dtype="bfloat16")
  model = nnx.eval_shape(lambda: build_model(config, NUM_CLASSES, rngs=nnx.Rngs(0)))
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert {p.dtype for p in params} == {jnp.dtype(jnp.float32)}
  shapes = output_shapes(model, (2, 33, 33, 3), train=True)
  assert shapes["logits"][1] == jnp.float32
  assert shapes["features"]["stage4"][1] == jnp.bfloat16


def test_eager_tiny_forward_matches_eval_shape(tiny_model, images):
  outputs = tiny_model(images, train=False)
  assert outputs["logits"].shape == (4, 17, 17, NUM_CLASSES)
  assert outputs["cls_logits"].shape == (4, NUM_CLASSES - 1)
  assert bool(jnp.isfinite(outputs["logits"]).all())


# --- train / eval behaviour ---------------------------------------------------------------------

def test_batch_norm_statistics_change_only_in_training(tiny_model, images):
  model = nnx.clone(tiny_model)
  before = batch_stats(model)
  model(images, train=False)
  assert trees_equal(before, batch_stats(model))
  model(images, train=True, rngs=nnx.Rngs(1))
  after = batch_stats(model)
  changed = jax.tree.map(lambda x, y: not bool(jnp.array_equal(x, y)), before, after)
  assert all(jax.tree.leaves(changed))


def test_dropout_only_in_training_and_driven_by_call_rngs(tiny_model, images):
  model = nnx.clone(tiny_model)  # Training calls update BN statistics; keep the fixture intact.
  eval_a = model(images, train=False, rngs=nnx.Rngs(1))
  eval_b = model(images, train=False, rngs=nnx.Rngs(2))
  np.testing.assert_array_equal(eval_a["logits"], eval_b["logits"])
  np.testing.assert_array_equal(eval_a["cls_logits"], eval_b["cls_logits"])
  train_a = model(images, train=True, rngs=nnx.Rngs(dropout=1))
  train_a_again = model(images, train=True, rngs=nnx.Rngs(dropout=1))
  train_b = model(images, train=True, rngs=nnx.Rngs(dropout=2))
  np.testing.assert_array_equal(train_a["logits"], train_a_again["logits"])
  assert not np.allclose(train_a["logits"], train_b["logits"])
  assert not np.allclose(train_a["cls_logits"], train_b["cls_logits"])


def test_training_without_rngs_is_an_error(tiny_model, images):
  with pytest.raises(ValueError, match="rngs"):
    tiny_model(images, train=True)


# --- the functional boundary used by the trainer --------------------------------------------------

def test_split_pure_dicts_jit_merge_round_trip(tiny_model, images):
  graphdef, params, stats = nnx.split(tiny_model, nnx.Param, nnx.BatchStat)
  params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)

  @jax.jit
  def forward(params, stats, images, key):
    model = nnx.merge(graphdef, params, stats)
    outputs = model(images, train=True, rngs=nnx.Rngs(dropout=key))
    return outputs, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

  key = jax.random.key(3)
  outputs, new_stats = forward(params, stats, images, key)
  eager_model = nnx.clone(tiny_model)
  expected = eager_model(images, train=True, rngs=nnx.Rngs(dropout=key))
  np.testing.assert_allclose(outputs["logits"], expected["logits"], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(outputs["cls_logits"], expected["cls_logits"], rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               new_stats, batch_stats(eager_model))
  assert not trees_equal(new_stats, stats)
  assert trees_equal(stats, batch_stats(tiny_model))  # The inputs were not mutated.


# --- config validation --------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("output_stride", 32, "model.output_stride must be 8 or 16, got 32"),
    ("backbone", "resnet34", "model.backbone must be one of .*got 'resnet34'"),
    ("deep_stem", 1, "model.deep_stem"),
    ("aspp_rates", (6, 12), "model.aspp_rates"),
    ("aspp_channels", 0, "model.aspp_channels"),
    ("decoder_channels", 2.5, "model.decoder_channels"),
    ("low_level_channels", -1, "model.low_level_channels"),
    ("aspp_dropout", 1.0, "model.aspp_dropout"),
    ("cls_dropout", -0.1, "model.cls_dropout"),
    ("bn_momentum", 1.5, "model.bn_momentum"),
    ("bn_epsilon", 0.0, "model.bn_epsilon"),
    ("dtype", "float16", "model.dtype must be one of .*got 'float16'"),
])
def test_bad_config_values_name_the_field(field, value, message):
  config = tiny_config()
  config.unlock()
  config[field] = None  # Clear the type so ConfigDict accepts a wrongly typed value.
  config[field] = value
  with pytest.raises(ValueError, match=message):
    build_model(config, NUM_CLASSES, rngs=nnx.Rngs(0))


def test_missing_config_field_is_named():
  config = tiny_config()
  del config["aspp_rates"]
  with pytest.raises(ValueError, match="model.aspp_rates is missing"):
    build_model(config, NUM_CLASSES, rngs=nnx.Rngs(0))
