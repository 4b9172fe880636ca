"""The one schema of an experiment config: every field, its default, and the checks on it.

Experiment files in configs/ start from `base_config()` and override fields. `validate` rejects
unknown fields (a typo such as `config.optimizer.learning_rte` must not be silently ignored) and
values the trainer cannot honour, naming the field.
"""

from __future__ import annotations

import difflib
import os

import ml_collections

OPTIMIZERS = ("sgd", "adam")
METHODS = ("supervised", "pseudoseg")
PSEUDO_LABEL_SOURCES = ("fusion", "decoder", "sgc")
TEACHERS = ("student", "ema")
EMA_WARMUPS = ("average", "recent")  # steps.ema_decay_at.
ALIGNMENT_TARGETS = ("labeled", "uniform")  # steps.alignment_target.
BATCH_STATS_SOURCES = ("all", "labeled")  # steps.pseudoseg_loss.
FEATURE_PERTURBATIONS = ("none", "strong", "stream")  # steps.unlabeled_forward.


def base_config() -> ml_collections.ConfigDict:
  """All fields with their defaults (SPEC section 7 recipe where it applies)."""
  config = ml_collections.ConfigDict()
  config.method = "supervised"
  config.seed = 0
  config.total_steps = 30_000
  config.batch_size = 64  # Global labeled batch, split over all devices and hosts.
  config.crop_size = 513
  config.eval_crop_size = 513
  config.scales = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)

  config.data = ml_collections.ConfigDict()
  config.data.name = "synthetic_shapes"  # One of datasets.SOURCES: voc, coco, coco_voc, folder...
  config.data.data_dir = ""  # TFDS data_dir; empty = TFDS default (~/tensorflow_datasets).
  # Where VOC/SBD/COCO archives were put by hand; empty = TFDS's default, DATA_DIR/downloads/manual.
  config.data.manual_dir = ""
  config.data.root = ""  # The folder dataset's ROOT (data.name='folder').
  # The labeled images (datasets/subsets.py): a list file of ids, else a seeded sample of
  # num_labeled images or of ceil(labeled_fraction x pool), else the whole train_split.
  # synthetic_shapes takes the first num_labeled images instead (it is generated i.i.d.).
  config.data.labeled_list = ""
  config.data.num_labeled = 0
  config.data.labeled_fraction = 0.0
  config.data.split_seed = 0
  config.data.train_split = "train"  # The pool the labeled images come from.
  # PseudoSeg's unlabeled pool: this split (empty = train_split) minus the labeled images, or
  # with them when unlabeled_includes_labeled (the original's VOC setting: the 10,582 train_aug
  # images include the labeled ones).
  config.data.unlabeled_split = ""
  config.data.unlabeled_includes_labeled = False
  config.data.eval_split = "validation"
  config.data.num_classes = 8  # synthetic_shapes: background + 7 shapes.
  config.data.class_names = ()  # The folder dataset's names; empty = ROOT/classes.txt or numbers.
  config.data.ignore_label = 255
  # A corrupt or inconsistent image or mask stops the run naming the file; True skips it, logged
  # and counted, where a source checks its files (folder; VOC and COCO when they are prepared).
  config.data.skip_bad_examples = False
  config.data.shuffle_buffer = 2_048
  # Training streams are read as this many shards (each every S-th example, its own seeds), put
  # side by side in each global batch; every process reads S / processes of them. 0 = one per
  # process, each host reading only its own. Fix S (e.g. to the most hosts a run will use) to
  # train on the same batches with any number of processes that divides it.
  config.data.stream_shards = 0

  config.model = ml_collections.ConfigDict()
  config.model.backbone = "resnet50"  # resnet50 | resnet101 | resnet_tiny | xception65 |
  # efficientnet_lite0.
  config.model.deep_stem = False
  # ResNet block layout: "torchvision" (stride on the 3x3 conv, no conv biases: torchvision and
  # timm weights) or "keras" (Keras applications' v1: stride on the first 1x1 conv, conv biases).
  config.model.resnet_variant = "torchvision"
  # Pretrained backbone weights loaded at step 0 (pseudoseg_jax/convert): .safetensors/.pth
  # (torchvision, timm), Keras .h5, a DeepLab TF checkpoint (Xception-65), or an .npz written by
  # `python -m pseudoseg_jax.convert`. Empty = random init. The heads always start fresh.
  config.model.init_from = ""
  # What the backbone's input is normalized as (models/normalization.py): signed_unit,
  # efficientnet_lite, imagenet_mean_std or caffe_bgr; empty = the default of model.init_from's
  # weights (signed_unit without weights), written resolved into the run's config.json.
  config.model.input_normalization = ""
  config.model.output_stride = 16
  # EfficientNet-Lite only: its stem and first N blocks keep their pretrained weights and running
  # statistics (inference-mode batch norm, no gradient): the high-resolution layers, which cost
  # most of a CPU step's backward pass and learn least from a few labeled images. 0 = all train.
  config.model.frozen_backbone_blocks = 0
  config.model.aspp_rates = (6, 12, 18)
  config.model.aspp_channels = 256
  config.model.decoder_channels = 256
  config.model.low_level_channels = 48
  config.model.sgc_attention_dim = 128  # Key/query width of the SGC head (SPEC 3).
  config.model.aspp_dropout = 0.1  # TF keep_prob 0.9.
  config.model.cls_dropout = 0.5
  config.model.bn_momentum = 0.9  # The backbone's (DeepLab: 0.9997 Xception, 0.95 ResNet).
  config.model.bn_epsilon = 1e-5
  # Batch-norm statistics in training: 0 = over the whole batch of each forward pass (synchronized
  # across devices under jit); G > 0 = over each group of G consecutive images ("ghost" BN), e.g. 4
  # for the original's per-GPU statistics (16 GPUs x 4 images). G must divide each batch the model
  # sees (batch_size, pseudoseg.unlabeled_batch_size); a per-device batch that is a multiple of G
  # keeps the groups on one device. Parameter shapes do not depend on it: a run may resume with
  # another value. The SGC head's norm groups the same way.
  config.model.bn_group_size = 0
  config.model.dtype = "float32"
  # DeepLab's own heads (recipes.use_deeplab_xception_heads sets the original's values): its split
  # separable 3x3 convs in the ASPP and decoder, with its initializers for the heads' 1x1 convs
  # (Glorot uniform) and logits (truncated normal, stddev 0.01); the ASPP's and decoder's BN
  # momentum (DeepLab: 0.9997 on every backbone); the classifier's init, 0 = variance scaling
  # (ResNet's arg scope), > 0 = truncated normal of that stddev (Xception's: 0.09).
  config.model.separable_heads = False
  config.model.head_bn_momentum = 0.9
  config.model.cls_init_stddev = 0.0

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "sgd"  # SPEC 7 recipe. "adam" for from-scratch runs such as the demo.
  config.optimizer.learning_rate = 0.007
  config.optimizer.momentum = 0.9
  config.optimizer.poly_power = 0.9
  config.optimizer.weight_decay = 4e-5
  config.optimizer.end_learning_rate = 0.0
  # Learning-rate factor of conv and linear biases (not norm offsets); DeepLab's optimizer: 2.
  config.optimizer.bias_lr_multiplier = 1.0

  # PseudoSeg (method='pseudoseg'); defaults are the authors' (SPEC 3-6). The switches reproduce the
  # paper's ablations.
  config.pseudoseg = ml_collections.ConfigDict()
  config.pseudoseg.unlabeled_batch_size = 64  # Global, like batch_size.
  # True: the unlabeled images come with image-level labels (the weakly-labeled setting): the CAM
  # uses them and the classifier trains on them. False: the classifier's predictions stand in.
  config.pseudoseg.weak_labels = False
  config.pseudoseg.pseudo_label_source = "fusion"  # "fusion" | "decoder" | "sgc".
  config.pseudoseg.calibrated = True  # False: plain weighted average of the two softmaxes.
  config.pseudoseg.gamma = 0.5  # Weight of the decoder in the fusion.
  config.pseudoseg.fusion_group_size = 4  # Images per calibration scalar (the original's 4 per GPU).
  config.pseudoseg.soft_labels = True  # False: argmax labels.
  config.pseudoseg.temperature = 0.5  # Sharpening of soft labels.
  config.pseudoseg.confidence_threshold = 0.0  # Pixels below it do not count; 0 = all count.
  config.pseudoseg.strong_augment = True  # False: the strong view is the weak view.
  config.pseudoseg.cutout_size = 100  # Side of the strong view's cutout box in pixels; 0 = none.
  # The strong view's colour jitter strengths (brightness, contrast, saturation, hue), SPEC's by
  # default. A hue of 0.25 turns green into blue or red: lower it where colour tells the classes.
  config.pseudoseg.color_jitter = (0.5, 0.5, 0.5, 0.25)
  config.pseudoseg.consistency_weight = 1.0
  # Not in the original (0 = off): raise the consistency weight from 0 over this many steps, for
  # models trained from scratch whose first pseudo labels are noise (see steps.consistency_weight).
  config.pseudoseg.consistency_rampup_steps = 0
  # Remedies for confirmation bias, none in the original (whose behaviour the defaults keep):
  # "ema": an exponential moving average of the model, in inference mode, makes the pseudo labels
  # (mean teacher); "student": the network being trained does, in training mode (the original).
  config.pseudoseg.teacher = "student"
  config.pseudoseg.ema_decay = 0.99
  # How the teacher's decay rises to ema_decay (steps.ema_decay_at): "average" (Mean Teacher's, the
  # plain average of every model so far) or "recent" (TF's num_updates schedule).
  config.pseudoseg.ema_warmup = "average"
  # Probability that an unlabeled image's strong view gets a box of its batch neighbour's, with
  # the pseudo labels mixed alike (CutMix, as CPS and UniMatch); 0 = off.
  config.pseudoseg.cutmix_probability = 0.0
  # > 0: class-balanced confidence (pseudo_labels.class_balanced_confident): of every class in a
  # batch's pseudo labels, at least this fraction of its most confident pixels counts even below
  # confidence_threshold. 0 = one threshold for all classes.
  config.pseudoseg.class_balanced_fraction = 0.0
  # True: the teacher's probabilities are scaled per class by the labeled masks' class frequency
  # over its own (pseudo_labels.align_distribution, ReMixMatch's distribution alignment), both
  # running averages with this momentum, so that rare labeled classes stay in the pseudo labels.
  config.pseudoseg.distribution_alignment = False
  config.pseudoseg.distribution_alignment_momentum = 0.99
  # What the teacher's class frequencies are scaled towards: "labeled" (ReMixMatch) or "uniform"
  # (DebiasPL: divide by the teacher's own running class prior, whatever the labeled images hold).
  config.pseudoseg.distribution_alignment_target = "labeled"
  # The scaling's exponent: (target / predicted)^strength; 1 = full alignment, 0 = none.
  config.pseudoseg.distribution_alignment_strength = 1.0
  # With weak_labels: the pseudo labels keep only the classes the image-level labels name
  # (pseudo_labels.restrict_to_present_classes). False = the original (only the CAM uses them).
  config.pseudoseg.restrict_to_image_labels = False
  # True: a class the image holds (its image-level labels name it, else the classifier guesses
  # it) that no pixel's argmax gives has its probabilities scaled to a peak of 1 over the image
  # (pseudo_labels.claim_present_classes), so a rare class the teacher under-predicts claims its
  # likeliest pixels. Not in the original.
  config.pseudoseg.claim_present_classes = False
  # Which training passes move the batch-norm running statistics that evaluation uses: "all" (the
  # original: labeled images and the unlabeled strong view alike) or "labeled" (the strong view's
  # cutout, jitter and CutMix boxes stay out of the statistics the clean validation images meet).
  config.pseudoseg.batch_stats_from = "all"
  # UniMatch's feature perturbation, channel dropout at feature_dropout on the backbone features the
  # heads read: "none" (the original), "strong" (on the strong view's pass, at no extra cost) or
  # "stream" (UniMatch's own: an extra pass of the student on the weak view, its dropped features
  # learning the pseudo labels with the consistency weight; one more network pass per step).
  config.pseudoseg.feature_perturbation = "none"
  config.pseudoseg.feature_dropout = 0.5

  # A step whose loss or gradient norm is not finite stops the run with an error naming it, and
  # nothing of it is saved (the last checkpoint stays the last good state). True instead discards
  # such steps' updates on the device and counts them ('train/skipped_steps' in metrics.jsonl).
  config.skip_nonfinite_steps = False

  config.log_every = 50
  config.image_summary_every = 1_000  # TensorBoard grid of views and pseudo labels; 0 = never.
  config.eval_every = 1_000
  config.checkpoint_every = 1_000
  config.keep_checkpoints = 3
  config.eval_batch_size = 16
  return config


