"""Pure train and eval steps: (state, batch) -> (state, metrics). Jitted and sharded by train.py.

The model crosses the jit boundary as a static graphdef plus two pytrees of plain arrays (params and
batch statistics, as pure nested dicts): nnx.merge rebuilds the module inside the traced function, so
nothing stateful leaks across steps and the state is an ordinary pytree for optax and orbax.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from pseudoseg_jax import evaluation, losses, mixing, pseudo_labels
from pseudoseg_jax.models import build_model
from pseudoseg_jax.models.resize import resize_bilinear


# The key under which pseudoseg_loss hands train_step the batch's class frequencies of the
# teacher's probabilities (a vector, not a logged metric).
PREDICTED_FREQUENCIES = "internal/predicted_class_frequencies"


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: Any
  # {'params', 'batch_stats'}: the exponential moving average of the model that makes the pseudo
  # labels when config.pseudoseg.teacher == 'ema'; None (no leaves) otherwise.
  teacher: Any = None
  # {'labeled', 'predicted'}: running class frequencies [C] of the labeled masks and of the
  # teacher's unaligned pseudo-label probabilities, when config.pseudoseg.distribution_alignment;
  # None (no leaves) otherwise.
  class_frequencies: Any = None


def init_model(config: ml_collections.ConfigDict, seed: int):
  """Returns (graphdef, params, batch_stats) with params and stats as pure dicts, on the host's CPU.

  Initialization runs under jit with the 'rbg' key type: eagerly, or with threefry keys, XLA
  compiles hundreds of small random ops one by one and even the tiny model takes ~12 s on a CPU.
  The key is the program's argument, so that every seed runs one compiled program. rbg's bits
  come from the backend's own generator (TPUs have theirs), so the program runs on the CPU
  backend, which GPU and TPU hosts have too: one seed, the same initial weights on every host
  and accelerator (for one JAX version; JAX does not promise rbg's bits across versions).
  """
  def make(key):
    return build_model(config.model, config.data.num_classes, rngs=nnx.Rngs(params=key))

  def initial_values(key):
    _, params, batch_stats = nnx.split(make(key), nnx.Param, nnx.BatchStat)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)

  with jax.default_device(initialization_device()):
    key = jax.random.key(seed, impl="rbg")
    graphdef = nnx.split(nnx.eval_shape(make, key), nnx.Param, nnx.BatchStat)[0]
    params, batch_stats = jax.jit(initial_values)(key)
  return graphdef, params, batch_stats


def initialization_device() -> jax.Device:
  """The host's first CPU device; the default device where JAX_PLATFORMS leaves out the CPU."""
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:
    return jax.local_devices()[0]


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(entry, "key", getattr(entry, "idx", entry))) for entry in path)


def weight_decay_mask(params: dict) -> dict:
  """True for conv/linear kernels (DeepLab's L2 regularizer), False for biases and norm params.

  The SGC head's projections are excluded as in the original (SPEC section 5), and so are the
  depthwise kernels (names ending '_depthwise': Xception's and the separable heads'), which DeepLab
  leaves unregularized (wss third_party/deeplab/core/utils.py:98, xception.py:922-925).
  """
  def is_decayed(path, _):
    names = _names(path)
    is_depthwise = any(name.endswith("_depthwise") for name in names)
    return names[-1] == "kernel" and "sgc" not in names and not is_depthwise
  return jax.tree_util.tree_map_with_path(is_decayed, params)


