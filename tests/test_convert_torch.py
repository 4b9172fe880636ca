"""torchvision / timm ResNet state dicts -> our ResNet: exact round trips, refusals that name the
tensors, and (where torch is installed) activation parity with torchvision and timm through .pth
files, which the converter reads without torch (torch_zip.py; its own tests: test_torch_zip.py)."""

import functools
import json
import struct
import zipfile

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from pseudoseg_jax import config as config_lib
from pseudoseg_jax import convert
from pseudoseg_jax.convert import torch_resnet
from pseudoseg_jax.models import build_model

NUM_CLASSES = 21
# Our module names -> torchvision's / the peers' (written here independently of the converter).
OUR_TO_TORCH_MODULES = {"stem_conv1": "conv1.0", "stem_bn1": "conv1.1", "stem_conv2": "conv1.3",
                        "stem_bn2": "conv1.4", "stem_conv3": "conv1.6",
                        "downsample/conv": "downsample.0", "downsample/bn": "downsample.1"}
OUR_TO_TORCH_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias",
                       "mean": "running_mean", "var": "running_var"}


def model_config(backbone="resnet50", deep_stem=False, output_stride=16, variant="torchvision"):
  config = config_lib.base_config().model
  config.backbone = backbone
  config.deep_stem = deep_stem
  config.output_stride = output_stride
  config.resnet_variant = variant
  return config


@functools.lru_cache(maxsize=None)
def abstract_model(backbone="resnet50", deep_stem=False, output_stride=16):
  """(graphdef, params, batch_stats) of a fresh model, the values zeros: shapes are all we need."""
  config = model_config(backbone, deep_stem, output_stride)
  abstract = nnx.eval_shape(lambda: build_model(config, NUM_CLASSES, rngs=nnx.Rngs(0)))
  graphdef, params, batch_stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
  zeros = lambda tree: jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype),
                                    nnx.to_pure_dict(tree))
  return graphdef, zeros(params), zeros(batch_stats)


def random_backbone(params, batch_stats, seed=0):
  """Our flat backbone weights, every value distinct, so a swapped leaf cannot go unnoticed."""
  rng = np.random.default_rng(seed)
  flat = {**convert.flatten(params["backbone"]), **convert.flatten(batch_stats["backbone"])}
  return {name: rng.uniform(0.5, 1.5, np.shape(value)).astype(np.float32)
          for name, value in flat.items()}


def torch_name(our_name):
  module, leaf = our_name.rsplit("/", 1)
  for ours, theirs in OUR_TO_TORCH_MODULES.items():
    module = module.replace(ours, theirs)
  return f"{module.replace('/', '.')}.{OUR_TO_TORCH_LEAVES[leaf]}"


def to_torch_state_dict(weights, *, with_classifier=True):
  """torchvision's state dict for our weights: OIHW kernels, BN counters, the ImageNet fc."""
  state = {}
  for name, value in weights.items():
    state[torch_name(name)] = np.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else value
    if name.endswith("/mean"):
      state[torch_name(name).replace("running_mean", "num_batches_tracked")] = np.array(7)
  if with_classifier:
    state["fc.weight"] = np.ones((1000, 2048), np.float32)
    state["fc.bias"] = np.ones((1000,), np.float32)
  return state


def load(weights, backbone="resnet50", deep_stem=False, source="file"):
  _, params, batch_stats = abstract_model(backbone, deep_stem)
  return convert.load_backbone(params, batch_stats, weights, source=source)


def converted(state, **config):
  return torch_resnet.torch_to_backbone(state, model_config(**config), source="file")


def error_of(function, *args, **kwargs) -> str:
  with pytest.raises(ValueError) as error:
    function(*args, **kwargs)
  return str(error.value)


