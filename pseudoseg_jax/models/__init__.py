"""Models: DeepLabv3+ on ResNet, Xception-65 or EfficientNet-Lite0 backbones, built from the
`config.model` section.

  model = build_model(config.model, num_classes=21, rngs=nnx.Rngs(0))
  outputs = model(images, train=True, rngs=nnx.Rngs(dropout=key))
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from pseudoseg_jax.models.deeplab import DeepLabV3Plus
from pseudoseg_jax.models.efficientnet_lite import EfficientNetLite
from pseudoseg_jax.models.normalization import resolved_normalization
from pseudoseg_jax.models.resize import resize_bilinear
from pseudoseg_jax.models.resnet import RESNET_SPECS, NormConfig, ResNet
from pseudoseg_jax.models.xception import Xception65

__all__ = ["DeepLabV3Plus", "ResNet", "build_model", "feature_size", "resize_bilinear",
           "validate_model_config"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
XCEPTION_BACKBONES = ("xception65",)
EFFICIENTNET_BACKBONES = ("efficientnet_lite0",)
BACKBONES = tuple(RESNET_SPECS) + XCEPTION_BACKBONES + EFFICIENTNET_BACKBONES
RESNET_VARIANTS = ("torchvision", "keras")
OUTPUT_STRIDES = (8, 16)
HEAD_DEFAULTS = {"separable_heads": False, "head_bn_momentum": 0.9, "cls_init_stddev": 0.0}


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _require(condition: bool, field: str, requirement: str, value) -> None:
  if not condition:
    raise ValueError(f"model.{field} must be {requirement}, got {value!r}.")


def head_fields(model_config) -> dict:
  """DeepLab's head details: added later, so a model config without them keeps today's heads."""
  return {field: model_config.get(field, default) for field, default in HEAD_DEFAULTS.items()}


def validate_model_config(model_config) -> None:
  """Raises ValueError naming the first missing or bad field of `model_config`."""
  fields = ("backbone", "deep_stem", "resnet_variant", "output_stride", "aspp_rates", "aspp_channels",
            "decoder_channels", "low_level_channels", "sgc_attention_dim", "aspp_dropout",
            "cls_dropout", "bn_momentum", "bn_epsilon", "bn_group_size", "dtype")
  missing = object()
  values = {field: getattr(model_config, field, missing) for field in fields}
  for field, value in values.items():
    if value is missing:
      raise ValueError(f"model.{field} is missing from the model config.")
  backbone = values["backbone"]
  _require(backbone in BACKBONES, "backbone", f"one of {BACKBONES}", backbone)
  _require(values["resnet_variant"] in RESNET_VARIANTS, "resnet_variant",
           f"one of {RESNET_VARIANTS}", values["resnet_variant"])
  _require(isinstance(values["deep_stem"], bool), "deep_stem", "a bool", values["deep_stem"])
  _require(values["output_stride"] in OUTPUT_STRIDES and _is_int(values["output_stride"]),
           "output_stride", "8 or 16", values["output_stride"])
  rates = values["aspp_rates"]
  _require(isinstance(rates, (tuple, list)) and len(rates) == 3
           and all(_is_int(r) and r >= 1 for r in rates),
           "aspp_rates", "3 positive ints", rates)
  for field in ("aspp_channels", "decoder_channels", "low_level_channels", "sgc_attention_dim"):
    _require(_is_int(values[field]) and values[field] >= 1, field, "a positive int", values[field])
  for field in ("aspp_dropout", "cls_dropout"):
    _require(isinstance(values[field], (int, float)) and 0 <= values[field] < 1, field,
             "a rate in [0, 1)", values[field])
  _require(isinstance(values["bn_momentum"], (int, float)) and 0 <= values["bn_momentum"] <= 1,
           "bn_momentum", "in [0, 1] (flax convention: running = m * running + (1 - m) * batch)",
           values["bn_momentum"])
  _require(isinstance(values["bn_epsilon"], (int, float)) and values["bn_epsilon"] > 0,
           "bn_epsilon", "> 0", values["bn_epsilon"])
  # Whether it divides the batch is only known at call time (GhostBatchNorm checks it there).
  _require(_is_int(values["bn_group_size"]) and values["bn_group_size"] >= 0, "bn_group_size",
           "an int >= 0 (0: statistics of the whole batch; G: of each G consecutive images)",
           values["bn_group_size"])
  _require(values["dtype"] in DTYPES, "dtype", f"one of {tuple(DTYPES)}", values["dtype"])
  resolved_normalization(model_config)  # Raises naming model.input_normalization.
  frozen = model_config.get("frozen_backbone_blocks", 0)
  _require(_is_int(frozen) and frozen >= 0, "frozen_backbone_blocks", "an int >= 0", frozen)
  _require(frozen == 0 or backbone in EFFICIENTNET_BACKBONES, "frozen_backbone_blocks",
           f"0 for {backbone} (only EfficientNet-Lite freezes blocks)", frozen)
  heads = head_fields(model_config)
  _require(isinstance(heads["separable_heads"], bool), "separable_heads", "a bool",
           heads["separable_heads"])
  _require(isinstance(heads["head_bn_momentum"], (int, float))
           and 0 <= heads["head_bn_momentum"] <= 1, "head_bn_momentum",
           "in [0, 1] (as model.bn_momentum)", heads["head_bn_momentum"])
  _require(isinstance(heads["cls_init_stddev"], (int, float)) and heads["cls_init_stddev"] >= 0,
           "cls_init_stddev", ">= 0 (0: variance scaling; > 0: truncated normal of that stddev)",
           heads["cls_init_stddev"])


def build_model(model_config, num_classes: int, *, rngs: nnx.Rngs) -> DeepLabV3Plus:
  """DeepLabv3+ for `num_classes` classes (background included) from a `config.model` section.

  Parameters are float32; `model_config.dtype` is the compute dtype.
  """
  validate_model_config(model_config)
  if not _is_int(num_classes) or num_classes < 2:
    raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}.")
  norm = NormConfig(momentum=float(model_config.bn_momentum),
                    epsilon=float(model_config.bn_epsilon), group_size=model_config.bn_group_size)
  dtype = DTYPES[model_config.dtype]
  heads = head_fields(model_config)
  if model_config.backbone in XCEPTION_BACKBONES:
    backbone = Xception65(output_stride=model_config.output_stride, norm=norm, dtype=dtype,
                          rngs=rngs)
  elif model_config.backbone in EFFICIENTNET_BACKBONES:
    # Its batch norms use epsilon 1e-3 whatever model.bn_epsilon says (the heads' epsilon).
    backbone = EfficientNetLite(output_stride=model_config.output_stride, norm=norm,
                                frozen_blocks=model_config.get("frozen_backbone_blocks", 0),
                                dtype=dtype, rngs=rngs)
  else:
    backbone = ResNet(RESNET_SPECS[model_config.backbone], deep_stem=model_config.deep_stem,
                      variant=model_config.resnet_variant,
                      output_stride=model_config.output_stride, norm=norm, dtype=dtype, rngs=rngs)
  return DeepLabV3Plus(
      backbone, num_classes, aspp_rates=tuple(model_config.aspp_rates),
      aspp_channels=model_config.aspp_channels, decoder_channels=model_config.decoder_channels,
      low_level_channels=model_config.low_level_channels,
      sgc_attention_dim=model_config.sgc_attention_dim,
      aspp_dropout=float(model_config.aspp_dropout), cls_dropout=float(model_config.cls_dropout),
      norm=norm, head_norm=dataclasses.replace(norm, momentum=float(heads["head_bn_momentum"])),
      separable_heads=heads["separable_heads"], cls_init_stddev=float(heads["cls_init_stddev"]),
      input_normalization=resolved_normalization(model_config), dtype=dtype, rngs=rngs)


def feature_size(input_size: int, stride: int) -> int:
  """Spatial size after `stride` of symmetric-padded stride-2 ops: each maps n -> ceil(n / 2), so
  513 -> 129 at stride 4 and 33 at stride 16; 97 -> 25 and 7."""
  return -(-input_size // stride)