def layer_bias_mask(params: dict) -> dict:
  """True for the biases of convs and linear layers (a 'bias' beside a 'kernel'), slim's 'biases';
  False for everything else, norm offsets (slim's 'beta', here also named 'bias') included."""
  paths = [_names(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  layers = {path[:-1] for path in paths if path[-1] == "kernel"}
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _names(path)[-1] == "bias" and _names(path)[:-1] in layers, params)


def with_scaled_bias_updates(tx: optax.GradientTransformation,
                             multiplier: float) -> optax.GradientTransformation:
  """`tx` with the updates of layer biases times `multiplier` (optimizer.bias_lr_multiplier).

  DeepLab doubles the gradients of every variable named 'biases' before its momentum optimizer
  (wss third_party/deeplab/utils/train_utils.py:252-254, applied at train_wss.py:1031-1035): for SGD
  with momentum, linear in the gradient, that is the same as doubling their updates. Scaling the
  update also makes the factor a learning-rate factor under Adam, and leaves the optimizer state
  as it was, so a run may resume with another multiplier.
  """
  def update(updates, state, params=None):
    updates, state = tx.update(updates, state, params)
    scaled = jax.tree.map(lambda u, is_bias: u * multiplier if is_bias else u, updates,
                          layer_bias_mask(updates))
    return scaled, state
  return optax.GradientTransformation(tx.init, update)


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           total_steps: int | jax.Array | None = None) -> optax.Schedule:
  """Poly decay from the base rate to `end_learning_rate` over all steps, no warm-up (SPEC 7).

  `total_steps` (config.total_steps by default) may be a traced scalar: the train step takes it as
  an argument, so that runs of different lengths (a run resumed with more steps, a sweep over
  lengths) share one compiled program. Same arithmetic as optax.polynomial_schedule, which needs a
  Python number.
  """
  opt = config.optimizer
  total = config.total_steps if total_steps is None else total_steps

  def schedule(step):
    remaining = 1 - jnp.clip(step, 0, total) / total
    return (opt.learning_rate - opt.end_learning_rate) * remaining**opt.poly_power + \
        opt.end_learning_rate
  return schedule


def make_optimizer(config: ml_collections.ConfigDict,
                   total_steps: int | jax.Array | None = None) -> optax.GradientTransformation:
  """SGD with momentum (SPEC 7), or Adam for models trained from scratch in few steps: with
  He-initialized kernels behind batch norm, SGD's effective step lr / |w|^2 is tiny at first, which
  pretrained backbones do not mind but a from-scratch CPU demo does. `total_steps`: as in
  learning_rate_schedule (the schedule is the only part that depends on it)."""
  schedule = learning_rate_schedule(config, total_steps)
  if config.optimizer.name == "adam":
    update = optax.adam(schedule)
  else:
    update = optax.sgd(schedule, momentum=config.optimizer.momentum)
  # Coupled L2 (added to the gradient), as slim's l2_regularizer does: the gradient of
  # wd/2 * |w|^2 is wd * w.
  tx = optax.chain(
      optax.add_decayed_weights(config.optimizer.weight_decay, mask=weight_decay_mask), update)
  if config.optimizer.get("bias_lr_multiplier", 1.0) != 1.0:
    tx = with_scaled_bias_updates(tx, config.optimizer.bias_lr_multiplier)
  frozen = config.model.frozen_backbone_blocks
  if not frozen:
    return tx
  # Last, so that nothing (weight decay included) moves the frozen backbone layers.
  return optax.chain(tx, optax.masked(optax.set_to_zero(),
                                      functools.partial(frozen_parameter_mask, frozen)))


def frozen_parameter_mask(frozen_blocks: int, params: dict) -> dict:
  """True for the parameters of the backbone's stem and first `frozen_blocks` blocks
  (model.frozen_backbone_blocks; EfficientNet-Lite's 'stem_*' and 'blocks/i')."""
  def is_frozen(path, _):
    names = [getattr(entry, "key", getattr(entry, "idx", entry)) for entry in path]
    if names[0] != "backbone":
      return False
    if str(names[1]).startswith("stem_"):
      return True
    return names[1] == "blocks" and int(names[2]) < frozen_blocks
  return jax.tree_util.tree_map_with_path(is_frozen, params)


def create_train_state(config: ml_collections.ConfigDict, seed: int):
  """Returns (graphdef, optimizer, state) for a freshly initialized model."""
  graphdef, params, batch_stats = init_model(config, seed)
  tx = make_optimizer(config)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     opt_state=initial_optimizer_state(tx, params),
                     class_frequencies=initial_class_frequencies(config))
  return graphdef, tx, with_fresh_teacher(state, config)


def uses_distribution_alignment(config: ml_collections.ConfigDict) -> bool:
  return config.method == "pseudoseg" and config.pseudoseg.distribution_alignment


def initial_class_frequencies(config: ml_collections.ConfigDict) -> dict | None:
  """Uniform, so that the first step's pseudo labels are not rescaled; None when unused."""
  if not uses_distribution_alignment(config):
    return None
  uniform = jnp.full((config.data.num_classes,), 1.0 / config.data.num_classes, jnp.float32)
  return {"labeled": uniform, "predicted": jnp.array(uniform)}


def uses_ema_teacher(config: ml_collections.ConfigDict) -> bool:
  return config.method == "pseudoseg" and config.pseudoseg.teacher == "ema"


