"""Keras applications ResNet50 / ResNet101 weights -> our ResNet's backbone names (variant 'keras').

Reads the file with h5py alone, never building a Keras model, in the layouts Keras writes:
  - the legacy HDF5 layout: the downloadable ImageNet files
    (resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5), Keras 2's save_weights('x.h5') and
    Keras 2 or 3's model.save('x.h5') (the same, under a 'model_weights' group). One group per
    layer; its attribute 'weight_names' lists paths such as 'conv1_conv/kernel:0' (Keras 3 drops
    the ':0') of datasets inside the group.
  - the Keras 3 layout: save_weights('x.weights.h5') and the 'model.weights.h5' inside a .keras
    archive. Groups 'layers/<auto name such as conv2d_7>/vars' hold datasets '0', '1', ... in the
    order of the layer's variables (Conv2D: kernel, bias; BatchNormalization: gamma, beta,
    moving_mean, moving_variance); the layer's own name is the 'name' attribute of 'vars'.

Names: conv1_conv -> conv1, conv1_bn -> bn1; convS_blockB_K_conv / _bn -> layer{S-1}/{B-1}/conv{K}
/ bn{K} for K = 1, 2, 3, and K = 0 (the projection shortcut) -> layer{S-1}/{B-1}/downsample/conv /
bn. Kernels are HWIO already. BN gamma -> scale, beta -> bias, moving_mean -> mean,
moving_variance -> var. The ImageNet classifier ('predictions') is dropped on purpose; any other
tensor keeps its Keras name, so that convert.load_backbone lists it as unexpected.

Safety: no Keras model is built (keras.models.load_model would run a Lambda layer's marshalled
code), a .keras archive's weights are read into memory (nothing is extracted to disk), and only
numeric datasets stored in the file itself are read: HDF5 can point a dataset at another file
(external links, external raw storage, virtual datasets), which would copy any readable file's
bytes into the converted weights. HDF5 itself never unpickles.
"""

from __future__ import annotations

import io
import math
import re
import zipfile

import h5py
import numpy as np

from pseudoseg_jax.convert.tensors import BackboneWeights
from pseudoseg_jax.models.resnet import RESNET_SPECS

# Every BatchNormalization of keras.applications' ResNets (keras/src/applications/resnet.py).
KERAS_BN_EPSILON = 1.001e-5
STEM_LAYERS = {"conv1_conv": "conv1", "conv1_bn": "bn1"}
BLOCK_LAYER = re.compile(r"conv(?P<stage>[2-5])_block(?P<block>[1-9]\d*)_(?P<part>[0-3])_"
                         r"(?P<kind>conv|bn)")
VARIABLES = {
    "conv": {"kernel": "kernel", "bias": "bias"},
    "bn": {"gamma": "scale", "beta": "bias", "moving_mean": "mean", "moving_variance": "var"},
}
DROPPED_LAYERS = ("predictions",)  # The 1000-class ImageNet Dense; our backbone has no fc layer.
# The Keras 3 layout numbers a layer's variables; by count, for the layers of these ResNets.
KERAS3_VARIABLE_ORDER = {
    1: ("kernel",),
    2: ("kernel", "bias"),
    4: ("gamma", "beta", "moving_mean", "moving_variance"),
}
KERAS3_WEIGHTS_IN_ARCHIVE = "model.weights.h5"

KerasLayers = dict  # Keras layer name -> {variable name: np.ndarray}


def read_keras_resnet(path: str, model_config) -> BackboneWeights:
  """The backbone weights of the Keras applications ResNet in `path`, by our names."""
  check_model_config(model_config)
  layers = read_keras_layers(path)
  check_depth(layers, model_config.backbone, path)
  return to_backbone_names(layers)


# --- refusals -----------------------------------------------------------------------------------

