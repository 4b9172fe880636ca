"""torchvision and timm ResNet state dicts (.safetensors, .pth/.pt/.bin) -> our ResNet backbone.

Names (a torch module path, then its leaf; our names as in pseudoseg_jax/models/resnet.py):
  conv1                               conv1                       7x7 stem (deep_stem=False)
  conv1.0 / .1 / .3 / .4 / .6         stem_conv1 / stem_bn1 / stem_conv2 / stem_bn2 / stem_conv3
                                      the deep stem (deep_stem=True): the PyTorch peers'
                                      resnet50s/101s and timm's resnet50s/101s name it alike
  bn1                                 bn1                         after either stem
  layerS.B.convK / .bnK               layerS/B/convK / bnK        K = 1, 2, 3
  layerS.B.downsample.0 / .1          layerS/B/downsample/conv / bn
  conv leaves  weight (OIHW) -> kernel (HWIO), bias -> bias
  BN leaves    weight -> scale, bias -> bias, running_mean -> mean, running_var -> var

Dropped on purpose, and nothing else: 'fc.weight' and 'fc.bias' (the ImageNet classifier) and every
'*.num_batches_tracked' (a counter, not a weight). Any other tensor keeps its torch name, so that
load_backbone reports it as unexpected instead of it vanishing.

Refused with a named list rather than loaded wrongly: timm's avg-down shortcut ('d' variants:
downsample.0 AvgPool, .1 conv, .2 BN; our shortcut is a strided 1x1 conv), a stem or a depth that
differs from config.model, and configs with model.resnet_variant='keras' (stride on the 1x1 conv).

A wrapped checkpoint ({'state_dict': ...} or {'model': ...}) is unwrapped and a 'module.'
(DataParallel) or 'backbone.' prefix shared by every key is stripped. Torch is never needed:
safetensors are read with the `safetensors` package's numpy API, torch.save files (.pth/.pt/.bin,
zip or legacy) by torch_zip.py, which unpickles tensors and dicts only. bfloat16 becomes float32.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from pseudoseg_jax.convert import torch_zip
from pseudoseg_jax.convert.tensors import BackboneWeights, renamed_tensors
from pseudoseg_jax.models.resnet import RESNET_SPECS

DROPPED_KEYS = frozenset({"fc.weight", "fc.bias"})
DROPPED_LEAF = "num_batches_tracked"
WRAPPER_KEYS = ("state_dict", "model")
STRIPPED_PREFIXES = ("module.", "backbone.")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin")

CONV, BN = "conv", "bn"
CONV_LEAVES = {"weight": "kernel", "bias": "bias"}
BN_LEAVES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
STEM_MODULES = {
    "conv1": ("conv1", CONV), "bn1": ("bn1", BN),
    "conv1.0": ("stem_conv1", CONV), "conv1.1": ("stem_bn1", BN),
    "conv1.3": ("stem_conv2", CONV), "conv1.4": ("stem_bn2", BN),
    "conv1.6": ("stem_conv3", CONV),
}
BLOCK_MODULE = re.compile(r"layer([1-4])\.(\d+)\.(conv[123]|bn[123]|downsample\.[01])")
SHORTCUT_MODULES = {"downsample.0": ("downsample/conv", CONV),
                    "downsample.1": ("downsample/bn", BN)}
BLOCK_KEY = re.compile(r"layer([1-4])\.(\d+)\.")
AVG_DOWN_KEY = re.compile(r"layer[1-4]\.\d+\.downsample\.2\.")
DEEP_STEM_KEY = re.compile(r"conv1\.\d+\.")


# ---------------------------------------------------------------------------------------------
# Reading files into a flat {torch name: numpy array}.

def read_safetensors(path: str) -> dict:
  try:
    from safetensors.numpy import load_file
  except ImportError as error:
    raise ValueError(f"Reading {path} needs the safetensors package: pip install safetensors "
                     f"(torch is not needed).") from error
  try:
    tensors = load_file(path)
  except Exception as error:  # Older safetensors releases cannot hand bfloat16 to numpy.
    raise ValueError(f"safetensors could not read {path}: {error}. If the file holds bfloat16, "
                     f"upgrade safetensors (pip install -U safetensors).") from error
  return {name: as_float32_if_bfloat16(array) for name, array in tensors.items()}


def as_float32_if_bfloat16(array: np.ndarray) -> np.ndarray:
  """bfloat16 (an ml_dtypes type numpy only knows by name) -> float32, exactly; others unchanged."""
  return array.astype(np.float32) if array.dtype.name == "bfloat16" else array


def unwrap_state_dict(checkpoint, source: str) -> dict:
  """The flat state dict inside a checkpoint: descends through 'state_dict' / 'model' wrappers."""
  while isinstance(checkpoint, Mapping):
    wrapped = [key for key in WRAPPER_KEYS if isinstance(checkpoint.get(key), Mapping)]
    if not wrapped:
      break
    checkpoint = checkpoint[wrapped[0]]
  if not isinstance(checkpoint, Mapping):
    raise ValueError(f"{source} holds a {type(checkpoint).__name__}, not a state dict.")
  not_tensors = sorted(str(key) for key, value in checkpoint.items() if not hasattr(value, "shape"))
  if not_tensors:
    raise ValueError(f"{source} is not a flat state dict: these entries are not tensors: "
                     f"{', '.join(not_tensors)}")
  return {str(key): np.asarray(value) for key, value in checkpoint.items()}


def strip_shared_prefixes(state_dict: Mapping) -> dict:
  """Removes 'module.' / 'backbone.' (repeatedly, e.g. 'module.backbone.') if every key has it."""
  while state_dict:
    shared = [prefix for prefix in STRIPPED_PREFIXES
              if all(key.startswith(prefix) for key in state_dict)]
    if not shared:
      break
    state_dict = {key[len(shared[0]):]: value for key, value in state_dict.items()}
  return dict(state_dict)


def read_state_dict(path: str) -> dict:
  """{torch name: numpy array} of a .safetensors or torch pickle file, unwrapped and unprefixed."""
  if path.lower().endswith(".safetensors"):
    raw = read_safetensors(path)
  elif path.lower().endswith(PICKLE_SUFFIXES):
    raw = torch_zip.read_torch_state_dict(path)
  else:
    raise ValueError(f"{path}: expected .safetensors, .pth, .pt or .bin.")
  return strip_shared_prefixes(unwrap_state_dict(raw, path))


# ---------------------------------------------------------------------------------------------
# Names and layouts.

def our_module(torch_module: str) -> tuple[str, str] | None:
  """(our module path, CONV or BN) for a torch module path, or None if it has no place in ours."""
  if torch_module in STEM_MODULES:
    return STEM_MODULES[torch_module]
  match = BLOCK_MODULE.fullmatch(torch_module)
  if not match:
    return None
  stage, block, layer = match.groups()
  ours, kind = SHORTCUT_MODULES.get(layer, (layer, CONV if layer.startswith("conv") else BN))
  return f"layer{stage}/{block}/{ours}", kind


def convert_tensor(torch_name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
  """(our name, array in our layout); an unmappable tensor keeps its torch name and values."""
  torch_module, _, leaf = torch_name.rpartition(".")
  target = our_module(torch_module)
  if target is None:
    return torch_name, array
  module, kind = target
  leaves = CONV_LEAVES if kind == CONV else BN_LEAVES
  if leaf not in leaves:
    return torch_name, array
  if kind == CONV and leaf == "weight" and array.ndim == 4:
    array = np.ascontiguousarray(np.transpose(array, (2, 3, 1, 0)))  # OIHW -> HWIO.
  # A non-4-D conv weight keeps its shape, so load_backbone reports it under our name.
  return f"{module}/{leaves[leaf]}", array


def is_dropped(torch_name: str) -> bool:
  return torch_name in DROPPED_KEYS or torch_name.rsplit(".", 1)[-1] == DROPPED_LEAF


def blocks_per_stage(names) -> tuple[int, int, int, int]:
  """Bottleneck blocks per stage in a state dict, from its 'layerS.B.' names (highest B + 1)."""
  counts = [0, 0, 0, 0]
  for name in names:
    match = BLOCK_KEY.match(name)
    if match:
      stage, block = int(match.group(1)), int(match.group(2))
      counts[stage - 1] = max(counts[stage - 1], block + 1)
  return tuple(counts)


def known_depth(blocks: tuple[int, ...]) -> str | None:
  known = [name for name, spec in RESNET_SPECS.items() if spec.blocks_per_stage == tuple(blocks)]
  return known[0] if known else None


def block_range_lines(file_blocks, model_blocks) -> list[str]:
  """'layer3.6.* .. layer3.22.* are in the file, not in the model' per stage whose depth differs."""
  lines = []
  for stage, (in_file, in_model) in enumerate(zip(file_blocks, model_blocks), start=1):
    low, high = sorted((in_file, in_model))
    if low != high:
      where = ("in the file, not in the model" if in_file > in_model
               else "in the model, not the file")
      lines.append(f"layer{stage}.{low}.* .. layer{stage}.{high - 1}.* are {where}")
  return lines


def depth_error(file_blocks, model_config) -> str:
  spec_blocks = RESNET_SPECS[model_config.backbone].blocks_per_stage
  depth = known_depth(file_blocks)
  advice = f"; set model.backbone={depth}" if depth else ""
  return (f"it has {file_blocks} blocks per stage ({depth or 'no known ResNet'}) but "
          f"model.backbone={model_config.backbone} has {spec_blocks}{advice}: "
          + "; ".join(block_range_lines(file_blocks, spec_blocks)))


def layout_errors(state_dict: Mapping, model_config) -> list[str]:
  """Whole-layout mismatches between the file and config.model, each naming the tensors."""
  names = sorted(state_dict)
  avg_down = [name for name in names if AVG_DOWN_KEY.match(name)]
  if avg_down:
    return [f"it has an avg-down shortcut (timm's 'd' variants, e.g. resnet50d: downsample.0 "
            f"AvgPool, .1 conv, .2 BN); our ResNet's shortcut is a strided 1x1 conv + BN "
            f"(downsample.0/.1), so these cannot be loaded: {', '.join(avg_down)}"]
  errors = []
  deep_stem = [name for name in names if DEEP_STEM_KEY.match(name)]
  if deep_stem and not model_config.deep_stem:
    errors.append(f"it has a deep stem ({', '.join(deep_stem)}); set model.deep_stem=True")
  if "conv1.weight" in state_dict and model_config.deep_stem:
    errors.append("it has a 7x7 stem (conv1.weight); set model.deep_stem=False")
  errors.extend(stem_width_errors(state_dict, model_config))
  file_blocks = blocks_per_stage(names)
  if any(file_blocks) and file_blocks != RESNET_SPECS[model_config.backbone].blocks_per_stage:
    errors.append(depth_error(file_blocks, model_config))
  return errors


def stem_width_errors(state_dict: Mapping, model_config) -> list[str]:
  """Deep stems come 64-64-128 (ours, the peers' and timm's resnet50s) and 32-32-64 (timm's
  resnet50c/d): the narrow one would otherwise surface as a dozen shape mismatches."""
  first = state_dict.get("conv1.0.weight")
  width = RESNET_SPECS[model_config.backbone].stem_channels
  if first is None or not model_config.deep_stem or np.shape(first)[0] == width:
    return []
  return [f"its deep stem is {np.shape(first)[0]} wide (conv1.0.weight {tuple(np.shape(first))}); "
          f"ours is {width}-{width}-{2 * width} (the 'resnetXXs' stem), timm's resnet50c/d "
          f"stems (32-32-64) do not fit"]


def config_errors(model_config) -> list[str]:
  if model_config.backbone not in RESNET_SPECS:
    return [f"model.backbone={model_config.backbone} is not a ResNet"]
  if model_config.resnet_variant != "torchvision":
    return [f"torchvision/timm weights need model.resnet_variant='torchvision' (stride on the 3x3 "
            f"conv), not {model_config.resnet_variant!r}"]
  return []


def torch_to_backbone(state_dict: Mapping, model_config, *, source: str) -> BackboneWeights:
  """Our backbone's flat weights from a torch ResNet state dict (see the module docstring)."""
  errors = config_errors(model_config) or layout_errors(state_dict, model_config)
  if errors:
    raise ValueError(f"{source} does not fit config.model; nothing was loaded:\n  "
                     + "\n  ".join(errors))
  return renamed_tensors(state_dict, is_dropped, convert_tensor, source=source)


def read_torch_resnet(path: str, model_config) -> BackboneWeights:
  """The backbone weights of a torchvision / timm ResNet file, for `model_config`'s backbone."""
  return torch_to_backbone(read_state_dict(path), model_config, source=path)