def with_fresh_teacher(state: TrainState, config: ml_collections.ConfigDict) -> TrainState:
  """The state with its teacher set to a copy of the model (a new run, or new backbone weights)."""
  if not uses_ema_teacher(config):
    return state.replace(teacher=None)
  copy = functools.partial(jax.tree.map, jnp.array)
  return state.replace(teacher={"params": copy(state.params),
                                "batch_stats": copy(state.batch_stats)})


def ema_decay_at(decay: float, step, warmup: str = "average") -> jax.Array:
  """The decay of the average at `step`, raised to `decay` by a warm-up. A constant decay from
  step 0 would keep the first, random heads in the teacher for hundreds of steps, and their
  pseudo labels are noise.

  "average": min(decay, 1 - 1 / (step + 1)), the plain average of the models so far until that
  reaches `decay` (Mean Teacher's). "recent": min(decay, (1 + step) / (10 + step)) (TF's
  ExponentialMovingAverage with num_updates), an average over roughly the last tenth of the
  steps: in a run of a few hundred steps, whose model improves fast, the plain average of every
  model so far lags far behind the model itself.
  """
  step = jnp.asarray(step, jnp.float32)
  if warmup == "recent":
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jnp.minimum(decay, 1.0 - 1.0 / (step + 1.0))


def moving_average(old, new, decay):
  """decay * old + (1 - decay) * new, leaf by leaf of two pytrees of one structure."""
  return jax.tree.map(lambda o, n: decay * o + (1.0 - decay) * n, old, new)


def ema_update(teacher: dict, params: dict, batch_stats: dict, decay) -> dict:
  """teacher <- decay * teacher + (1 - decay) * model, parameters and batch statistics alike."""
  return moving_average(teacher, {"params": params, "batch_stats": batch_stats}, decay)


def initial_optimizer_state(tx: optax.GradientTransformation, params: dict):
  """tx.init as one program: eagerly, every zeros_like is its own XLA compile (33 of them, 1.2 s,
  for the tiny demo model)."""
  return jax.jit(tx.init)(params)


def step_key(seed: int, step: jax.Array) -> jax.Array:
  """The randomness of one step depends only on (seed, step): resuming replays it exactly."""
  return jax.random.fold_in(jax.random.key(seed), step)


def labeled_and_unlabeled_keys(key: jax.Array):
  """PseudoSeg's split of a step key: (labeled pass, unlabeled passes)."""
  labeled_key, unlabeled_key = jax.random.split(key)
  return labeled_key, unlabeled_key


def supervised_loss(params: dict, batch_stats: dict, batch: dict, key: jax.Array, *,
                    graphdef: nnx.GraphDef, config: ml_collections.ConfigDict):
  """Cross-entropy of the decoder logits upsampled to the crop. Returns (loss, (stats, metrics))."""
  model = nnx.merge(graphdef, params, batch_stats)
  outputs = model(batch["image"], train=True, rngs=nnx.Rngs(dropout=key))
  logits = resize_bilinear(outputs["logits"], batch["mask"].shape[1:3])
  ignore_label = config.data.ignore_label
  loss = losses.masked_cross_entropy(logits, batch["mask"], ignore_label)
  metrics = {"train/supervised_loss": loss,
             "train/pixel_accuracy": losses.pixel_accuracy(logits, batch["mask"], ignore_label)}
  new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  return loss, (new_stats, metrics)


# --------------------------------------------------------------------------------------------------
# PseudoSeg (SPEC 2-5): labeled losses, pseudo labels from the weak view, consistency on the strong.
# --------------------------------------------------------------------------------------------------


def sgc_features(features: dict) -> list:
  """The hypercolumn's inputs: the last two backbone stages (the original's strides 15 and 16)."""
  return [features["stage3"], features["stage4"]]


def class_activation_maps(model: nnx.Module, features: dict, image_labels: jax.Array):
  """Normalized Grad-CAM [N, h, w, C - 1] of the classifier head, kept to `image_labels`."""
  cam = pseudo_labels.grad_cam(features["stage4"], model.cls_head.linear.kernel[...])
  return pseudo_labels.normalize_cam(cam, image_labels)