def check_model_config(model_config) -> None:
  """Raises ValueError unless the configured backbone is one Keras weights can fill exactly."""
  if model_config.resnet_variant != "keras":
    raise ValueError(
        "Keras ResNet puts the stride on the 1x1 conv and has conv biases: set "
        f"config.model.resnet_variant=keras (got {model_config.resnet_variant!r}).")
  if model_config.backbone not in RESNET_SPECS:
    raise ValueError(f"config.model.backbone={model_config.backbone!r} is not a ResNet; Keras "
                     "ResNet weights need resnet50 or resnet101.")
  if model_config.deep_stem:
    raise ValueError("Keras ResNets have the 7x7 stem: set config.model.deep_stem=False.")
  # Loading would succeed with any epsilon, and every activation would then be slightly off.
  if not math.isclose(model_config.bn_epsilon, KERAS_BN_EPSILON, rel_tol=1e-6):
    raise ValueError(
        f"Keras ResNet's BatchNorm uses epsilon {KERAS_BN_EPSILON}: set "
        f"config.model.bn_epsilon={KERAS_BN_EPSILON} (got {model_config.bn_epsilon}).")


def blocks_per_stage(layer_names) -> tuple[int, ...]:
  """(blocks of conv2, conv3, conv4, conv5) counted from the Keras layer names; 0 = absent."""
  counts = [0, 0, 0, 0]
  for name in layer_names:
    match = BLOCK_LAYER.fullmatch(name)
    if match:
      stage = int(match["stage"]) - 2
      counts[stage] = max(counts[stage], int(match["block"]))
  return tuple(counts)


def check_depth(layers: KerasLayers, backbone: str, path: str) -> None:
  """Raises ValueError when the file is no Keras ResNet or not as deep as `backbone`."""
  found = blocks_per_stage(layers)
  if not any(found) and not STEM_LAYERS.keys() & layers.keys():
    shown = ", ".join(sorted(layers)[:8]) or "none"
    legacy = any(name.startswith(("res2a_", "bn2a_")) for name in layers)
    hint = (" Names like res2a_branch2a come from the old keras_applications ResNet50 file, which "
            "this converter does not read; use the file keras.applications.ResNet50 downloads now."
            if legacy else "")
    raise ValueError(f"{path} holds no Keras applications ResNet layers (conv1_conv, "
                     f"conv2_block1_1_conv, ...); its layers with weights: {shown}.{hint}")
  expected = RESNET_SPECS[backbone].blocks_per_stage
  if found != expected:
    matching = [name for name, spec in RESNET_SPECS.items() if spec.blocks_per_stage == found]
    what = f" ({matching[0]})" if matching else ""
    raise ValueError(f"{path} holds a ResNet with {found} blocks per stage{what}, but "
                     f"config.model.backbone={backbone} has {expected}: set the backbone that "
                     f"matches the file.")


# --- reading ------------------------------------------------------------------------------------

def read_keras_layers(path: str) -> KerasLayers:
  """{Keras layer name: {variable: array}} from a legacy .h5, a .weights.h5 or a .keras archive."""
  with _open_h5(path) as h5:
    if "layers" in h5 and "layer_names" not in h5.attrs:
      return keras3_layers(h5, path)
    return legacy_layers(h5["model_weights"] if "model_weights" in h5 else h5, path)


def _open_h5(path: str) -> h5py.File:
  if zipfile.is_zipfile(path):  # A .keras archive: config.json, metadata.json, model.weights.h5.
    with zipfile.ZipFile(path) as archive:
      if KERAS3_WEIGHTS_IN_ARCHIVE not in archive.namelist():
        raise ValueError(f"{path} is a zip archive without {KERAS3_WEIGHTS_IN_ARCHIVE}; expected "
                         "a .keras model file.")
      return h5py.File(io.BytesIO(archive.read(KERAS3_WEIGHTS_IN_ARCHIVE)), "r")
  try:
    return h5py.File(path, "r")
  except OSError as error:
    raise ValueError(f"{path} is neither an HDF5 file nor a .keras archive: {error}") from error


