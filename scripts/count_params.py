"""Prints trainable parameter counts (nnx.Param only, no BN running statistics) of the DeepLabv3+
variants at output stride 16, split by part. Uses nnx.eval_shape, so nothing is computed.

  python scripts/count_params.py [--num_classes=21]

Reference: UniMatch's PyTorch DeepLabv3+ (no classification head) has 40,475,957 parameters with its
deep-stem ResNet-50 and 59,468,085 with its deep-stem ResNet-101. "total w/o cls, sgc" is the number
to compare: it leaves out the classification and SGC heads, which PseudoSeg adds.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

# Runnable from a checkout without installing the package.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from pseudoseg_jax.config import base_config  # noqa: E402
from pseudoseg_jax.models import build_model  # noqa: E402

VARIANTS = (("resnet50", False), ("resnet50", True), ("resnet101", False), ("resnet101", True),
            ("resnet_tiny", False))
PARTS = ("backbone", "aspp", "decoder", "cls_head", "sgc")


def count_by_part(backbone: str, deep_stem: bool, num_classes: int) -> dict[str, int]:
  model_config = base_config().model
  model_config.backbone = backbone
  model_config.deep_stem = deep_stem
  model_config.output_stride = 16
  model = nnx.eval_shape(lambda: build_model(model_config, num_classes, rngs=nnx.Rngs(0)))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  counts = {part: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params[part]))
            for part in PARTS}
  if sum(counts.values()) != sum(math.prod(x.shape) for x in jax.tree.leaves(params)):
    raise RuntimeError(f"parameters outside {PARTS}: {sorted(params)}")
  return counts


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_classes", type=int, default=21)
  args = parser.parse_args()
  header = ("variant", *PARTS, "total", "total w/o cls, sgc")
  print(f"DeepLabv3+ trainable parameters, {args.num_classes} classes, output stride 16")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for backbone, deep_stem in VARIANTS:
    counts = count_by_part(backbone, deep_stem, args.num_classes)
    total = sum(counts.values())
    name = backbone + (" deep stem" if deep_stem else "")
    cells = [name, *(f"{counts[p]:,}" for p in PARTS), f"{total:,}",
             f"{total - counts['cls_head'] - counts['sgc']:,}"]
    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