def sgc_logits(model: nnx.Module, features: dict, cam: jax.Array,
               decoder_valid: jax.Array) -> jax.Array:
  """SGC logits at feature resolution from the normalized CAM.

  `decoder_valid` is the valid mask at DECODER resolution: the original resizes the input-size mask
  to the decoder's size and that one to the CAM's (nearest, twice), which picks other rows and
  columns than one resize from the input size would.
  """
  feature_valid = pseudo_labels.resize_nearest(decoder_valid, cam.shape[1:3])
  return pseudo_labels.sgc_logits(model.sgc.params(), sgc_features(features), cam, feature_valid,
                                  norm_group_size=model.sgc.norm_group_size)


def make_pseudo_labels(model: nnx.Module, weak_logits: jax.Array, unlabeled: dict, *,
                       config: ml_collections.ConfigDict, inference_features: dict | None = None,
                       class_frequencies: dict | None = None) -> dict:
  """Targets for the strong view, at decoder resolution, with no gradient.

  Returns {'targets': [N, h, w, C] soft probabilities or one-hot labels, 'weights': [N, h, w]
  (valid and confident), 'valid': [N, h, w] (not padding, not cutout), 'sgc_logits' and 'cam' when
  the SGC is used, 'predicted_frequencies' [C] with `class_frequencies`}. The CAM reads an
  inference-mode backbone pass: `inference_features` when the caller already has one (an EMA
  teacher's weak pass), else one more pass. `class_frequencies` (TrainState's) aligns the
  probabilities with the labeled images' class frequencies, or debiases them towards uniform
  ones (config.pseudoseg.distribution_alignment_target), before anything else uses them.
  """
  options = config.pseudoseg
  weak_logits = jax.lax.stop_gradient(weak_logits)
  size = weak_logits.shape[1:3]
  valid = pseudo_labels.resize_nearest(unlabeled["valid"], size).astype(jnp.float32)
  outputs = {"valid": valid}
  # The classes the image holds: its image-level labels, else (for the CAM) the classifier's guess.
  image_labels = unlabeled["image_labels"] if options.weak_labels else None
  if options.pseudo_label_source == "decoder":
    probs = jax.nn.softmax(weak_logits, axis=-1)
  else:
    # The CAM comes from an inference-mode backbone pass, as in the original; its SGC norm still
    # uses batch statistics.
    features = (model.backbone_features(unlabeled["weak_image"], train=False)
                if inference_features is None else inference_features)
    if image_labels is None:
      image_labels = pseudo_labels.predicted_image_labels(
          model.cls_head(features["stage4"], train=False, rngs=None))
    cam = class_activation_maps(model, features, image_labels)
    sgc = resize_bilinear(sgc_logits(model, features, cam, valid), size)
    outputs.update(sgc_logits=sgc, cam=cam)
    if options.pseudo_label_source == "sgc":
      probs = jax.nn.softmax(sgc, axis=-1)
    else:
      probs = pseudo_labels.calibrated_fusion(
          weak_logits, sgc, temperature=1.0, gamma=options.gamma,
          group_size=options.fusion_group_size, calibrate=options.calibrated)
  if class_frequencies is not None:
    outputs["predicted_frequencies"] = pseudo_labels.predicted_class_frequencies(probs, valid)
    probs = pseudo_labels.align_distribution(
        probs, alignment_target(class_frequencies["labeled"], options.distribution_alignment_target),
        class_frequencies["predicted"], options.distribution_alignment_strength)
  if options.claim_present_classes:
    probs = pseudo_labels.claim_present_classes(probs, image_labels, valid)
  if options.weak_labels and options.restrict_to_image_labels:
    probs = pseudo_labels.restrict_to_present_classes(probs, unlabeled["image_labels"])
  if options.soft_labels:
    targets = pseudo_labels.sharpen(probs, options.temperature)
    scores = targets
  else:
    targets = jax.nn.one_hot(jnp.argmax(probs, axis=-1), probs.shape[-1], dtype=jnp.float32)
    scores = probs
  if options.class_balanced_fraction > 0:
    confident = pseudo_labels.class_balanced_confident(
        scores, valid, options.confidence_threshold, options.class_balanced_fraction)
  else:
    confident = (jnp.max(scores, axis=-1) >= options.confidence_threshold).astype(jnp.float32)
  outputs.update(targets=targets, weights=valid * confident)
  return jax.lax.stop_gradient(outputs)


def alignment_target(labeled_frequencies: jax.Array, target: str) -> jax.Array:
  """The class frequencies distribution alignment scales the teacher's towards: the labeled
  masks' ('labeled') or equal ones ('uniform', which debiases without trusting a few labeled
  images' class shares)."""
  if target == "uniform":
    return jnp.full_like(labeled_frequencies, 1.0 / labeled_frequencies.shape[-1])
  return labeled_frequencies


