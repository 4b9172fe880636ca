"""PseudoSeg (or its supervised baseline) on COCO 2017, 81 classes: the paper's setting (SPEC 7-8).

  python -m pseudoseg_jax.main --config=configs/coco_pseudoseg.py:split=1_512 \
      --workdir=workdirs/coco_1_512 --config.data.data_dir=/path/to/tfds

Arguments after the colon: split=1_512|1_256|1_128|1_64|1_32 (default 1_512): the paper's published
list of 232 / 463 / 925 / 1,849 / 3,697 train images (pseudoseg_jax/splits/coco);
labeled_list=PATH (another list of ids, lines like train2017/000000177254); split_seed=N (a draw of
ceil(fraction x 118,287) images with that seed instead of the list); backbone=xception65 (default)
|resnet101|resnet50; method=pseudoseg (default) or supervised (the
baseline: the same labeled images, no unlabeled stream); weak_labels=true (the unlabeled images
come with image-level labels from their masks); steps=N (default 200,000).
The unlabeled pool is the rest of train2017 (train minus the labeled images); evaluation is on the
5,000 val2017 images, padded to 641 (every COCO image fits).
Data: TFDS's coco/2017_panoptic, prepared beforehand from train2017.zip, val2017.zip and
panoptic_annotations_trainval2017.zip (pseudoseg_jax/data/datasets/coco.py says how; nothing is
downloaded). The first run then lists the train ids once (reads the 19 GB of records without
decoding, some minutes) and caches the list next to the prepared data.
Hardware: as configs/voc_pseudoseg.py (its table of batch sizes and batch-norm groups for 1 GPU,
8 GPUs, 16 GPUs and a TPU v4-32). Not yet timed here: no COCO data and no accelerator on the
development machine; 200,000 steps are about 6.7x the VOC run.
Expected, with backbone=xception65 (default: the paper's DeepLabv3+ from DeepLab's ImageNet
checkpoint, downloaded by name), the paper's COCO numbers as listed by the UniMatch README (val
mIoU, 1/512 / 1/256 / 1/128 / 1/64 / 1/32): supervised 22.9 / 28.0 / 33.6 / 37.8 / 42.2, PseudoSeg
29.8 / 37.1 / 39.1 / 41.8 / 43.6. backbone=resnet101|resnet50 is the peers' network (torchvision's
ImageNet weights), not directly comparable.
"""

from pseudoseg_jax import config as config_lib
from pseudoseg_jax import recipes


def get_config(arg: str | None = None):
  args = config_lib.parse_args(
      arg, known=("split", "labeled_list", "split_seed", "backbone", "method", "weak_labels",
                  "steps"),
      source="coco_pseudoseg.py")
  split = args.get("split", "1_512")
  if split not in recipes.COCO_SPLITS:
    raise ValueError(f"Unknown COCO split {split!r}; known: {', '.join(recipes.COCO_SPLITS)}.")
  config = config_lib.base_config()
  config.method = args.get("method", "pseudoseg")
  config.total_steps = int(args.get("steps", 200_000))
  recipes.paper_recipe(config, args.get("backbone", "xception65"))
  config.eval_crop_size = 641  # SPEC 8: COCO images are up to 640 px a side.

  config.data.name = "coco"
  config.data.num_classes = 81  # Background + the 80 COCO things.
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.unlabeled_split = "train"
  drawn = recipes.choose_labeled(config.data, "coco", split, args.get("labeled_list", ""),
                                 recipes.parse_split_seed(args))
  config.data.num_labeled = 0
  config.data.labeled_fraction = recipes.parse_fraction(split) if drawn else 0.0
  # The labeled images are a sliver of train: the pool is the rest, as the peers use it.
  config.data.unlabeled_includes_labeled = False
  config.pseudoseg.weak_labels = config_lib.parse_bool(args.get("weak_labels", "false"),
                                                       "weak_labels")
  return config
