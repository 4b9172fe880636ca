"""PseudoSeg across datasets: COCO images labeled in VOC's 21 classes, tested on VOC val (SPEC 8-9).

  python -m pseudoseg_jax.main --config=configs/coco_voc_pseudoseg.py:voc_extra=true \
      --workdir=workdirs/coco_voc --config.data.data_dir=/path/to/tfds \
      --config.data.manual_dir=/path/to/voc_manual

The high-data setting of the seed's table: the labeled images are the COCO train2017 images that
hold at least one of the 20 VOC classes, their masks mapped to VOC (airplane -> aeroplane, couch ->
sofa, tv -> tvmonitor ...; the other 60 COCO things and all stuff are background); the unlabeled
pool is the other COCO train images, plus VOC's 10,582 train_aug images with voc_extra=true;
evaluation is on the 1,449 VOC val images.
Arguments after the colon: method=pseudoseg (default) or supervised (the baseline: the same labeled
images, no unlabeled stream); weak_labels=true (the unlabeled images come with image-level labels
from their masks); voc_extra=true (add VOC train_aug to the unlabeled pool; default false);
labeled_list=PATH (a list of COCO ids to label instead of every image with a VOC class);
backbone=xception65|resnet101|resnet50 (default xception65, the paper's network, with its ImageNet
weights by name; configs/voc_pseudoseg.py); steps=N (default 200,000, the COCO schedule of SPEC 7:
the paper does not say this setting's).
Data: TFDS's coco/2017_panoptic prepared beforehand (pseudoseg_jax/data/datasets/coco.py says how)
and the VOC archives in config.data.manual_dir (configs/voc_pseudoseg.py; prepared on first use).
Hardware: as configs/coco_pseudoseg.py (64 labeled + 64 unlabeled images per step). Not yet timed
here: no COCO or VOC data and no accelerator on the development machine.
Expected (SPEC 9, the seed's table, DeepLabv3+ with Xception-65 from ImageNet weights, VOC val
mIoU): baseline 76.96; PseudoSeg without image-level labels 77.40 (COCO train + COCO unlabeled)
and 78.20 (+ VOC 9k); with image-level labels 77.80 (COCO train) and 79.28 (+ VOC 9k). Not exactly
comparable: the paper's "COCO unlabeled" is COCO's separate unlabeled2017 set, which coco/2017_panoptic does not
hold: here the unlabeled COCO images are the train images without a VOC class.
"""

from pseudoseg_jax import config as config_lib
from pseudoseg_jax import recipes


def get_config(arg: str | None = None):
  args = config_lib.parse_args(
      arg, known=("method", "weak_labels", "voc_extra", "labeled_list", "backbone", "steps"),
      source="coco_voc_pseudoseg.py")
  config = config_lib.base_config()
  config.method = args.get("method", "pseudoseg")
  config.total_steps = int(args.get("steps", 200_000))
  # Crop 513 also for evaluation: VOC images are up to 500 px.
  recipes.paper_recipe(config, args.get("backbone", "xception65"))

  config.data.name = "coco_voc"
  config.data.num_classes = 21  # VOC's background + 20.
  config.data.train_split = "train"  # COCO's.
  config.data.eval_split = "val"  # VOC's.
  voc_extra = config_lib.parse_bool(args.get("voc_extra", "false"), "voc_extra")
  config.data.unlabeled_split = "train+voc_train_aug" if voc_extra else "train"
  config.data.labeled_list = args.get("labeled_list", "")
  config.data.unlabeled_includes_labeled = False
  config.pseudoseg.weak_labels = config_lib.parse_bool(args.get("weak_labels", "false"),
                                                       "weak_labels")
  return config