def unlabeled_forward(model: nnx.Module, unlabeled: dict, key: jax.Array, *,
                      config: ml_collections.ConfigDict, teacher: nnx.Module | None = None,
                      class_frequencies: dict | None = None):
  """(weak outputs, pseudo labels, strong outputs, unlabeled batch as the strong pass saw it,
  feature-perturbed stream or None).

  The original: one network, both views in training mode. With an EMA `teacher`, the teacher
  labels the weak view in inference mode and the student only sees the strong view. With CutMix,
  the strong view, its pseudo labels (and, for the metrics, the weak logits and hidden masks) are
  mixed with the same boxes. pseudoseg.feature_perturbation drops feature channels in the strong
  pass ("strong") or in a pass of its own on the weak view ("stream", returned as {'logits'} with
  the unmixed pseudo labels it learns).
  """
  options = config.pseudoseg
  weak_key, strong_key = jax.random.split(key)
  # Not more splits: the original's keys stay as they were.
  mix_key, perturbed_key = jax.random.fold_in(key, 2), jax.random.fold_in(key, 3)
  if teacher is None:
    weak = model(unlabeled["weak_image"], train=True, rngs=nnx.Rngs(dropout=weak_key))
    pseudo = make_pseudo_labels(model, weak["logits"], unlabeled, config=config,
                                class_frequencies=class_frequencies)
  else:
    weak = teacher(unlabeled["weak_image"], train=False)
    pseudo = make_pseudo_labels(teacher, weak["logits"], unlabeled, config=config,
                                inference_features=weak["features"],
                                class_frequencies=class_frequencies)
  perturbed = None
  if options.feature_perturbation == "stream":
    # The student's own features of the weak view: the teacher's are not the ones being trained.
    features = (weak["features"] if teacher is None
                else model.backbone_features(unlabeled["weak_image"], train=True))
    dropped = model.heads(features, train=True, rngs=nnx.Rngs(dropout=perturbed_key),
                          feature_dropout=options.feature_dropout)
    perturbed = {"logits": dropped["logits"],
                 **{name: pseudo[name] for name in ("targets", "weights", "valid")}}
  if options.cutmix_probability > 0:
    weak, pseudo, unlabeled = cutmix_unlabeled(weak, pseudo, unlabeled, mix_key,
                                               options.cutmix_probability)
  strong_dropout = options.feature_dropout if options.feature_perturbation == "strong" else 0.0
  strong = model(unlabeled["strong_image"], train=True, rngs=nnx.Rngs(dropout=strong_key),
                 feature_dropout=strong_dropout)
  return weak, pseudo, strong, unlabeled, perturbed


def cutmix_unlabeled(weak: dict, pseudo: dict, unlabeled: dict, key: jax.Array,
                     probability: float):
  """(weak, pseudo, unlabeled) with image i's box taken from image i + 1 in every map.

  Boxes are drawn at the input size and taken to decoder size by the nearest-neighbour rule the
  valid mask follows, so the targets' box is the strong view's. Image-level labels of a boxed
  image become the union of the pair's (a class of the partner lying wholly outside the box is a
  false positive the classifier then sees).
  """
  batch_size, height, width = unlabeled["valid"].shape
  boxes = mixing.random_boxes(key, batch_size, height, width, probability=probability)

  def mixed_at_its_size(x):
    return mixing.mix(x, pseudo_labels.resize_nearest(boxes.astype(jnp.int32), x.shape[1:3]) > 0)

  # Every pseudo-label output is a map but the per-class frequencies.
  pseudo = {name: mixed_at_its_size(value) if value.ndim >= 3 else value
            for name, value in pseudo.items()}
  weak = {**weak, "logits": mixed_at_its_size(weak["logits"])}
  boxed = jnp.any(boxes, axis=(1, 2))[:, None]
  labels = unlabeled["image_labels"]
  mixed = {name: mixing.mix(unlabeled[name], boxes)
           for name in ("strong_image", "valid", "mask")}
  mixed["image_labels"] = jnp.where(boxed, jnp.maximum(labels, mixing.partner(labels)), labels)
  return weak, pseudo, {**unlabeled, **mixed}


