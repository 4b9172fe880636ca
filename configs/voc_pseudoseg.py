"""PseudoSeg on PASCAL VOC 2012 + SBD, the paper's low-data setting (SPEC 7-8).

  python -m pseudoseg_jax.main --config=configs/voc_pseudoseg.py:split=92 --workdir=workdirs/voc_92 \
      --config.data.manual_dir=/path/to/manual --config.data.data_dir=/path/to/tfds \
      --config.model.init_from=resnet101_torchvision

Arguments after the colon: split=92|183|366|732|1464 (classic: N of the 1,464 train images;
default 1464) or 1_16|1_8|1_4|1_2 (blended: that fraction of train_aug), labeled with the split's
published list (pseudoseg_jax/splits: the paper's own 16_clean_3 / 8_clean / 4_clean for
92 / 183 / 366, the peers' lists for the others); labeled_list=PATH (another list of ids);
split_seed=N (a draw of the split's size with that seed instead of the list); weak_labels=true (the
unlabeled train_aug images come with image-level labels); steps=N (default 30,000).
Data: put VOCtrainval_11-May-2012.tar and SBD's benchmark.tgz (or SegmentationClassAug) in the manual
dir; the first run prepares the dataset (pseudoseg_jax/data/datasets/voc.py). Every path (workdir,
manual_dir, data_dir, init_from) may be local or gs://.
Backbone: ResNet-101 (the PyTorch peers' backbone); model.init_from=resnet101_torchvision downloads
torchvision's ImageNet weights once (pseudoseg_jax/convert/named_weights.py; a .safetensors or .pth
path works too). The paper's DeepLabv3+ Xception-65: --config.model.backbone=xception65
--config.model.init_from=xception65_imagenet (DeepLab's ImageNet checkpoint). Without init_from the
backbone starts from scratch and lands far below the numbers below.
Hardware and time: the original used 16 GPUs (4 labeled + 4 unlabeled images each, crop 513); the
global batch of 64 + 64 is split over whatever devices JAX sees (lower config.batch_size and
config.pseudoseg.unlabeled_batch_size together on fewer accelerators). Not timed yet: this config
has not been run on VOC on an accelerator (BENCHMARKS.md, "Train step, GPU": not yet measured).
Expected: with ImageNet ResNet-101 weights, compare with the supervised baselines the PyTorch peer
UniMatch reports for this protocol (ResNet-101, crop 321): 45.1 / 55.3 / 64.8 / 69.7 / 73.5 mIoU for
92 / 183 / 366 / 732 / 1464 labels (configs/voc_supervised.py); with Xception-65, the paper's
Table 1.
"""

from pseudoseg_jax import config as config_lib
from pseudoseg_jax import recipes


def get_config(arg: str | None = None):
  args = config_lib.parse_args(arg, known=("split", "labeled_list", "split_seed", "weak_labels", "steps"),
                               source="voc_pseudoseg.py")
  return recipes.voc_config("pseudoseg", args)