def write_torch_zip(path, state):
  """torch.save's zip layout for numpy arrays, without torch: a protocol 2 pickle written opcode by
  opcode, each array's memory as its storage and its strides as the tensor's, so a transposed view
  stays a non-contiguous tensor in the file, as torch saves one."""
  def text(value):
    return b"X" + struct.pack("<I", len(value.encode())) + value.encode()
  def integers(values):
    return b"".join(b"J" + struct.pack("<i", value) for value in values)
  storage_class = {np.dtype(np.float32): b"FloatStorage", np.dtype(np.int64): b"LongStorage"}
  pickled = [b"\x80\x02ccollections\nOrderedDict\n)R("]  # OrderedDict(), then its items.
  with zipfile.ZipFile(path, "w") as archive:
    for key, (name, array) in enumerate(state.items()):
      archive.writestr(f"archive/data/{key}", np.ravel(array, order="K").tobytes())
      storage_id = (b"((" + text("storage") + b"ctorch\n" + storage_class[array.dtype] + b"\n"
                    + text(str(key)) + text("cpu") + integers([array.size]) + b"tQ")
      pickled.append(text(name) + b"ctorch._utils\n_rebuild_tensor_v2\n" + storage_id
                     + integers([0]) + b"(" + integers(array.shape) + b"t("
                     + integers(np.divide(array.strides, array.itemsize).astype(int)) + b"t"
                     + b"\x89)tR")  # requires_grad=False, no hooks: the call's arguments end.
    archive.writestr("archive/data.pkl", b"".join(pickled) + b"u.")
    archive.writestr("archive/byteorder", "little")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
@pytest.mark.parametrize("deep_stem", [False, True])
def test_round_trip_is_exact(tmp_path, deep_stem, suffix):
  _, params, batch_stats = abstract_model("resnet50", deep_stem)
  weights = random_backbone(params, batch_stats)
  state = {f"module.{key}": value for key, value in to_torch_state_dict(weights).items()}
  path = str(tmp_path / f"resnet50{suffix}")
  if suffix == ".pth":  # Needs no torch: the kernels are written as transposed (OIHW) views.
    assert not state["module.conv1.weight" if not deep_stem else "module.conv1.0.weight"
                     ].flags.c_contiguous
    write_torch_zip(path, state)
  else:  # save_file writes an array's memory as it lies: a transposed view must be contiguous.
    pytest.importorskip("safetensors.numpy").save_file(
        {key: np.ascontiguousarray(value) for key, value in state.items()}, path)

  read = torch_resnet.read_torch_resnet(path, model_config(deep_stem=deep_stem))
  assert sorted(read) == sorted(weights)  # fc and the BN counters are gone, nothing else.
  assert sorted(convert.read_weights(path, model_config(deep_stem=deep_stem))) == sorted(read)
  loaded_params, loaded_stats = load(read, deep_stem=deep_stem, source=path)
  loaded = {**convert.flatten(loaded_params["backbone"]),
            **convert.flatten(loaded_stats["backbone"])}
  assert sorted(loaded) == sorted(weights)
  for name, value in weights.items():
    assert loaded[name].dtype == np.float32
    np.testing.assert_array_equal(loaded[name], value, err_msg=name)
  heads = {name: tree for name, tree in loaded_params.items() if name != "backbone"}
  assert not any(np.any(leaf) for leaf in jax.tree.leaves(heads))  # The heads keep their values.


def test_conv_kernels_become_hwio():
  kernel = np.arange(64 * 3 * 7 * 7, dtype=np.float32).reshape(64, 3, 7, 7)  # OIHW
  name, hwio = torch_resnet.convert_tensor("conv1.weight", kernel)
  assert name == "conv1/kernel" and hwio.shape == (7, 7, 3, 64)
  assert hwio[2, 5, 1, 9] == kernel[9, 1, 2, 5]
  assert torch_resnet.convert_tensor("layer2.0.downsample.1.running_var", kernel[0, 0, 0])[0] == (
      "layer2/0/downsample/bn/var")


def test_wrappers_and_shared_prefixes_are_removed():
  tensor = np.zeros(2, np.float32)
  for checkpoint in ({"state_dict": {"module.bn1.weight": tensor, "module.bn1.bias": tensor}},
                     {"model": {"backbone.bn1.weight": tensor, "backbone.bn1.bias": tensor},
                      "epoch": 3},
                     {"bn1.weight": tensor, "bn1.bias": tensor}):
    state = torch_resnet.strip_shared_prefixes(torch_resnet.unwrap_state_dict(checkpoint, "f"))
    assert sorted(state) == ["bn1.bias", "bn1.weight"]
  both = {"module.backbone.conv1.weight": tensor, "module.backbone.bn1.weight": tensor}
  assert sorted(torch_resnet.strip_shared_prefixes(both)) == ["bn1.weight", "conv1.weight"]
  # A prefix that only some keys have is a real name: kept, and later reported as unexpected.
  mixed = {"backbone.bn1.weight": tensor, "classifier.weight": tensor}
  assert torch_resnet.strip_shared_prefixes(mixed) == mixed
  assert "not tensors: epoch" in error_of(torch_resnet.unwrap_state_dict,
                                          {"bn1.weight": tensor, "epoch": 3}, "f")