def pseudo_label_metrics(weak: dict, pseudo: dict, strong: dict, unlabeled: dict, *,
                         num_classes: int, ignore_label: int) -> dict:
  """Quality against the unlabeled images' hidden ground truth, which no loss sees.

  '*_accuracy' is the class-balanced pixel accuracy (the mean over the classes present of their
  recall), as the original monitors it: plain pixel accuracy is mostly background. The
  PSEUDO_LABEL_CLASS_COUNTS (per class: true, correctly and all pseudo-labeled pixels) are counts,
  which train sums over a logging interval into per-class recall and precision: one batch holds too
  few pixels of a rare class to read its recall from.
  """
  size = pseudo["targets"].shape[1:3]
  truth = pseudo_labels.resize_nearest(unlabeled["mask"], size)
  counted = (truth != ignore_label) & (pseudo["valid"] > 0)
  truth_one_hot = jax.nn.one_hot(jnp.where(counted, truth, -1), num_classes)  # -1: all zeros.
  pixels_per_class = jnp.sum(truth_one_hot, axis=(0, 1, 2))
  present = pixels_per_class > 0

  def correct_per_class(scores):
    correct = (jnp.argmax(scores, axis=-1) == truth)[..., None] * truth_one_hot
    return jnp.sum(correct, axis=(0, 1, 2))

  def balanced_accuracy(scores):
    recall = correct_per_class(scores) / jnp.maximum(pixels_per_class, 1)
    return jnp.sum(jnp.where(present, recall, 0.0)) / jnp.maximum(jnp.sum(present), 1)

  predicted = jax.nn.one_hot(jnp.argmax(pseudo["targets"], axis=-1), num_classes)

  valid_pixels = jnp.maximum(jnp.sum(pseudo["valid"]), 1)
  metrics = {"pseudo/accuracy": balanced_accuracy(pseudo["targets"]),
             "pseudo/decoder_accuracy": balanced_accuracy(weak["logits"]),
             "pseudo/strong_accuracy": balanced_accuracy(strong["logits"]),
             "pseudo/confident_fraction": jnp.sum(pseudo["weights"]) / valid_pixels,
             "pseudo/mean_max_prob":
                 jnp.sum(jnp.max(pseudo["targets"], axis=-1) * pseudo["valid"]) / valid_pixels,
             "pseudo/class_pixels": pixels_per_class,
             "pseudo/class_correct": correct_per_class(pseudo["targets"]),
             "pseudo/class_labeled": jnp.sum(predicted * counted[..., None], axis=(0, 1, 2))}
  if "sgc_logits" in pseudo:
    metrics["pseudo/sgc_accuracy"] = balanced_accuracy(pseudo["sgc_logits"])
  return metrics


PSEUDO_LABEL_CLASS_COUNTS = ("pseudo/class_pixels", "pseudo/class_correct", "pseudo/class_labeled")


def consistency_weight(config: ml_collections.ConfigDict, step) -> jax.Array:
  """The consistency loss weight at `step`: constant (the original), or raised from 0 over the first
  `consistency_rampup_steps` with exp(-5 (1 - t)^2) (Laine & Aila's ramp-up), for models whose
  early pseudo labels would only teach the network its own initial mistakes (training from
  scratch; the original always started from ImageNet weights)."""
  options = config.pseudoseg
  if options.consistency_rampup_steps <= 0:
    return jnp.asarray(options.consistency_weight, jnp.float32)
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / options.consistency_rampup_steps, 0.0, 1.0)
  return options.consistency_weight * jnp.exp(-5.0 * jnp.square(1.0 - progress))


