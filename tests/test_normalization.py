"""Input normalization per weight source: known answers, the default of each source, and the model
applying it to canonical (x / 127.5 - 1) images in every pass."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pseudoseg_jax import config as config_lib
from pseudoseg_jax import train
from pseudoseg_jax.models import build_model, normalization


def canonical(rgb):
  return jnp.asarray(np.asarray(rgb, np.float32).reshape(1, 1, 1, 3) / 127.5 - 1.0)


def test_known_answers_per_source():
  red = canonical([255, 0, 0])
  np.testing.assert_array_equal(normalization.from_signed_unit(red, "signed_unit"), red)
  np.testing.assert_allclose(normalization.from_signed_unit(red, "efficientnet_lite")[0, 0, 0],
                             [1.0, -127 / 128, -127 / 128], rtol=1e-6)
  np.testing.assert_allclose(normalization.from_signed_unit(red, "imagenet_mean_std")[0, 0, 0],
                             [(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-5)
  # Keras: BGR order, mean subtracted, no scaling: red lands in the LAST channel.
  np.testing.assert_allclose(normalization.from_signed_unit(red, "caffe_bgr")[0, 0, 0],
                             [-103.939, -116.779, 255 - 123.68], rtol=1e-5)


@pytest.mark.parametrize("backbone, variant, init_from, expected", [
    ("resnet50", "torchvision", "", "signed_unit"),
    ("resnet50", "torchvision", "resnet50.safetensors", "imagenet_mean_std"),
    ("resnet50", "keras", "resnet50.h5", "caffe_bgr"),
    ("xception65", "torchvision", "deeplab/model.ckpt", "signed_unit"),
    ("efficientnet_lite0", "torchvision", "efficientnet_lite0_imagenet", "efficientnet_lite"),
])
def test_default_is_what_the_weights_expect(backbone, variant, init_from, expected):
  config = config_lib.base_config()
  config.model.backbone, config.model.resnet_variant = backbone, variant
  config.model.init_from = init_from
  assert normalization.resolved_normalization(config.model) == expected
  config.model.input_normalization = "signed_unit"  # An explicit choice wins.
  assert normalization.resolved_normalization(config.model) == "signed_unit"


def test_bad_name_is_refused_naming_the_field():
  config = config_lib.base_config()
  config.model.input_normalization = "bgr"
  with pytest.raises(ValueError, match="model.input_normalization"):
    config_lib.validate(config)


def test_the_run_records_the_resolved_normalization():
  config = config_lib.base_config()
  config.model.init_from = "resnet50.h5"
  config.model.resnet_variant = "keras"
  resolved = train.with_resolved_normalization(config)
  assert resolved.model.input_normalization == "caffe_bgr"
  assert config.model.input_normalization == ""  # The caller's config is left alone.


def test_model_feeds_its_backbone_the_converted_image():
  config = config_lib.base_config()
  config.model.update(backbone="resnet_tiny", output_stride=8, aspp_rates=(1, 2, 3),
                      aspp_channels=8, decoder_channels=8, low_level_channels=4,
                      sgc_attention_dim=4, input_normalization="caffe_bgr")
  model = build_model(config.model, 3, rngs=nnx.Rngs(0))
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 17, 17, 3)), jnp.float32)
  converted = normalization.from_signed_unit(images, "caffe_bgr")
  expected = model.backbone(converted, train=False)["stage4"]
  np.testing.assert_array_equal(model.backbone_features(images, train=False)["stage4"], expected)
  np.testing.assert_array_equal(model(images, train=False)["features"]["stage4"], expected)