def write_safetensors(path, tensors):
  """The file format by hand (8-byte header length, JSON header, raw bytes), for dtypes that
  numpy writers may not offer."""
  header, blobs, offset = {}, [], 0
  for name, (dtype, array) in tensors.items():
    blob = array.tobytes()
    header[name] = {"dtype": dtype, "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(blob)]}
    blobs.append(blob)
    offset += len(blob)
  encoded = json.dumps(header).encode()
  encoded += b" " * (-len(encoded) % 8)
  with open(path, "wb") as file:
    file.write(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def test_bfloat16_safetensors_become_float32(tmp_path):
  pytest.importorskip("safetensors.numpy")
  # 1e20 and 3e-10 are beyond float16: a float16 detour would show.
  bfloat16 = np.array([1.5, -2.25, 1e20, 3e-10], np.float32).astype(ml_dtypes.bfloat16)
  float32 = np.array([1.5, -2.25, 1e20, 3e-10], np.float32)
  path = str(tmp_path / "bf16.safetensors")
  write_safetensors(path, {"bn1.weight": ("BF16", bfloat16), "bn1.bias": ("F32", float32)})
  state = torch_resnet.read_state_dict(path)
  assert state["bn1.weight"].dtype == np.float32
  np.testing.assert_array_equal(state["bn1.weight"], bfloat16.astype(np.float32))
  np.testing.assert_array_equal(state["bn1.bias"], float32)


def test_missing_unexpected_and_misshaped_tensors_are_named():
  _, params, batch_stats = abstract_model()
  state = to_torch_state_dict(random_backbone(params, batch_stats))
  del state["layer2.1.bn2.running_var"]
  state["layer1.0.se.fc1.weight"] = np.zeros((16, 256, 1, 1), np.float32)  # An SE block.
  state["bn1.extra"] = np.zeros((64,), np.float32)  # A known module, an unknown leaf.
  state["layer1.0.conv2.weight"] = np.zeros((64, 64, 1, 1), np.float32)
  message = error_of(load, converted(state))
  assert "missing (1): layer2/1/bn2/var" in message
  assert "unexpected (2): bn1.extra, layer1.0.se.fc1.weight" in message
  assert "shape mismatch: layer1/0/conv2/kernel: file (1, 1, 64, 64), model (3, 3, 64, 64)" in (
      message)


def test_only_the_classifier_and_counters_are_dropped():
  _, params, batch_stats = abstract_model()
  state = to_torch_state_dict(random_backbone(params, batch_stats))
  state["fc.extra"] = np.zeros(3, np.float32)
  state["head.fc.weight"] = np.zeros(3, np.float32)
  weights = converted(state)
  assert "fc.weight" not in weights and "fc.bias" not in weights
  assert "fc.extra" in weights and "head.fc.weight" in weights
  assert not [name for name in weights if "num_batches_tracked" in name]


def avg_down(state):
  """timm's 'd' shortcut names: downsample.0 (AvgPool, no tensors), .1 conv, .2 BN."""
  renamed = {}
  for name, value in state.items():
    name = name.replace("downsample.1.", "downsample.2.").replace("downsample.0.", "downsample.1.")
    renamed[name] = value
  return renamed


def test_avg_down_shortcut_is_refused_with_its_tensors():
  _, params, batch_stats = abstract_model()
  state = avg_down(to_torch_state_dict(random_backbone(params, batch_stats)))
  message = error_of(converted, state)
  assert "avg-down" in message and "nothing was loaded" in message
  for stage in range(1, 5):
    assert f"layer{stage}.0.downsample.2.running_mean" in message


def test_resnet101_file_into_resnet50_names_the_extra_blocks():
  _, params, batch_stats = abstract_model()
  state = to_torch_state_dict(random_backbone(params, batch_stats))
  deeper = dict(state)
  for block in range(6, 23):  # ResNet-101's layer3 has 23 blocks; copy block 5's tensors.
    deeper.update({name.replace("layer3.5.", f"layer3.{block}."): value
                   for name, value in state.items() if name.startswith("layer3.5.")})
  message = error_of(converted, deeper, backbone="resnet50")
  assert "(resnet101) but model.backbone=resnet50" in message
  assert "set model.backbone=resnet101" in message
  assert "layer3.6.* .. layer3.22.* are in the file, not in the model" in message
  message = error_of(converted, state, backbone="resnet101")
  assert "layer3.6.* .. layer3.22.* are in the model, not the file" in message


def test_stem_mismatches_are_named():
  _, params, batch_stats = abstract_model(deep_stem=True)
  deep = to_torch_state_dict(random_backbone(params, batch_stats))
  message = error_of(converted, deep, deep_stem=False)
  assert "conv1.0.weight" in message and "deep_stem=True" in message
  _, params, batch_stats = abstract_model()
  plain = to_torch_state_dict(random_backbone(params, batch_stats))
  assert "conv1.weight" in error_of(converted, plain, deep_stem=True)
  narrow = {**deep, "conv1.0.weight": np.zeros((32, 3, 3, 3), np.float32)}  # timm resnet50c/d.
  assert "32 wide (conv1.0.weight (32, 3, 3, 3))" in error_of(converted, narrow, deep_stem=True)


def test_configs_that_cannot_take_torch_resnets_are_refused():
  assert "resnet_variant" in error_of(converted, {}, variant="keras")
  assert "not a ResNet" in error_of(converted, {}, backbone="xception65")


def test_a_pth_that_is_no_torch_checkpoint_says_so(tmp_path):
  path = tmp_path / "resnet50.pth"
  path.write_bytes(b"not read")
  message = error_of(torch_resnet.read_torch_resnet, str(path), model_config())
  assert str(path) in message and "PyTorch checkpoint" in message


# ---------------------------------------------------------------------------------------------
# Activation parity with torch (skipped where torch is not installed).

DILATIONS = {16: [False, False, True], 8: [False, True, True]}
STAGES = ("stride4", "stage2", "stage3", "stage4")


def randomize_batch_norms(torch, model, seed=0):
  """Random affine BN parameters and running statistics near (not at) the batch's: the running
  statistics then matter, and activations stay in a float32-friendly range."""
  generator = torch.Generator().manual_seed(seed)
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for norm in norms:
      norm.weight.copy_(torch.rand(norm.weight.shape, generator=generator) + 0.5)
      norm.bias.copy_(torch.randn(norm.bias.shape, generator=generator) * 0.1)
      norm.momentum = 1.0  # One train-mode pass sets running stats to that batch's.
    model.train()
    model(torch.randn(2, 3, 64, 64, generator=generator))
    for norm in norms:
      norm.running_mean.add_(torch.randn(norm.running_mean.shape, generator=generator) * 0.1)
      norm.running_var.mul_(torch.rand(norm.running_var.shape, generator=generator) * 0.5 + 0.75)
  model.eval()


def torch_stage_outputs(torch, model, images_nchw):
  outputs = []
  hooks = [getattr(model, f"layer{stage}").register_forward_hook(
      lambda module, inputs, output: outputs.append(output.numpy())) for stage in range(1, 5)]
  with torch.no_grad():
    model(torch.from_numpy(images_nchw))
  for hook in hooks:
    hook.remove()
  return outputs


def our_stage_outputs(weights, deep_stem, output_stride, images_nhwc):
  graphdef, params, batch_stats = abstract_model("resnet50", deep_stem, output_stride)
  params, batch_stats = convert.load_backbone(params, batch_stats, weights, source="torch")
  model = nnx.merge(graphdef, params, batch_stats)
  features = model.backbone(images_nhwc, train=False)
  return [np.asarray(features[name]) for name in STAGES]


def assert_parity(torch, model, weights, deep_stem, output_stride, label):
  rng = np.random.default_rng(1)
  for size in (65, 64):  # Odd and even: padding asymmetry would show on one of them.
    images = rng.normal(size=(1, 3, size, size)).astype(np.float32)
    reference = torch_stage_outputs(torch, model, images)
    ours = our_stage_outputs(weights, deep_stem, output_stride, images.transpose(0, 2, 3, 1))
    for stage, expected, actual in zip(STAGES, reference, ours):
      expected = expected.transpose(0, 2, 3, 1)
      assert actual.shape == expected.shape, (stage, actual.shape, expected.shape)
      max_abs = float(np.max(np.abs(actual - expected)))
      relative = max_abs / float(np.max(np.abs(expected)))
      print(f"{label} OS{output_stride} {size}x{size} {stage}: max abs {max_abs:.2e}, "
            f"relative to max |ref| {relative:.2e}")
      assert relative < 1e-4, (label, size, stage, max_abs, relative)


def torch_weights(torch, model, deep_stem, tmp_path):
  """Through a wrapped, DataParallel-prefixed .pth: the pickle path as users meet it. Any torch
  version writes it; the converter reads it without torch."""
  path = str(tmp_path / "resnet.pth")
  torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
  return torch_resnet.read_torch_resnet(path, model_config(deep_stem=deep_stem))


@pytest.mark.parametrize("output_stride", [16, 8])
def test_torchvision_resnet50_parity(tmp_path, output_stride):
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  model = torchvision.models.resnet50(
      weights=None, replace_stride_with_dilation=DILATIONS[output_stride])
  randomize_batch_norms(torch, model)
  weights = torch_weights(torch, model, False, tmp_path)
  assert_parity(torch, model, weights, False, output_stride, "torchvision")


def with_deep_stem(torch, model):
  """torchvision's ResNet with the peers' deep stem: conv1 = Sequential(3x3/2 conv 64, BN, ReLU,
  3x3 conv 64, BN, ReLU, 3x3 conv 128), bn1 over 128 channels, layer1 taking 128 channels."""
  nn = torch.nn
  model.conv1 = nn.Sequential(
      nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
      nn.Conv2d(64, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
      nn.Conv2d(64, 128, 3, padding=1, bias=False))
  model.bn1 = nn.BatchNorm2d(128)
  model.layer1[0].conv1 = nn.Conv2d(128, 64, 1, bias=False)
  model.layer1[0].downsample[0] = nn.Conv2d(128, 256, 1, bias=False)
  return model


@pytest.mark.parametrize("output_stride", [16, 8])
def test_deep_stem_parity(tmp_path, output_stride):
  torch = pytest.importorskip("torch")
  torchvision = pytest.importorskip("torchvision")
  torch.manual_seed(0)
  model = with_deep_stem(torch, torchvision.models.resnet50(
      weights=None, replace_stride_with_dilation=DILATIONS[output_stride]))
  randomize_batch_norms(torch, model)
  weights = torch_weights(torch, model, True, tmp_path)
  assert_parity(torch, model, weights, True, output_stride, "deep stem (torchvision + peers' stem)")


@pytest.mark.parametrize("output_stride", [16, 8])
def test_timm_resnet50s_parity(tmp_path, output_stride):
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  torch.manual_seed(0)
  model = timm.create_model("resnet50s", pretrained=False, output_stride=output_stride)
  randomize_batch_norms(torch, model)
  weights = torch_weights(torch, model, True, tmp_path)
  assert_parity(torch, model, weights, True, output_stride, "timm resnet50s")


def test_timm_resnet50d_is_refused(tmp_path):
  torch = pytest.importorskip("torch")
  timm = pytest.importorskip("timm")
  path = str(tmp_path / "resnet50d.pth")
  torch.save(timm.create_model("resnet50d", pretrained=False).state_dict(), path)
  message = error_of(torch_resnet.read_torch_resnet, path, model_config(deep_stem=True))
  assert "avg-down" in message and "layer1.0.downsample.2.weight" in message


def test_torch_pickle_unwraps_and_widens_bfloat16(tmp_path):
  torch = pytest.importorskip("torch")
  path = str(tmp_path / "checkpoint.pth")
  values = torch.tensor([1.5, -2.25, 1e20], dtype=torch.bfloat16)
  torch.save({"model": {"backbone.bn1.weight": values}, "epoch": 3}, path)
  state = torch_resnet.read_state_dict(path)
  assert list(state) == ["bn1.weight"] and state["bn1.weight"].dtype == np.float32
  np.testing.assert_array_equal(state["bn1.weight"], values.float().numpy())