def pseudoseg_loss(params: dict, batch_stats: dict, batch: dict, key: jax.Array, *,
                   graphdef: nnx.GraphDef, config: ml_collections.ConfigDict, step=0,
                   teacher: dict | None = None, class_frequencies: dict | None = None):
  """SPEC 5: supervised CE + SGC CE + classification + consistency. batch = {'labeled': ...,
  'unlabeled': ...}; `step` only matters with a consistency ramp-up; `teacher` ({'params',
  'batch_stats'}, no gradient) makes the pseudo labels when given; `class_frequencies` aligns
  them (make_pseudo_labels). Returns (loss, (stats, metrics)); with `class_frequencies`, metrics
  holds the batch's PREDICTED_FREQUENCIES for train_step to take out."""
  options = config.pseudoseg
  ignore_label = config.data.ignore_label
  uses_sgc = options.pseudo_label_source != "decoder"
  model = nnx.merge(graphdef, params, batch_stats)
  labeled, unlabeled = batch["labeled"], batch["unlabeled"]
  labeled_key, unlabeled_key = labeled_and_unlabeled_keys(key)

  outputs = model(labeled["image"], train=True, rngs=nnx.Rngs(dropout=labeled_key))
  crop = labeled["mask"].shape[1:3]
  logits = resize_bilinear(outputs["logits"], crop)
  terms = {"supervised": losses.masked_cross_entropy(logits, labeled["mask"], ignore_label)}
  if uses_sgc:
    # The SGC learns on labeled images only, from a CAM of their true image-level labels.
    labeled_cam = class_activation_maps(model, outputs["features"], labeled["image_labels"])
    labeled_valid = pseudo_labels.resize_nearest(labeled["valid"], outputs["logits"].shape[1:3])
    labeled_sgc = sgc_logits(model, outputs["features"], labeled_cam, labeled_valid)
    terms["sgc"] = losses.masked_cross_entropy(resize_bilinear(labeled_sgc, crop), labeled["mask"],
                                               ignore_label)
    if not options.weak_labels:
      terms["classification"] = losses.multilabel_sigmoid_cross_entropy(
          outputs["cls_logits"], labeled["image_labels"])

  labeled_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  teacher_model = None if teacher is None else nnx.merge(
      graphdef, jax.lax.stop_gradient(teacher["params"]), teacher["batch_stats"])
  weak, pseudo, strong, seen, perturbed = unlabeled_forward(
      model, unlabeled, unlabeled_key, config=config, teacher=teacher_model,
      class_frequencies=class_frequencies)
  if options.weak_labels:
    # As the original (cls_with_cls), the classifier then learns from the image-level-labeled pool:
    # on the weak view, or on the strong one (with the mixed labels) when the teacher made the weak.
    cls_logits, image_labels = ((weak["cls_logits"], unlabeled["image_labels"]) if teacher is None
                                else (strong["cls_logits"], seen["image_labels"]))
    terms["classification"] = losses.multilabel_sigmoid_cross_entropy(cls_logits, image_labels)
  weight = consistency_weight(config, step)
  terms["consistency"] = weight * losses.consistency_cross_entropy(
      strong["logits"], pseudo["targets"], pseudo["weights"], jnp.sum(pseudo["valid"]))
  if perturbed is not None:
    terms["feature_perturbation"] = weight * losses.consistency_cross_entropy(
        perturbed["logits"], perturbed["targets"], perturbed["weights"],
        jnp.sum(perturbed["valid"]))

  loss = sum(terms.values())
  metrics = {f"train/{name}_loss": value for name, value in terms.items()}
  metrics["train/pixel_accuracy"] = losses.pixel_accuracy(logits, labeled["mask"], ignore_label)
  metrics["train/consistency_weight"] = weight
  metrics.update(pseudo_label_metrics(weak, pseudo, strong, seen,
                                      num_classes=config.data.num_classes,
                                      ignore_label=ignore_label))
  if "predicted_frequencies" in pseudo:
    metrics[PREDICTED_FREQUENCIES] = pseudo["predicted_frequencies"]
  new_stats = (labeled_stats if options.batch_stats_from == "labeled"
               else nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)))
  return loss, (new_stats, metrics)


def pseudo_label_images(params: dict, batch_stats: dict, unlabeled: dict, key: jax.Array, *,
                        graphdef: nnx.GraphDef, config: ml_collections.ConfigDict,
                        teacher: dict | None = None, class_frequencies: dict | None = None
                        ) -> dict:
  """What the step sees on the unlabeled batch, for summaries: class maps at decoder resolution
  (int32 [N, h, w]; -1 where a pseudo label does not count), the CAM / SGC when used, and the
  strong view the network is given."""
  model = nnx.merge(graphdef, params, batch_stats)
  teacher_model = None if teacher is None else nnx.merge(graphdef, teacher["params"],
                                                         teacher["batch_stats"])
  weak, pseudo, strong, unlabeled, _ = unlabeled_forward(model, unlabeled, key, config=config,
                                                         teacher=teacher_model,
                                                         class_frequencies=class_frequencies)
  size = pseudo["targets"].shape[1:3]
  images = {"pseudo_label": jnp.where(pseudo["weights"] > 0,
                                      jnp.argmax(pseudo["targets"], axis=-1), -1),
            "weak_prediction": jnp.argmax(weak["logits"], axis=-1),
            "strong_prediction": jnp.argmax(strong["logits"], axis=-1),
            "ground_truth": pseudo_labels.resize_nearest(unlabeled["mask"], size)}
  if "cam" in pseudo:
    cam = resize_bilinear(pseudo["cam"], size)
    # The original's CAM background score: 1 - the strongest class.
    background = 1.0 - jnp.max(cam, axis=-1, keepdims=True)
    images["cam"] = jnp.argmax(jnp.concatenate([background, cam], axis=-1), axis=-1)
    images["sgc"] = jnp.argmax(pseudo["sgc_logits"], axis=-1)
  class_maps = jax.tree.map(lambda x: x.astype(jnp.int32), images)
  return {**class_maps, "strong_image": unlabeled["strong_image"]}  # Mixed, with CutMix.


