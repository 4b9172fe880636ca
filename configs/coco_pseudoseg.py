"""PseudoSeg (or its supervised baseline) on COCO 2017, 81 classes: the paper's setting (SPEC 7-8).

  python -m pseudoseg_jax.main --config=configs/coco_pseudoseg.py:split=1_512 \
      --workdir=workdirs/coco_1_512 --config.data.data_dir=/path/to/tfds

Arguments after the colon: split=1_512|1_256|1_128|1_64|1_32 (default 1_512): a seeded draw of
ceil(fraction x 118,287) train images, 232 / 463 / 925 / 1,849 / 3,697 (config.data.split_seed
picks the draw); labeled_list=PATH (a list of ids used instead of the draw, e.g. the paper's
512_all.txt, lines like train2017/000000177254); method=pseudoseg (default) or supervised (the
baseline: the same labeled images, no unlabeled stream); weak_labels=true (the unlabeled images
come with image-level labels from their masks); steps=N (default 200,000).
The unlabeled pool is the rest of train2017 (train minus the labeled images); evaluation is on the
5,000 val2017 images, padded to 641 (every COCO image fits).
Data: TFDS's coco/2017_panoptic, prepared beforehand from train2017.zip, val2017.zip and
panoptic_annotations_trainval2017.zip (pseudoseg_jax/data/datasets/coco.py says how; nothing is
downloaded). The first run then lists the train ids once (reads the 19 GB of records without
decoding, some minutes) and caches the list next to the prepared data.
Hardware: the original used 16 GPUs (4 labeled + 4 unlabeled images each, crop 513); the global
batch of 64 + 64 is split over whatever devices JAX sees (lower config.batch_size and
config.pseudoseg.unlabeled_batch_size together on fewer accelerators). Not yet timed here: no COCO
data and no accelerator on the development machine; 200,000 steps are about 6.7x the VOC run.
Expected: the paper's COCO numbers use DeepLabv3+ with Xception-65 from ImageNet weights, as
listed by the UniMatch README (val mIoU, 1/512 / 1/256 / 1/128 / 1/64 / 1/32): supervised 22.9 /
28.0 / 33.6 / 37.8 / 42.2, PseudoSeg 29.8 / 37.1 / 39.1 / 41.8 / 43.6. This config uses ResNet-101
(Xception-65 and loading ImageNet weights are open issues), so it is not directly comparable;
from scratch it will land far below.
"""

from pseudoseg_jax import config as config_lib
from pseudoseg_jax import recipes


def get_config(arg: str | None = None):
  args = config_lib.parse_args(
      arg, known=("split", "labeled_list", "method", "weak_labels", "steps"),
      source="coco_pseudoseg.py")
  split = args.get("split", "1_512")
  if split not in recipes.COCO_SPLITS:
    raise ValueError(f"Unknown COCO split {split!r}; known: {', '.join(recipes.COCO_SPLITS)}.")
  config = config_lib.base_config()
  config.method = args.get("method", "pseudoseg")
  config.total_steps = int(args.get("steps", 200_000))
  recipes.paper_recipe(config)
  config.eval_crop_size = 641  # SPEC 8: COCO images are up to 640 px a side.

  config.data.name = "coco"
  config.data.num_classes = 81  # Background + the 80 COCO things.
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.unlabeled_split = "train"
  config.data.labeled_list = args.get("labeled_list", "")
  config.data.num_labeled = 0
  config.data.labeled_fraction = (0.0 if config.data.labeled_list
                                  else recipes.parse_fraction(split))
  # The labeled images are a sliver of train: the pool is the rest, as the peers use it.
  config.data.unlabeled_includes_labeled = False
  config.pseudoseg.weak_labels = config_lib.parse_bool(args.get("weak_labels", "false"),
                                                       "weak_labels")
  return config
