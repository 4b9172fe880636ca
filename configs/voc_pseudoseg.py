"""PseudoSeg on PASCAL VOC 2012 + SBD, the paper's low-data setting (SPEC 7-8).

  python -m pseudoseg_jax.main --config=configs/voc_pseudoseg.py:split=92 --workdir=workdirs/voc_92 \
      --config.data.manual_dir=/path/to/manual --config.data.data_dir=/path/to/tfds

Arguments after the colon: split=92|183|366|732|1464 (classic: N of the 1,464 train images;
default 1464) or 1_16|1_8|1_4|1_2 (blended: that fraction of train_aug), labeled with the split's
published list (pseudoseg_jax/splits: the paper's own 16_clean_3 / 8_clean / 4_clean for
92 / 183 / 366, the peers' lists for the others); labeled_list=PATH (another list of ids);
split_seed=N (a draw of the split's size with that seed instead of the list); weak_labels=true (the
unlabeled train_aug images come with image-level labels); backbone= (below); steps=N (default
30,000).
Data: put VOCtrainval_11-May-2012.tar and SBD's benchmark.tgz (or SegmentationClassAug) in the manual
dir; the first run prepares the dataset (pseudoseg_jax/data/datasets/voc.py). Every path (workdir,
manual_dir, data_dir, init_from) may be local or gs://.
Backbone: backbone=xception65 (default; the paper's DeepLabv3+ with DeepLab's separable heads, BN
decay 0.9997 and 2x bias learning rate, recipes.use_deeplab_xception_heads) from DeepLab's ImageNet
checkpoint, or backbone=resnet101|resnet50 (the PyTorch peers' setting) from torchvision's; the
weights are downloaded by name once (model.init_from; pseudoseg_jax/convert/named_weights.py).
Hardware (global batch sizes: the mesh splits them over whatever devices JAX sees; not timed yet,
no VOC data or accelerator on the development machine):
  16 GPUs (the original: 4 + 4 images each)  defaults; --config.model.bn_group_size=4 gives its
                                              per-GPU batch-norm statistics exactly;
  TPU v4-32 (16 chips, 4 + 4 each)            the same;
  8 GPUs (8 + 8 each)                         defaults, --config.model.bn_group_size=4;
  1 GPU                                       --config.batch_size=8
                                              --config.pseudoseg.unlabeled_batch_size=8 (8x smaller
                                              than the paper's batch: expect lower numbers).
Expected: the paper's Table 1 with Xception-65; with backbone=resnet101, compare with the
supervised baselines UniMatch reports for this protocol (ResNet-101, crop 321): 45.1 / 55.3 / 64.8
/ 69.7 / 73.5 mIoU for 92 / 183 / 366 / 732 / 1464 labels (configs/voc_supervised.py).
"""

from pseudoseg_jax import config as config_lib
from pseudoseg_jax import recipes


def get_config(arg: str | None = None):
  args = config_lib.parse_args(
      arg, known=("split", "labeled_list", "split_seed", "backbone", "weak_labels", "steps"),
      source="voc_pseudoseg.py")
  return recipes.voc_config("pseudoseg", args)
