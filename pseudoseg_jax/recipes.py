"""The published training recipes and labeled splits, shared by the configs in configs/.

Config files stay short and declarative; what two of them would otherwise repeat (the VOC recipe,
the meaning of `split=1_16`) lives here, once.
"""

from __future__ import annotations

import fractions

import ml_collections

from pseudoseg_jax import config as config_lib
from pseudoseg_jax import splits

# VOC split names: a count of the 1,464 finely labeled images ("classic", the PseudoSeg paper's
# protocol) or a fraction of the 10,582 train_aug images ("blended", the later peers' protocol).
VOC_CLASSIC_SPLITS = ("92", "183", "366", "732", "1464")
VOC_BLENDED_SPLITS = ("1_16", "1_8", "1_4", "1_2")
COCO_SPLITS = ("1_512", "1_256", "1_128", "1_64", "1_32")


def parse_fraction(name: str) -> float:
  """'1_16' -> 1/16."""
  numerator, _, denominator = name.partition("_")
  return float(fractions.Fraction(int(numerator), int(denominator)))


# backbone=NAME config argument -> what it sets: the paper's network, or the peers' ResNets, each
# with its ImageNet weights by name (convert/named_weights.py).
PAPER_BACKBONES = ("xception65", "resnet101", "resnet50")


def paper_recipe(config: ml_collections.ConfigDict, backbone: str = "xception65") -> None:
  """SPEC 7: SGD momentum 0.9, lr 0.007 poly 0.9, weight decay 4e-5, crop 513, 64 + 64 images,
  output stride 16, ASPP 6/12/18, on `backbone` with its ImageNet weights (use_paper_backbone)."""
  config.optimizer.name = "sgd"
  config.optimizer.learning_rate = 0.007
  config.optimizer.momentum = 0.9
  config.optimizer.poly_power = 0.9
  config.optimizer.weight_decay = 4e-5
  config.crop_size = 513
  config.eval_crop_size = 513
  config.scales = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
  config.batch_size = 64
  config.pseudoseg.unlabeled_batch_size = 64
  config.pseudoseg.cutout_size = 100
  config.model.output_stride = 16
  config.model.aspp_rates = (6, 12, 18)
  use_paper_backbone(config, backbone)


def use_paper_backbone(config: ml_collections.ConfigDict, backbone: str) -> None:
  """xception65: the paper's DeepLabv3+ (use_deeplab_xception_heads) from DeepLab's ImageNet
  checkpoint; resnet101 / resnet50: the PyTorch peers' setting (dense heads), from torchvision's
  ImageNet weights. --config.model.init_from= (empty) trains the backbone from scratch instead."""
  if backbone not in PAPER_BACKBONES:
    raise ValueError(f"backbone={backbone!r}: one of {', '.join(PAPER_BACKBONES)}.")
  if backbone == "xception65":
    use_deeplab_xception_heads(config)
    config.model.init_from = "xception65_imagenet"
  else:
    config.model.backbone = backbone
    config.model.init_from = f"{backbone}_torchvision"


def use_deeplab_xception_heads(config: ml_collections.ConfigDict) -> None:
  """The paper's Xception-65 DeepLabv3+ with the original's head and training details (wss paths).

  Separable ASPP and decoder convs: common.py:71,96 default True, split at core/utils.py:61-107.
  BN decay 0.9997: heads (core/model.py:458,703), xception_65 (core/feature_extractor.py:628).
  Classifier init: xception_arg_scope's truncated normal 0.09 (core/xception.py:504-505, 928-931).
  Biases at 2x the learning rate: utils/train_utils.py:252-254 via train_wss.py:1031-1035.
  (core/ and utils/ under third_party/deeplab/, except core/model.py.)
  """
  config.model.backbone = "xception65"
  config.model.separable_heads = True
  config.model.bn_momentum = 0.9997
  config.model.head_bn_momentum = 0.9997
  config.model.cls_init_stddev = 0.09
  config.optimizer.bias_lr_multiplier = 2.0


