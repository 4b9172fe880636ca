"""Input normalization that matches each source of backbone weights.

The data pipelines, inference and the TensorBoard pictures all work with one canonical image,
RGB x / 127.5 - 1 (padding 127.5 -> 0). Pretrained weights expect their own input, and no batch norm
undoes a wrong one (a channel swap least of all), so the model converts the canonical image to what
its backbone was trained on, first thing in its forward pass: train, evaluate and predict share it.

  signed_unit        RGB x / 127.5 - 1: DeepLab / Inception (Xception-65 checkpoints), and every
                     backbone trained from scratch here (the conversion is then the identity).
  efficientnet_lite  RGB (x - 127) / 128: Google's EfficientNet-Lite checkpoints.
  imagenet_mean_std  RGB (x / 255 - mean) / std: torchvision and timm ResNets.
  caffe_bgr          BGR x - ImageNet mean (0-255 scale, no division): Keras applications' ResNets.

config.model.input_normalization names one; empty means the default of the weights in
model.init_from (`resolved_normalization`), which train.py writes into the run's config.json.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NORMALIZATIONS = ("signed_unit", "efficientnet_lite", "imagenet_mean_std", "caffe_bgr")
IMAGENET_MEAN_RGB = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD_RGB = np.array([0.229, 0.224, 0.225], np.float32)
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)


def default_normalization(model_config) -> str:
  """What the weights of model_config.init_from were trained on; signed_unit without weights."""
  if not model_config.init_from:
    return "signed_unit"
  if model_config.backbone.startswith("efficientnet_lite"):
    return "efficientnet_lite"
  if model_config.backbone.startswith("xception"):
    return "signed_unit"
  # ResNets: the layout says whose weights they are (convert/ refuses the other's files).
  return "caffe_bgr" if model_config.resnet_variant == "keras" else "imagenet_mean_std"


def resolved_normalization(model_config) -> str:
  """model_config.input_normalization, or the default of its weights when empty."""
  chosen = model_config.get("input_normalization", "") or default_normalization(model_config)
  if chosen not in NORMALIZATIONS:
    raise ValueError(f"model.input_normalization must be one of {NORMALIZATIONS} or empty (the "
                     f"default of the weights in model.init_from), got {chosen!r}.")
  return chosen


def from_signed_unit(images: jax.Array, normalization: str) -> jax.Array:
  """Canonical images (RGB x / 127.5 - 1, NHWC) -> the input `normalization` describes."""
  if normalization == "signed_unit":
    return images
  pixels = (images.astype(jnp.float32) + 1.0) * 127.5  # Back to 0-255 RGB.
  if normalization == "efficientnet_lite":
    converted = (pixels - 127.0) / 128.0
  elif normalization == "imagenet_mean_std":
    converted = (pixels / 255.0 - IMAGENET_MEAN_RGB) / IMAGENET_STD_RGB
  elif normalization == "caffe_bgr":
    converted = pixels[..., ::-1] - CAFFE_MEAN_BGR
  else:
    raise ValueError(f"Unknown input normalization {normalization!r}; one of {NORMALIZATIONS}.")
  return converted.astype(images.dtype)