# --------------------------------------------------------------------------------------------------
# The step.
# --------------------------------------------------------------------------------------------------


def train_step(state: TrainState, batch: dict, total_steps: int | jax.Array | None = None, *,
               graphdef: nnx.GraphDef, config: ml_collections.ConfigDict):
  """One optimizer step. `total_steps`, the learning-rate schedule's length, defaults to
  config.total_steps; train.py passes it as an array so that its value is not compiled in."""
  tx = make_optimizer(config, total_steps)
  key = step_key(config.seed, state.step)
  if config.method == "pseudoseg":
    loss_fn = functools.partial(pseudoseg_loss, step=state.step, teacher=state.teacher,
                                class_frequencies=state.class_frequencies)
  else:
    loss_fn = supervised_loss
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (new_stats, metrics)), grads = grad_fn(state.params, state.batch_stats, batch, key,
                                               graphdef=graphdef, config=config)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  grad_norm = optax.global_norm(grads)
  # A non-finite gradient anywhere makes the global norm non-finite, so two scalars cover the step.
  all_finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  metrics = {**metrics, "train/loss": loss, "train/grad_norm": grad_norm,
             "train/learning_rate": learning_rate_schedule(config, total_steps)(state.step),
             "train/all_finite": all_finite}
  new_state = state.replace(step=state.step + 1, params=new_params, batch_stats=new_stats,
                            opt_state=new_opt_state)
  if state.teacher is not None:
    new_state = new_state.replace(teacher=ema_update(
        state.teacher, new_params, new_stats, ema_decay_at(config.pseudoseg.ema_decay, state.step,
                                                        config.pseudoseg.ema_warmup)))
  if state.class_frequencies is not None:
    labeled = batch["labeled"]
    batch_frequencies = {
        "labeled": pseudo_labels.labeled_class_frequencies(
            labeled["mask"], config.data.ignore_label, config.data.num_classes),
        "predicted": metrics.pop(PREDICTED_FREQUENCIES)}
    decay = ema_decay_at(config.pseudoseg.distribution_alignment_momentum, state.step)
    new_state = new_state.replace(class_frequencies=moving_average(
        state.class_frequencies, batch_frequencies, decay))
  if config.skip_nonfinite_steps:
    new_state = keep_previous_unless(all_finite, new_state, state)
  return new_state, metrics


def keep_previous_unless(all_finite: jax.Array, new_state: TrainState,
                         state: TrainState) -> TrainState:
  """`new_state` if the step was finite, else `state` with only the step counter advanced.

  Chosen on the device (a select per leaf), so skipping costs no host round trip; the counter still
  advances so that checkpoints, step keys and the data stream stay indexed by step on resume.
  Batch statistics are kept too: a non-finite forward pass would have poisoned them.
  """
  kept = jax.tree.map(lambda new, old: jnp.where(all_finite, new, old), new_state, state)
  return kept.replace(step=new_state.step)


def predict_logits(params: dict, batch_stats: dict, images: jax.Array, *,
                   graphdef: nnx.GraphDef) -> jax.Array:
  """Inference-mode decoder logits upsampled (align_corners) to the input size."""
  model = nnx.merge(graphdef, params, batch_stats)
  outputs = model(images, train=False)
  return resize_bilinear(outputs["logits"], images.shape[1:3]).astype(jnp.float32)


def eval_step(params: dict, batch_stats: dict, batch: dict, *, graphdef: nnx.GraphDef,
              num_classes: int, ignore_label: int) -> jax.Array:
  """The confusion matrix of one global batch (padding pixels carry the ignore label)."""
  logits = predict_logits(params, batch_stats, batch["image"], graphdef=graphdef)
  return evaluation.confusion_matrix(jnp.argmax(logits, axis=-1), batch["mask"], num_classes,
                                     ignore_label)
