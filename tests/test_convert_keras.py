"""Keras applications ResNet -> our ResNet (variant 'keras'): every file layout Keras writes,
activation parity with Keras on random weights, and the refusals.

Keras's ResNets have output stride 32. Our ResNet class builds OS 32 directly, so all four stages
are compared there; the configured DeepLab model (OS 16 only, trading stage 4's stride for
dilation) is compared on stages 1-3, which OS 16 leaves as they are.
"""

import functools
import shutil

import h5py
import jax
import keras
import numpy as np
import pytest
from flax import nnx

from pseudoseg_jax import convert
from pseudoseg_jax.config import base_config
from pseudoseg_jax.convert import keras_resnet
from pseudoseg_jax.convert.keras_resnet import KERAS_BN_EPSILON
from pseudoseg_jax.models import build_model
from pseudoseg_jax.models.resnet import (RESNET_SPECS, NormConfig, ResNet,
                                         max_pool_3x3_stride2)

# Keras's stage outputs, in the order of our feature names.
KERAS_STAGE_OUTPUTS = {
    "resnet50": ("conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
}
FEATURES = ("stride4", "stage2", "stage3", "stage4")
# The downloadable ImageNet files' layout, the installed Keras's save_weights, save('.h5') and
# save('.keras').
LAYOUTS = ("imagenet.h5", "save_weights.weights.h5", "model_save.h5", "model.keras")


def keras_config(**overrides):
  config = base_config().model
  config.resnet_variant = "keras"
  config.bn_epsilon = KERAS_BN_EPSILON
  for field, value in overrides.items():
    config[field] = value
  return config


def randomize(model, seed=0):
  """Random conv biases and BN parameters and statistics: zeros and ones would hide swaps."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      width = layer.gamma.shape[0]
      layer.set_weights([rng.uniform(0.5, 1.5, width), rng.normal(0, 0.2, width),
                         rng.normal(0, 0.2, width), rng.uniform(0.5, 1.5, width)])
    elif isinstance(layer, keras.layers.Conv2D):
      kernel, bias = layer.get_weights()
      layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape)])
  return model


def write_imagenet_layout(model, path, *, values=True):
  """The layout of the downloadable ImageNet files (Keras 2 save_weights): one group per layer,
  attribute 'weight_names' such as b'conv1_conv/kernel:0', datasets at those paths.

  values=False writes shapes only (HDF5 reads unwritten datasets as zeros): fast for big models.
  """
  with h5py.File(path, "w") as h5:
    h5.attrs["layer_names"] = np.array([layer.name.encode() for layer in model.layers])
    h5.attrs["backend"] = b"tensorflow"
    h5.attrs["keras_version"] = b"2.2.4"
    for layer in model.layers:
      group = h5.create_group(layer.name)
      names = [f"{layer.name}/{variable.name}:0" for variable in layer.weights]
      group.attrs["weight_names"] = np.array([name.encode() for name in names], dtype="S")
      for name, variable in zip(names, layer.weights):
        if values:
          group.create_dataset(name, data=np.asarray(variable))
        else:
          group.create_dataset(name, shape=variable.shape, dtype=variable.dtype)


def write_layout(model, layout, path):
  if layout == "imagenet.h5":
    write_imagenet_layout(model, path)
  elif layout == "save_weights.weights.h5":
    model.save_weights(path)
  else:
    model.save(path)


@functools.cache
def abstract_model(**overrides):
  """The DeepLab model of keras_config(**overrides), shapes only; cached: tracing ResNet-101 takes
  seconds, and no test changes it."""
  config = keras_config(**overrides)
  return nnx.eval_shape(lambda: build_model(config, 21, rngs=nnx.Rngs(0)))


def backbone_shapes(**overrides):
  _, params, stats = nnx.split(abstract_model(**overrides), nnx.Param, nnx.BatchStat)
  return convert.expected_shapes(nnx.to_pure_dict(params)["backbone"],
                                 nnx.to_pure_dict(stats)["backbone"])


def zeros_like(state):
  return jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), nnx.to_pure_dict(state))


def loaded_forward(abstract, weights, run):
  """jit(run(module, images)) on `abstract` with its backbone loaded by convert.load_backbone
  (the rest zeros), `abstract` being a DeepLab model or, wrapped as {'backbone': ...}, a ResNet."""
  graphdef, params, stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
  params, stats = zeros_like(params), zeros_like(stats)
  wrapped = "backbone" not in params
  if wrapped:
    params, stats = {"backbone": params}, {"backbone": stats}
  params, stats = convert.load_backbone(params, stats, weights, source="keras test file")
  if wrapped:
    params, stats = params["backbone"], stats["backbone"]
  forward = jax.jit(lambda p, s, x: run(nnx.merge(graphdef, p, s), x))
  return lambda images: forward(params, stats, images)


def keras_stages(model, backbone):
  return keras.Model(model.input, [model.get_layer(name).output
                                   for name in KERAS_STAGE_OUTPUTS[backbone]])


def stage_errors(ours, reference, names):
  """{feature: (max abs error, max abs value)}; the shapes must agree."""
  errors = {}
  for name, expected in zip(names, reference):
    actual = np.asarray(ours[name])
    expected = np.asarray(expected)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    errors[name] = (float(np.abs(actual - expected).max()), float(np.abs(expected).max()))
  return errors


def assert_float32_close(errors):
  for name, (error, scale) in errors.items():
    assert error <= 1e-5 * max(1.0, scale), (name, error, scale)


@pytest.fixture(scope="module")
def keras_resnet50():
  return randomize(keras.applications.ResNet50(weights=None, include_top=False,
                                               input_shape=(None, None, 3)))


@pytest.fixture(scope="module")
def resnet50_files(keras_resnet50, tmp_path_factory):
  """The ImageNet layout and the installed Keras's own (each ~100 MB: the other two layouts are
  checked on a small model)."""
  folder = tmp_path_factory.mktemp("keras_resnet50")
  files = {layout: str(folder / layout) for layout in LAYOUTS[:2]}
  for layout, path in files.items():
    write_layout(keras_resnet50, layout, path)
  return files


@pytest.fixture(scope="module")
def resnet50_weights(resnet50_files):
  return convert.read_weights(resnet50_files["imagenet.h5"], keras_config())


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(1)
  return {size: rng.normal(size=(1, size, size, 3)).astype(np.float32) for size in (65, 64)}


# --- reading --------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_as_keras_names_its_variables(layout, tmp_path):
  inputs = keras.Input((8, 8, 3))
  features = keras.layers.BatchNormalization(name="conv1_bn")(
      keras.layers.Conv2D(4, 3, name="conv1_conv")(inputs))
  outputs = keras.layers.Dense(5, name="predictions")(
      keras.layers.GlobalAveragePooling2D()(features))
  model = randomize(keras.Model(inputs, outputs))
  path = str(tmp_path / layout)
  write_layout(model, layout, path)
  read = keras_resnet.read_keras_layers(path)
  expected = {layer.name: {variable.name: np.asarray(variable) for variable in layer.weights}
              for layer in model.layers if layer.weights}
  assert {layer: sorted(variables) for layer, variables in read.items()} == {
      layer: sorted(variables) for layer, variables in expected.items()}
  for layer, variables in expected.items():
    for variable, value in variables.items():
      np.testing.assert_array_equal(read[layer][variable], value, err_msg=f"{layer}/{variable}")


def test_resnet50_converts_alike_from_imagenet_h5_and_keras3_weights_h5(resnet50_files,
                                                                         resnet50_weights):
  weights = convert.read_weights(resnet50_files["save_weights.weights.h5"], keras_config())
  assert sorted(weights) == sorted(resnet50_weights)
  assert all(np.array_equal(weights[name], resnet50_weights[name]) for name in weights)


def test_names_follow_the_keras_layers(keras_resnet50, resnet50_weights):
  def keras_weights(layer):
    return keras_resnet50.get_layer(layer).get_weights()
  pairs = {
      "conv1/kernel": keras_weights("conv1_conv")[0],
      "conv1/bias": keras_weights("conv1_conv")[1],
      "bn1/scale": keras_weights("conv1_bn")[0],
      "bn1/bias": keras_weights("conv1_bn")[1],
      "bn1/mean": keras_weights("conv1_bn")[2],
      "bn1/var": keras_weights("conv1_bn")[3],
      "layer1/0/downsample/conv/kernel": keras_weights("conv2_block1_0_conv")[0],
      "layer2/0/conv1/kernel": keras_weights("conv3_block1_1_conv")[0],
      "layer3/5/bn3/var": keras_weights("conv4_block6_3_bn")[3],
      "layer4/2/conv2/bias": keras_weights("conv5_block3_2_conv")[1],
  }
  for name, expected in pairs.items():
    np.testing.assert_array_equal(resnet50_weights[name], expected, err_msg=name)


def test_names_and_shapes_match_the_configured_model_exactly(resnet50_weights):
  assert convert.mapping_errors(resnet50_weights, backbone_shapes()) == []
  assert len(resnet50_weights) == 318  # 53 convs x (kernel, bias) + 53 BNs x 4.


def test_resnet101_with_top_drops_only_the_classifier(tmp_path):
  # include_top: the 'predictions' Dense (10 classes keep it small). Shapes only: the mapping is
  # what is checked here; the values' path is the ResNet-50 one.
  model = keras.applications.ResNet101(weights=None, classes=10)
  path = str(tmp_path / "resnet101_weights_tf_dim_ordering_tf_kernels.h5")
  write_imagenet_layout(model, path, values=False)
  weights = convert.read_weights(path, keras_config(backbone="resnet101"))
  assert convert.mapping_errors(weights, backbone_shapes(backbone="resnet101")) == []
  with pytest.raises(ValueError, match=r"\(3, 4, 23, 3\) blocks per stage \(resnet101\), but "
                                       r"config.model.backbone=resnet50 has \(3, 4, 6, 3\)"):
    convert.read_weights(path, keras_config(backbone="resnet50"))


# --- activations ----------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [65, 64])
def test_all_stages_match_keras_at_output_stride_32(keras_resnet50, resnet50_weights, images,
                                                     size):
  abstract = nnx.eval_shape(lambda: ResNet(
      RESNET_SPECS["resnet50"], variant="keras", output_stride=32,
      norm=NormConfig(epsilon=KERAS_BN_EPSILON), rngs=nnx.Rngs(0)))
  forward = loaded_forward(abstract, resnet50_weights, lambda backbone, x: backbone(x, train=False))
  reference = keras_stages(keras_resnet50, "resnet50")(images[size], training=False)
  errors = stage_errors(forward(images[size]), reference, FEATURES)
  print(f"\nResNet-50 OS 32, {size}x{size}: max abs error (max abs value) per stage: " +
        ", ".join(f"{name} {error:.2e} ({scale:.2f})" for name, (error, scale) in errors.items()))
  assert_float32_close(errors)


def test_configured_model_matches_keras_stages_1_to_3_at_output_stride_16(
    keras_resnet50, resnet50_weights, images):
  abstract = abstract_model()  # Output stride 16, the default.
  forward = loaded_forward(abstract, resnet50_weights,
                           lambda model, x: model.backbone(x, train=False))
  ours = forward(images[65])
  reference = keras_stages(keras_resnet50, "resnet50")(images[65], training=False)
  errors = stage_errors(ours, reference[:3], FEATURES[:3])
  print("\nResNet-50 OS 16 (DeepLab backbone), 65x65: " +
        ", ".join(f"{name} {error:.2e} ({scale:.2f})" for name, (error, scale) in errors.items()))
  assert_float32_close(errors)
  assert ours["stage4"].shape == (1, 5, 5, 2048)  # Dilated instead of strided: 65 / 16 -> 5.


@pytest.mark.parametrize("size", [7, 8, 9])
def test_our_max_pool_equals_keras_zero_padded_pool_after_relu(size):
  rng = np.random.default_rng(size)
  after_relu = np.maximum(rng.normal(size=(2, size, size, 3)), 0).astype(np.float32)
  keras_pool = keras.Sequential([keras.layers.ZeroPadding2D(1), keras.layers.MaxPooling2D(3, 2)])
  np.testing.assert_array_equal(max_pool_3x3_stride2(after_relu), keras_pool(after_relu))


# --- the layout of the keras variant --------------------------------------------------------------

def test_keras_variant_strides_the_first_1x1_and_dilates_like_torchvision():
  backbone = abstract_model(output_stride=8).backbone
  first = backbone.layer2[0]
  assert (first.conv1.strides, first.conv2.strides, first.downsample.conv.strides) == (2, 1, 2)
  assert first.conv2.padding == ((1, 1), (1, 1))
  for stage in (backbone.layer3, backbone.layer4):  # Dilated: no stride anywhere.
    assert {block.conv1.strides for block in stage} == {1}
    assert {block.conv2.strides for block in stage} == {1}
    assert stage[0].downsample.conv.strides == 1
  assert [block.conv2.kernel_dilation for block in backbone.layer3] == [1, 2, 2, 2, 2, 2]
  assert [block.conv2.kernel_dilation for block in backbone.layer4] == [2, 4, 4]
  assert backbone.layer4[1].conv2.padding == ((4, 4), (4, 4))


def test_only_the_keras_variant_has_conv_biases():
  def conv_bias_names(**overrides):
    _, params, _ = nnx.split(abstract_model(**overrides), nnx.Param, nnx.BatchStat)
    names = convert.flatten(nnx.to_pure_dict(params)["backbone"])
    return {name for name in names if "conv" in name and name.endswith("/bias")}
  assert conv_bias_names(resnet_variant="torchvision") == set()
  assert len(conv_bias_names()) == 53


def test_keras_variant_has_no_deep_stem():
  with pytest.raises(ValueError, match="deep_stem=False"):
    abstract_model(deep_stem=True)


# --- refusals -------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,message", [
    ({"resnet_variant": "torchvision"},
     "Keras ResNet puts the stride on the 1x1 conv and has conv biases: set "
     "config.model.resnet_variant=keras"),
    ({"bn_epsilon": 1e-5},
     r"epsilon 1.001e-05: set config.model.bn_epsilon=1.001e-05 \(got 1e-05\)"),
    ({"backbone": "xception65"}, "'xception65' is not a ResNet"),
    ({"backbone": "resnet_tiny"}, r"\(3, 4, 6, 3\) blocks per stage \(resnet50\), but "
                                  r"config.model.backbone=resnet_tiny has \(1, 1, 1, 1\)"),
])
def test_config_mismatches_are_refused(resnet50_files, overrides, message):
  with pytest.raises(ValueError, match=message):
    convert.read_weights(resnet50_files["imagenet.h5"], keras_config(**overrides))


def test_missing_and_unexpected_tensors_are_named(resnet50_files, tmp_path):
  path = str(tmp_path / "damaged.h5")
  shutil.copy(resnet50_files["imagenet.h5"], path)
  with h5py.File(path, "a") as h5:
    del h5["conv3_block2_2_bn"]["conv3_block2_2_bn/moving_variance:0"]
    h5["conv1_conv"].create_dataset("conv1_conv/extra:0", data=np.zeros(3, np.float32))
    h5["conv1_conv"].attrs["weight_names"] = [b"conv1_conv/kernel:0", b"conv1_conv/bias:0",
                                              b"conv1_conv/extra:0"]
  weights = convert.read_weights(path, keras_config())
  _, params, stats = nnx.split(abstract_model(), nnx.Param, nnx.BatchStat)
  with pytest.raises(ValueError, match=r"missing \(1\): layer2/1/bn2/var\n.*"
                                       r"unexpected \(1\): conv1_conv/extra"):
    convert.load_backbone(nnx.to_pure_dict(params), nnx.to_pure_dict(stats), weights,
                          source=path)


def test_files_without_a_keras_resnet_are_refused(tmp_path):
  other = str(tmp_path / "other.h5")
  write_imagenet_layout(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="fc")]),
                        other)
  with pytest.raises(ValueError, match="holds no Keras applications ResNet layers.*fc"):
    convert.read_weights(other, keras_config())
  text = tmp_path / "notes.h5"
  text.write_text("not hdf5")
  with pytest.raises(ValueError, match="neither an HDF5 file nor a .keras archive"):
    convert.read_weights(str(text), keras_config())