def use_confirmation_bias_remedies(config: ml_collections.ConfigDict) -> None:
  """The CPU recipes' PseudoSeg (configs/folder.py:preset=cpu, configs/demo.py): a mean teacher,
  hard pseudo labels at confidence 0.9 or in the most confident half of their class (the half
  decides: the calibrated fusion rarely reaches 0.9), CutMix, a consistency ramp-up over the
  first fifth of config.total_steps, and with weak_labels=true pseudo labels restricted to the
  image-level labels. None is in the paper (README, "PseudoSeg options")."""
  config.pseudoseg.update(teacher="ema", ema_decay=0.99, soft_labels=False,
                          confidence_threshold=0.9, class_balanced_fraction=0.5,
                          cutmix_probability=0.5,
                          consistency_rampup_steps=config.total_steps // 5,
                          restrict_to_image_labels=True)


def parse_split_seed(args: dict) -> int | None:
  """The config argument split_seed=N (a seeded draw instead of the published list), or None."""
  return int(args["split_seed"]) if args.get("split_seed", "") != "" else None


def choose_labeled(data: ml_collections.ConfigDict, dataset: str, split: str, labeled_list: str,
                   split_seed: int | None) -> bool:
  """Sets data.labeled_list (and data.split_seed for a draw): `labeled_list` if given, else a draw
  with `split_seed` if given, else the split's published list (none for VOC's 1464, all of
  train). Returns whether the labeled images are drawn (the caller sets the draw's size)."""
  drawn = not labeled_list and split_seed is not None
  if not labeled_list and not drawn and split != "1464":
    labeled_list = splits.published_list(dataset, split)
  data.labeled_list = labeled_list
  if drawn:
    data.split_seed = split_seed
  return drawn


def voc_data(config: ml_collections.ConfigDict, split: str, labeled_list: str = "",
             split_seed: int | None = None) -> None:
  """PASCAL VOC 2012 + SBD with the labeled images of `split` (module docstring).

  The labeled images are `labeled_list` if given, else a draw with `split_seed` if given, else the
  published list of the split (pseudoseg_jax/splits: the paper's own for 92 / 183 / 366, the peers'
  for the rest); split 1464 is all of train. Classic splits keep the labeled images in the
  unlabeled train_aug pool as the original does; blended splits leave them out of it as the
  PyTorch peers do.
  """
  config.data.name = "voc"
  config.data.num_classes = 21
  config.data.eval_split = "val"
  config.data.unlabeled_split = "train_aug"
  if split not in VOC_CLASSIC_SPLITS + VOC_BLENDED_SPLITS:
    raise ValueError(f"Unknown VOC split {split!r}; known: "
                     f"{', '.join(VOC_CLASSIC_SPLITS + VOC_BLENDED_SPLITS)}.")
  drawn = choose_labeled(config.data, "voc", split, labeled_list, split_seed)
  classic = split in VOC_CLASSIC_SPLITS
  config.data.train_split = "train" if classic else "train_aug"
  config.data.num_labeled = int(split) if drawn and classic and split != "1464" else 0
  config.data.labeled_fraction = parse_fraction(split) if drawn and not classic else 0.0
  config.data.unlabeled_includes_labeled = classic


def voc_config(method: str, args: dict) -> ml_collections.ConfigDict:
  """configs/voc_{supervised,pseudoseg}.py: the paper's recipe on the VOC split of `args`."""
  config = config_lib.base_config()
  config.method = method
  config.total_steps = int(args.get("steps", 30_000))
  paper_recipe(config, args.get("backbone", "xception65"))
  voc_data(config, args.get("split", "1464"), args.get("labeled_list", ""),
           parse_split_seed(args))
  config.pseudoseg.weak_labels = config_lib.parse_bool(args.get("weak_labels", "false"),
                                                       "weak_labels")
  return config