def _flat_fields(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
  fields = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      fields.update(_flat_fields(value, name + "."))
    else:
      fields[name] = value
  return fields


def _check_known_fields(config: ml_collections.ConfigDict) -> None:
  known = _flat_fields(base_config())
  for name in _flat_fields(config):
    if name not in known:
      close = difflib.get_close_matches(name, known, n=1)
      hint = f" (did you mean '{close[0]}'?)" if close else ""
      raise ValueError(f"Unknown config field '{name}'{hint}.")


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field."""
  _check_known_fields(config)
  if config.method not in METHODS:
    raise ValueError(f"config.method must be one of {METHODS}, got {config.method!r}.")
  if config.optimizer.name not in OPTIMIZERS:
    raise ValueError(
        f"config.optimizer.name must be one of {OPTIMIZERS}, got {config.optimizer.name!r}.")
  if not config.optimizer.bias_lr_multiplier > 0:
    raise ValueError("config.optimizer.bias_lr_multiplier must be > 0, got "
                     f"{config.optimizer.bias_lr_multiplier}.")
  # The model section has one validator, next to the code that builds the model. Imported here
  # for start-up speed, not for a cycle: config files import this module; models brings jax, flax.
  from pseudoseg_jax.models import validate_model_config
  validate_model_config(config.model)
  for field in ("crop_size", "eval_crop_size"):
    minimum = min_crop_size(config.model.output_stride)
    if config[field] < minimum:
      raise ValueError(
          f"config.{field}={config[field]} is too small for output stride "
          f"{config.model.output_stride}: the stride-{config.model.output_stride} feature map "
          f"needs at least 2x2 positions, so the crop must be >= {minimum}.")
  for field in ("total_steps", "batch_size", "log_every", "eval_every", "checkpoint_every",
                "keep_checkpoints", "eval_batch_size"):
    if config[field] < 1:
      raise ValueError(f"config.{field} must be >= 1, got {config[field]}.")
  if not config.scales or min(config.scales) <= 0:
    raise ValueError(f"config.scales must be positive factors, got {config.scales}.")
  if config.data.num_labeled < 0:
    raise ValueError(f"config.data.num_labeled must be >= 0, got {config.data.num_labeled}.")
  if not isinstance(config.data.stream_shards, int) or config.data.stream_shards < 0:
    raise ValueError("config.data.stream_shards must be an int >= 0 (0 = one per process), got "
                     f"{config.data.stream_shards!r}.")
  if config.data.num_classes < 2:
    raise ValueError(f"config.data.num_classes must be >= 2, got {config.data.num_classes}.")
  if config.image_summary_every < 0:
    raise ValueError(f"config.image_summary_every must be >= 0, got {config.image_summary_every}.")
  if config.method == "pseudoseg":
    _validate_pseudoseg(config.pseudoseg)
  _validate_bn_groups(config)


def _validate_bn_groups(config: ml_collections.ConfigDict) -> None:
  """Every batch the model trains on splits into whole groups of model.bn_group_size images."""
  group_size = config.model.bn_group_size
  batches = {"batch_size": config.batch_size}
  if config.method == "pseudoseg":
    batches["pseudoseg.unlabeled_batch_size"] = config.pseudoseg.unlabeled_batch_size
  for field, size in batches.items():
    if group_size and size % group_size:
      raise ValueError(f"config.model.bn_group_size={group_size} must divide config.{field}="
                       f"{size}: batch statistics are taken per group of that many images.")


def _validate_pseudoseg(section: ml_collections.ConfigDict) -> None:
  if section.pseudo_label_source not in PSEUDO_LABEL_SOURCES:
    raise ValueError(f"config.pseudoseg.pseudo_label_source must be one of {PSEUDO_LABEL_SOURCES}, "
                     f"got {section.pseudo_label_source!r}.")
  if section.unlabeled_batch_size < 1:
    raise ValueError("config.pseudoseg.unlabeled_batch_size must be >= 1, got "
                     f"{section.unlabeled_batch_size}.")
  if section.fusion_group_size < 1 or section.unlabeled_batch_size % section.fusion_group_size:
    raise ValueError(
        f"config.pseudoseg.fusion_group_size={section.fusion_group_size} must be >= 1 and divide "
        f"config.pseudoseg.unlabeled_batch_size={section.unlabeled_batch_size}.")
  if not 0 <= section.gamma <= 1:
    raise ValueError(f"config.pseudoseg.gamma must be in [0, 1], got {section.gamma}.")
  if section.temperature <= 0:
    raise ValueError(f"config.pseudoseg.temperature must be > 0, got {section.temperature}.")
  if not 0 <= section.confidence_threshold < 1:
    raise ValueError("config.pseudoseg.confidence_threshold must be in [0, 1), got "
                     f"{section.confidence_threshold}.")
  if section.consistency_rampup_steps < 0:
    raise ValueError("config.pseudoseg.consistency_rampup_steps must be >= 0, got "
                     f"{section.consistency_rampup_steps}.")
  if section.ema_warmup not in EMA_WARMUPS:
    raise ValueError(f"config.pseudoseg.ema_warmup must be one of {EMA_WARMUPS}, got "
                     f"{section.ema_warmup!r}.")
  if section.teacher not in TEACHERS:
    raise ValueError(f"config.pseudoseg.teacher must be one of {TEACHERS}, got {section.teacher!r}.")
  for field in ("ema_decay", "cutmix_probability", "class_balanced_fraction",
                "distribution_alignment_momentum"):
    if not 0 <= section[field] <= 1:
      raise ValueError(f"config.pseudoseg.{field} must be in [0, 1], got {section[field]}.")
  if section.distribution_alignment_target not in ALIGNMENT_TARGETS:
    raise ValueError("config.pseudoseg.distribution_alignment_target must be one of "
                     f"{ALIGNMENT_TARGETS}, got {section.distribution_alignment_target!r}.")
  if section.batch_stats_from not in BATCH_STATS_SOURCES:
    raise ValueError("config.pseudoseg.batch_stats_from must be one of "
                     f"{BATCH_STATS_SOURCES}, got {section.batch_stats_from!r}.")
  if section.feature_perturbation not in FEATURE_PERTURBATIONS:
    raise ValueError("config.pseudoseg.feature_perturbation must be one of "
                     f"{FEATURE_PERTURBATIONS}, got {section.feature_perturbation!r}.")
  if not 0 <= section.feature_dropout < 1:
    raise ValueError("config.pseudoseg.feature_dropout must be in [0, 1), got "
                     f"{section.feature_dropout}.")
  if section.distribution_alignment_strength < 0:
    raise ValueError("config.pseudoseg.distribution_alignment_strength must be >= 0, got "
                     f"{section.distribution_alignment_strength}.")
  if section.cutout_size < 0:
    raise ValueError(f"config.pseudoseg.cutout_size must be >= 0, got {section.cutout_size}.")
  if (section.claim_present_classes and not section.weak_labels
      and section.pseudo_label_source == "decoder"):
    raise ValueError("config.pseudoseg.claim_present_classes needs the classes each image holds: "
                     "image-level labels (pseudoseg.weak_labels=True) or the classifier's guess, "
                     "which pseudo_label_source='decoder' does not compute; use 'fusion' or 'sgc'.")
  _check_color_jitter(tuple(section.color_jitter))


def _check_color_jitter(strengths: tuple) -> None:
  """Brightness in [0, 1]; contrast and saturation in [0, 1] (their factors stay >= 0); hue in
  [0, 0.5] (half a turn either way covers the circle)."""
  names = ("brightness", "contrast", "saturation", "hue")
  if len(strengths) != len(names):
    raise ValueError("config.pseudoseg.color_jitter must be 4 strengths (brightness, contrast, "
                     f"saturation, hue), got {strengths!r}.")
  for name, value, high in zip(names, strengths, (1.0, 1.0, 1.0, 0.5)):
    if not 0 <= value <= high:
      raise ValueError(f"config.pseudoseg.color_jitter: {name} must be in [0, {high}], got {value}.")


def parse_args(arg: str | None, known: tuple, source: str) -> dict:
  """The text after the colon of --config=FILE:ARGS, 'a=1,b=x' -> {'a': '1', 'b': 'x'}."""
  parsed = {}
  for item in filter(None, (arg or "").split(",")):
    name, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"{source} argument {item!r} must look like name=value.")
    if name.strip() not in known:
      raise ValueError(f"Unknown {source} argument {name.strip()!r}; known: {', '.join(known)}.")
    parsed[name.strip()] = value.strip()
  return parsed


def parse_bool(value: str, name: str) -> bool:
  """'true'/'false' (also 1/0, yes/no, any case) from a --config=FILE:ARGS argument."""
  lowered = value.strip().lower()
  if lowered in ("true", "1", "yes"):
    return True
  if lowered in ("false", "0", "no"):
    return False
  raise ValueError(f"Argument {name}={value!r} must be true or false.")


def min_crop_size(output_stride: int) -> int:
  """Smallest crop whose stride-`output_stride` feature map is at least 2x2 (ceil(n / os) >= 2)."""
  return output_stride + 1


# Fields that decide the structure of the train state (parameters and optimizer slots): a checkpoint
# is only valid for the same values.
MODEL_IDENTITY_FIELDS = ("model.backbone", "model.deep_stem", "model.resnet_variant",
                         "model.aspp_channels", "model.separable_heads",
                         "model.decoder_channels", "model.low_level_channels",
                         "model.sgc_attention_dim", "data.num_classes", "optimizer.name",
                         "pseudoseg.teacher", "pseudoseg.distribution_alignment",
                         "model.frozen_backbone_blocks")
# Fields that decide what the run learns from: resuming a workdir with other values would train one
# model on two datasets. The split list is compared by file name, so a workdir moved to a machine
# where the lists live elsewhere still resumes.
DATA_IDENTITY_FIELDS = ("data.name", "data.train_split", "data.unlabeled_split",
                        "data.labeled_list", "data.num_labeled", "data.labeled_fraction",
                        "data.split_seed", "data.unlabeled_includes_labeled")
# Fields that a resume may change, but with which it no longer equals an uninterrupted run.
STREAM_FIELDS = ("method", "seed", "batch_size", "pseudoseg.unlabeled_batch_size", "crop_size",
                 "scales", "data.shuffle_buffer", "data.stream_shards")


def _field_values(config_dict: dict, names: tuple) -> dict:
  """The values of `names` in a (possibly JSON-loaded) config dict."""
  defaults = base_config().to_dict()
  values = {}
  for name in names:
    value, default = config_dict, defaults
    for part in name.split("."):
      value = value.get(part) if isinstance(value, dict) else None
      default = default[part]
    # A field added after the run was written had its default then.
    value = default if value is None else value
    values[name] = list(value) if isinstance(value, tuple) else value
  return values


def model_identity(config_dict: dict) -> dict:
  """The values of MODEL_IDENTITY_FIELDS in a (possibly JSON-loaded) config dict."""
  return _field_values(config_dict, MODEL_IDENTITY_FIELDS)


def data_identity(config_dict: dict) -> dict:
  """The values of DATA_IDENTITY_FIELDS, the split list by its file name."""
  values = _field_values(config_dict, DATA_IDENTITY_FIELDS)
  values["data.labeled_list"] = os.path.basename(values["data.labeled_list"])
  return values


def stream_settings(config_dict: dict) -> dict:
  """The values of STREAM_FIELDS."""
  return _field_values(config_dict, STREAM_FIELDS)