def _tensor(item, root: h5py.Group, path: str) -> np.ndarray:
  """A dataset's numbers, read only if they are stored in the file being converted."""
  where = f"{path}: {item.name}"
  if not isinstance(item, h5py.Dataset):
    raise ValueError(f"{where} is not a dataset.")
  if item.file != root.file or item.external or item.is_virtual:
    raise ValueError(f"Refusing {where}: its data lives in another file (an HDF5 external link, "
                     f"external storage or virtual dataset); a weights file must hold its tensors.")
  if item.dtype.kind not in "biuf":
    raise ValueError(f"Refusing {where}: it holds {item.dtype}, not numbers.")
  return item[()]


def _text(value) -> str:
  """Keras 2 writes attributes as bytes, Keras 3 as str."""
  return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _add(layers: KerasLayers, layer: str, variable: str, value, path: str) -> None:
  variables = layers.setdefault(layer, {})
  if variable in variables:  # Two tensors for one name: refuse rather than keep either.
    raise ValueError(f"{path} holds {layer}/{variable} twice (a model nested in another?).")
  variables[variable] = np.asarray(value)


def legacy_layers(root: h5py.Group, path: str) -> KerasLayers:
  """Legacy layout: one group per layer, attribute 'weight_names' = dataset paths inside it."""
  names = [_text(name) for name in root.attrs.get("layer_names", list(root.keys()))]
  layers = {}
  for group_name in names:
    group = root[group_name]
    for weight_name in map(_text, group.attrs.get("weight_names", ())):
      if weight_name not in group:
        continue  # Listed but absent: load_backbone then names the backbone tensor it lacks.
      # 'conv1_conv/kernel:0': the layer is the part before the variable (the group's own name,
      # except for a model saved nested in another, whose group holds every inner layer).
      parts = weight_name.split("/")
      layer = parts[-2] if len(parts) > 1 else group_name
      _add(layers, layer, parts[-1].split(":")[0], _tensor(group[weight_name], root, path), path)
  return layers


def keras3_layers(h5: h5py.File, path: str) -> KerasLayers:
  """Keras 3 layout: '.../vars' groups named by their 'name' attribute, datasets '0', '1', ..."""
  variable_groups = []
  h5.visititems(lambda name, item: variable_groups.append(item)
                if isinstance(item, h5py.Group) and name.split("/")[-1] == "vars" and len(item)
                else None)
  layers = {}
  for group in variable_groups:
    if "name" not in group.attrs:
      raise ValueError(f"{path}: {group.name} has no 'name' attribute (an older Keras 3 wrote "
                       "it), so its layers cannot be named; re-save with model.save('x.h5').")
    values = [_tensor(group[key], h5, path) for key in sorted(group, key=int)]
    # An unknown variable count keeps the Keras indices: listed as unexpected later.
    variables = KERAS3_VARIABLE_ORDER.get(len(values), tuple(sorted(group, key=int)))
    for variable, value in zip(variables, values):
      _add(layers, _text(group.attrs["name"]), variable, value, path)
  return layers


# --- naming -------------------------------------------------------------------------------------

def backbone_layer(layer: str) -> tuple[str, str] | None:
  """Keras layer name -> (our module path, 'conv' or 'bn'); None when it is not a backbone layer."""
  if layer in STEM_LAYERS:
    return STEM_LAYERS[layer], layer.rsplit("_", 1)[1]
  match = BLOCK_LAYER.fullmatch(layer)
  if not match:
    return None
  kind, part = match["kind"], int(match["part"])
  block = f"layer{int(match['stage']) - 1}/{int(match['block']) - 1}"
  module = f"downsample/{kind}" if part == 0 else f"{kind}{part}"
  return f"{block}/{module}", kind


def to_backbone_names(layers: KerasLayers) -> BackboneWeights:
  """Our flat names for every tensor; unmappable ones keep 'layer/variable' (Keras names)."""
  weights = {}
  for layer, variables in layers.items():
    if layer in DROPPED_LAYERS:
      continue
    target = backbone_layer(layer)
    for variable, value in variables.items():
      ours = VARIABLES[target[1]].get(variable) if target else None
      weights[f"{target[0]}/{ours}" if ours else f"{layer}/{variable}"] = value
  return weights
