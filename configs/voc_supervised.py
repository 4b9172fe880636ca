"""Supervised DeepLabv3+ on the labeled PASCAL VOC images only: PseudoSeg's baseline (SPEC 7-8).

  python -m pseudoseg_jax.main --config=configs/voc_supervised.py:split=92 \
      --workdir=workdirs/voc_sup_92 --config.data.manual_dir=/path/to/manual \
      --config.data.data_dir=/path/to/tfds

Arguments: split=92|183|366|732|1464|1_16|1_8|1_4|1_2 (default 1464; its published list),
labeled_list=PATH, split_seed=N, backbone=xception65|resnet101|resnet50 (default xception65, with
its ImageNet weights by name), steps=N (default 30,000): the same labeled images and network as
configs/voc_pseudoseg.py with the same arguments, so the two runs compare the methods and nothing
else.
Hardware and data: as configs/voc_pseudoseg.py (64 labeled images per step; no unlabeled stream,
so a step costs about a third of a PseudoSeg step). Not yet timed here (no VOC data, no
accelerator on the development machine).
Expected: with backbone=resnet101 the PyTorch peer UniMatch reports 45.1 / 55.3 / 64.8 / 69.7 /
73.5 mIoU for 92 / 183 / 366 / 732 / 1464 labels (crop 321); the seed's high-data baseline is
76.96 (SPEC 9).
"""

from pseudoseg_jax import config as config_lib
from pseudoseg_jax import recipes


def get_config(arg: str | None = None):
  args = config_lib.parse_args(
      arg, known=("split", "labeled_list", "split_seed", "backbone", "steps"),
      source="voc_supervised.py")
  return recipes.voc_config("supervised", args)
