"""DeepLab's TF checkpoints (xception_65) -> our Xception65 (pseudoseg_jax/models/xception.py).

Reads any TF1 checkpoint DeepLab writes or publishes for xception_65: the ImageNet-pretrained one
(xception_65_imagenet, 'xception65_2018_05_04') or a trained segmentation model. Name mapping:
  xception_65/<flow>/<conv1_x | blockN/unit_M/xception_module/<layer>>/<leaf>
    -> <flow>/<conv1_x | blockN/unit_M/<layer>>/<our leaf>
  leaves: weights, depthwise_weights -> conv/kernel; BatchNorm/gamma|beta|moving_mean|
  moving_variance -> bn/scale|bias|mean|var.
Conv kernels are HWIO in both frameworks. Depthwise kernels are [3, 3, C, 1] (TF: in channels, then
the depth multiplier) and [3, 3, 1, C] in flax (feature_group_count=C: in per group, then out).

Skipped on purpose (not part of the backbone, or not weights):
  global_step;
  the DeepLab heads: logits/*, aspp*, image_pooling*, concat_projection*, decoder*;
  the ImageNet classifier xception_65/logits/*;
  optimizer and averaging slots: */Momentum, */ExponentialMovingAverage (the raw variables are
  used).
Every other name that does not map is returned under its checkpoint name, so that
convert.load_backbone lists it as unexpected instead of silently dropping it.

Batch norm epsilon: DeepLab's Xception uses 1e-3; our Xception65 always uses it (whatever
model.bn_epsilon says, which applies to the heads), so the converted statistics reproduce DeepLab's
activations.
"""

from __future__ import annotations

import numpy as np

from pseudoseg_jax.convert.tensors import BackboneWeights

SCOPE = "xception_65"
HEAD_SCOPES = ("logits", "aspp", "image_pooling", "concat_projection", "decoder")
SLOT_NAMES = ("Momentum", "ExponentialMovingAverage")
UNIT_SCOPE = "xception_module"
LEAF_NAMES = {
    "weights": "conv/kernel",
    "depthwise_weights": "conv/kernel",
    "BatchNorm/gamma": "bn/scale",
    "BatchNorm/beta": "bn/bias",
    "BatchNorm/moving_mean": "bn/mean",
    "BatchNorm/moving_variance": "bn/var",
}


def is_skipped(name: str) -> bool:
  """True for the checkpoint variables that are deliberately not backbone weights."""
  parts = name.split("/")
  return (name == "global_step"
          or parts[-1] in SLOT_NAMES
          or any(parts[0].startswith(scope) for scope in HEAD_SCOPES)
          or (parts[0] == SCOPE and len(parts) > 1 and parts[1] == "logits"))


def backbone_name(name: str) -> str | None:
  """Our '/'-joined backbone name for a DeepLab xception_65 variable; None if it does not map."""
  parts = name.split("/")
  if parts[0] != SCOPE:
    return None
  parts = [part for part in parts[1:] if part != UNIT_SCOPE]
  for leaf, our_leaf in LEAF_NAMES.items():
    leaf_parts = leaf.split("/")
    if len(parts) > len(leaf_parts) and parts[-len(leaf_parts):] == leaf_parts:
      return "/".join(parts[:-len(leaf_parts)] + [our_leaf])
  return None


def backbone_array(name: str, value: np.ndarray) -> np.ndarray:
  """The checkpoint tensor in our layout: depthwise [H, W, C, M] -> [H, W, M, C], others as is.

  A depth multiplier M other than 1 gives a shape load_backbone reports as mismatched."""
  value = np.asarray(value)
  if name.endswith("/depthwise_weights") and value.ndim == 4:
    return np.transpose(value, (0, 1, 3, 2))
  return value


def convert_variables(variables: dict) -> BackboneWeights:
  """{DeepLab name: array} -> BackboneWeights; unmappable names are kept as they are."""
  weights = {}
  for name, value in variables.items():
    if is_skipped(name):
      continue
    target = backbone_name(name) or name
    if target in weights:
      raise ValueError(f"Two checkpoint variables map to {target!r} (one is {name!r}).")
    weights[target] = backbone_array(name, value)
  return weights


def read_deeplab_xception(prefix: str, model_config) -> BackboneWeights:
  """Backbone weights from the TF checkpoint at `prefix` (the path without .index / .data-*)."""
  backbone = getattr(model_config, "backbone", None)
  if backbone != "xception65":
    raise ValueError(
        f"{prefix} is a TF checkpoint, read as DeepLab's Xception-65, but model.backbone is "
        f"{backbone!r}: set model.backbone='xception65' to use it.")
  import tensorflow as tf  # Only this format needs TensorFlow.
  reader = tf.train.load_checkpoint(prefix)
  names = sorted(reader.get_variable_to_shape_map())
  if not any(name.startswith(SCOPE + "/") for name in names):
    raise ValueError(f"{prefix} holds no '{SCOPE}/' variables: it is not a DeepLab Xception-65 "
                     f"checkpoint (first names: {', '.join(names[:5])}).")
  return convert_variables({name: reader.get_tensor(name) for name in names
                            if not is_skipped(name)})
