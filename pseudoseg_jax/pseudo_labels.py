"""Pseudo labels for unlabeled images (SPEC sections 2-4), as pure jnp functions.

    decoder logits (weak view) ---------------------------------------+
                                                                       +-> calibrated_fusion -> sharpen
    backbone features -> Grad-CAM -> self-attention (SGC head) logits -+        -> soft or hard labels

Everything here works on NHWC float32 arrays and is safe under jit with any sharding of the batch.
Learned parameters (the SGC head's projections and norm offset) live in the model
(`models.deeplab.SGCHead`); this file holds the arithmetic.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pseudoseg_jax.models.resize import resize_bilinear
from pseudoseg_jax.models.resnet import image_groups

# The original adds (1 - valid_q * valid_k) * -1e9 to the attention logits in float32. Keep the
# same constant and dtype: the rounding it causes is part of the method (see `attention_weights`).
MASK_PENALTY = -1e9
CALIBRATION_EPSILON = 1e-8
SGC_NORM_EPSILON = 1e-3  # slim.batch_norm's default, which the original's SGC norm uses.
# Keeps a class neither labeled nor predicted at ratio 1 in align_distribution.
FREQUENCY_EPSILON = 1e-6


# --------------------------------------------------------------------------------------------------
# Grad-CAM (SPEC 2).
# --------------------------------------------------------------------------------------------------


def grad_cam(features: jax.Array, cls_kernel: jax.Array) -> jax.Array:
  """Grad-CAM of every foreground class for a global-average-pool + linear classifier.

  features: [N, h, w, K] (the last backbone stage); cls_kernel: [K, C - 1].
  For logit_c = mean_hw(f) . W_c + b_c the gradient d logit_c / d f is W_c / (h w) at every
  position, so Grad-CAM's weights (its spatial mean) are W_c / (h w) and
  cam_c = ReLU(sum_k W_kc f_k / (h w)). This closed form costs one matmul instead of C - 1
  backward passes, and tests check it against autodiff.
  """
  height, width = features.shape[1:3]
  scores = jnp.einsum("nhwk,kc->nhwc", features.astype(jnp.float32),
                      cls_kernel.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return jax.nn.relu(scores / (height * width))


def normalize_cam(cam: jax.Array, image_labels: jax.Array) -> jax.Array:
  """Keeps the classes present in the image, scales each to a spatial max of 1, cuts the gradient.

  cam: [N, h, w, C - 1]; image_labels: [N, C - 1] multi-hot (given, or `predicted_image_labels`).
  A class whose map is all zero stays zero (no division by zero).
  """
  cam = cam * image_labels[:, None, None, :].astype(cam.dtype)
  peak = jnp.max(cam, axis=(1, 2), keepdims=True)
  return jax.lax.stop_gradient(jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1.0), 0.0))


def predicted_image_labels(cls_logits: jax.Array, threshold: float = 0.5) -> jax.Array:
  """Multi-hot labels from the classifier for images that come without any: sigmoid >= 0.5."""
  return jax.lax.stop_gradient((jax.nn.sigmoid(cls_logits) >= threshold).astype(jnp.float32))


# --------------------------------------------------------------------------------------------------
# Self-attention Grad-CAM, SGC (SPEC 3).
# --------------------------------------------------------------------------------------------------


def hypercolumn(features: Sequence[jax.Array], size: Sequence[int]) -> jax.Array:
  """Concatenates feature maps resized (bilinear, align_corners) to `size`; no gradient flows back:
  the SGC head must not change the backbone."""
  resized = [resize_bilinear(f.astype(jnp.float32), tuple(size)) for f in features]
  return jax.lax.stop_gradient(jnp.concatenate(resized, axis=-1))


def resize_nearest(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """TF1 `resize_nearest_neighbor` (align_corners=False): output i reads input floor(i * in / out).

  The original resizes valid masks and labels this way; the rule matters on sizes like 513 -> 33.
  x: [N, H, W] or [N, H, W, C].
  """
  x = jnp.asarray(x)
  rows = _nearest_source_indices(x.shape[1], size[0])
  cols = _nearest_source_indices(x.shape[2], size[1])
  return x[:, rows][:, :, cols]


def _nearest_source_indices(in_size: int, out_size: int) -> np.ndarray:
  # Static sizes, so the indices are constants; float32 as in TF's kernel.
  scale = np.float32(in_size / out_size)
  indices = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int32)
  return np.minimum(indices, in_size - 1)


def attention_weights(query: jax.Array, key: jax.Array, valid: jax.Array) -> jax.Array:
  """Softmax over keys of Q K^T / sqrt(d) + (1 - v_q v_k) * -1e9, in float32.

  query, key: [N, P, d]; valid: [N, P] (1 = real pixel). Returns [N, P, P].
  For a valid query the penalty removes invalid keys. For an invalid query every key is penalized,
  and -1e9 + x rounds to -1e9 in float32 for |x| < 32, so it attends (almost) uniformly to all
  positions: the authors' behaviour, which also feeds the SGC norm's batch statistics.
  """
  query, key, valid = (a.astype(jnp.float32) for a in (query, key, valid))
  logits = jnp.einsum("npd,nqd->npq", query, key, precision=jax.lax.Precision.HIGHEST)
  logits = logits / math.sqrt(query.shape[-1])
  pair_valid = valid[:, :, None] * valid[:, None, :]
  return jax.nn.softmax(logits + (1.0 - pair_valid) * MASK_PENALTY, axis=-1)


def refine_with_attention(cam: jax.Array, query: jax.Array, key: jax.Array,
                          valid: jax.Array) -> jax.Array:
  """S = A V + V with V the normalized CAM. cam: [N, h, w, C - 1]; query, key: [N, h, w, d];
  valid: [N, h, w]. Returns [N, h, w, C - 1], each class score in [0, 2]."""
  n, h, w, num_fg = cam.shape
  flat = lambda x: x.reshape(n, h * w, x.shape[-1])  # noqa: E731
  weights = attention_weights(flat(query), flat(key), valid.reshape(n, h * w))
  attended = jnp.einsum("npq,nqc->npc", weights, flat(cam), precision=jax.lax.Precision.HIGHEST)
  return attended.reshape(n, h, w, num_fg) + cam


def with_background(scores: jax.Array) -> jax.Array:
  """Prepends a background score 2 - max_c S (class scores lie in [0, 2] after the residual)."""
  background = 2.0 - jnp.max(scores, axis=-1, keepdims=True)
  return jnp.concatenate([background, scores], axis=-1)


def center_only_batch_norm(x: jax.Array, offset: jax.Array, epsilon: float = SGC_NORM_EPSILON, *,
                           group_size: int = 0) -> jax.Array:
  """(x - mean) / sqrt(var + eps) + offset with statistics of THIS batch (all images and positions,
  padding included), in training and inference alike, as the original's SGC norm always runs in
  training mode. No scale parameter (slim's default: center only).

  group_size G > 0 (model.bn_group_size) takes the statistics of each group of G consecutive
  images instead, as the model's batch norms do (the original: per GPU replica)."""
  groups = image_groups(x, group_size)  # [N / G, G, h, w, C]; G = 0: one group of all N.
  mean = jnp.mean(groups, axis=(1, 2, 3), keepdims=True)
  variance = jnp.mean(jnp.square(groups - mean), axis=(1, 2, 3), keepdims=True)
  return ((groups - mean) * jax.lax.rsqrt(variance + epsilon)).reshape(x.shape) + offset


def sgc_logits(params: dict, features: Sequence[jax.Array], cam: jax.Array,
               valid: jax.Array, *, norm_group_size: int = 0) -> jax.Array:
  """The SGC head: logits [N, h, w, C] at the CAM's resolution.

  params: {'key': [K, d], 'query': [K, d], 'mix': [C, C], 'offset': [C]} (1x1 convs, no bias).
  features: backbone maps for the hypercolumn (the original: the last two stages); cam: the
  normalized CAM [N, h, w, C - 1]; valid: [N, h, w] at the CAM's resolution.
  Only `params` receive gradients: features and CAM are cut from the backbone.
  norm_group_size: images per group of the center-only norm's statistics (0: the whole batch).
  """
  columns = hypercolumn(features, cam.shape[1:3])
  dot = lambda x, kernel: jnp.einsum(  # noqa: E731
      "nhwk,kd->nhwd", x, kernel.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  scores = refine_with_attention(jax.lax.stop_gradient(cam), dot(columns, params["query"]),
                                 dot(columns, params["key"]), valid)
  return center_only_batch_norm(dot(with_background(scores), params["mix"]), params["offset"],
                                group_size=norm_group_size)


# --------------------------------------------------------------------------------------------------
# Fusion and label making (SPEC 4, 5).
# --------------------------------------------------------------------------------------------------


def calibration_scale(decoder_logits: jax.Array, sgc_logits: jax.Array,
                      group_size: int) -> jax.Array:
  """One scalar 1 / sqrt(mean(concat(d, a)^2) + 1e-8) per group of `group_size` consecutive images
  (the original: per GPU replica of 4 images). Returns [N, 1, 1, 1], equal within each group.

  Grouping by position in the global batch, not by device, makes it independent of sharding.
  """
  n = decoder_logits.shape[0]
  if group_size < 1 or n % group_size:
    raise ValueError(f"fusion_group_size={group_size} must divide the unlabeled batch ({n}).")
  grouped = lambda x: x.reshape(n // group_size, -1)  # noqa: E731
  squares = jnp.concatenate([jnp.square(grouped(decoder_logits)),
                             jnp.square(grouped(sgc_logits))], axis=1)
  scale = jax.lax.rsqrt(jnp.mean(squares, axis=1) + CALIBRATION_EPSILON)
  return jnp.repeat(scale, group_size)[:, None, None, None]


def sharpen(probs: jax.Array, temperature: float) -> jax.Array:
  """p^(1/T) / sum p^(1/T) over classes; T = 1 is the identity."""
  if temperature == 1.0:
    return probs
  powered = jnp.power(probs, 1.0 / temperature)
  return powered / jnp.sum(powered, axis=-1, keepdims=True)


def calibrated_fusion(decoder_logits: jax.Array, sgc_logits: jax.Array, *,
                      temperature: float = 0.5, gamma: float = 0.5, group_size: int = 4,
                      calibrate: bool = True) -> jax.Array:
  """gamma * softmax(d s) + (1 - gamma) * softmax(a s), then sharpened with `temperature`.

  decoder_logits, sgc_logits: NHWC logits of the same spatial size (upsample the SGC logits to the
  decoder's first). s is `calibration_scale`, or 1 with calibrate=False (the paper's plain-average
  ablation). Returns NHWC probabilities with no gradient.
  """
  if decoder_logits.shape != sgc_logits.shape:
    raise ValueError(f"decoder logits {decoder_logits.shape} and SGC logits {sgc_logits.shape} "
                     "must have the same shape; resize the SGC logits first.")
  d, a = decoder_logits.astype(jnp.float32), sgc_logits.astype(jnp.float32)
  if calibrate:
    scale = calibration_scale(d, a, group_size)
    d, a = d * scale, a * scale
  fused = gamma * jax.nn.softmax(d, axis=-1) + (1.0 - gamma) * jax.nn.softmax(a, axis=-1)
  return jax.lax.stop_gradient(sharpen(fused, temperature))


def hard_labels(probs: jax.Array, threshold: float = 0.0):
  """(argmax labels int32 [N, H, W], confident float32 [N, H, W]): max prob >= threshold."""
  labels = jnp.argmax(probs, axis=-1).astype(jnp.int32)
  confident = (jnp.max(probs, axis=-1) >= threshold).astype(jnp.float32)
  return labels, confident


# --------------------------------------------------------------------------------------------------
# Remedies for confirmation bias (not in the original; config.pseudoseg switches them on).
# --------------------------------------------------------------------------------------------------


def restrict_to_present_classes(probs: jax.Array, image_labels: jax.Array) -> jax.Array:
  """probs [N, H, W, C] with the foreground classes absent from the image's labels [N, C - 1]
  zeroed and the rest renormalized (class 0, background, is always allowed). With image-level
  labels the CAM is told which classes are present; this tells the fused labels too, so a pixel
  the network gives to an absent class goes to its likeliest present one."""
  allowed = jnp.concatenate([jnp.ones_like(image_labels[:, :1]), image_labels], axis=-1)
  kept = probs * allowed[:, None, None, :].astype(probs.dtype)
  return kept / jnp.maximum(jnp.sum(kept, axis=-1, keepdims=True), 1e-12)


def claim_present_classes(probs: jax.Array, image_labels: jax.Array, valid: jax.Array) -> jax.Array:
  """probs [N, H, W, C] with each foreground class that image_labels [N, C - 1] name but that is
  the argmax of none of the image's valid [N, H, W] pixels divided by its peak over them, then
  renormalized.

  A teacher that learned a class from few labeled images gives it low probabilities everywhere,
  so the argmax hands its pixels to a frequent neighbour and self-training teaches the network to
  drop it. An image-level label says the class is there: scaled to a peak of 1, like a normalized
  CAM, it claims at least its likeliest pixels. Every other class is left as it is: the classes
  the pseudo labels already hold, the classes the labels do not name (restrict_to_present_classes
  removes them), and class 0, which the labels never name (it may be absent: Stanford
  Background's sky), so a claim moves pixels only to a class the image misses.
  """
  is_valid = valid[..., None] > 0
  named = jnp.concatenate([jnp.zeros_like(image_labels[:, :1]), image_labels], axis=-1) > 0
  is_argmax = jax.nn.one_hot(jnp.argmax(probs, axis=-1), probs.shape[-1], dtype=jnp.bool_)
  missing = named & ~jnp.any(is_argmax & is_valid, axis=(1, 2))
  peak = jnp.max(jnp.where(is_valid, probs, 0), axis=(1, 2))
  scale = jnp.where(missing, 1.0 / jnp.maximum(peak, FREQUENCY_EPSILON), 1.0)
  scaled = probs * scale[:, None, None, :].astype(probs.dtype)
  return scaled / jnp.maximum(jnp.sum(scaled, axis=-1, keepdims=True), 1e-12)


def align_distribution(probs: jax.Array, target_frequencies: jax.Array,
                       predicted_frequencies: jax.Array, strength: float = 1.0) -> jax.Array:
  """probs [N, H, W, C] times (target / predicted frequency)^strength per class, renormalized.

  With the labeled masks' frequencies as the target this is ReMixMatch's distribution alignment;
  with a uniform target it is DebiasPL's debiasing (logits minus strength * log of the teacher's
  own class prior). A teacher trained on few labeled images under-predicts their rare classes,
  and hard or confident pseudo labels then teach it to drop them altogether; scaling each class by
  how much rarer it is in the teacher's output than in the target gives it back. Uniform
  frequencies, or strength 0, leave probs as they were.
  """
  ratio = ((target_frequencies + FREQUENCY_EPSILON) /
           (predicted_frequencies + FREQUENCY_EPSILON)) ** strength
  aligned = probs * ratio.astype(probs.dtype)
  return aligned / jnp.maximum(jnp.sum(aligned, axis=-1, keepdims=True), 1e-12)


def labeled_class_frequencies(mask: jax.Array, ignore_label: int, num_classes: int) -> jax.Array:
  """float32 [C]: the share of each class among the mask's pixels that are not ignore_label."""
  counts = jnp.sum(jax.nn.one_hot(jnp.where(mask == ignore_label, -1, mask), num_classes),
                   axis=tuple(range(mask.ndim)))
  return counts / jnp.maximum(jnp.sum(counts), 1.0)


def predicted_class_frequencies(probs: jax.Array, valid: jax.Array) -> jax.Array:
  """float32 [C]: the mean of probs [N, H, W, C] over the valid [N, H, W] pixels."""
  weighted = jnp.sum(probs * valid[..., None], axis=(0, 1, 2))
  return weighted / jnp.maximum(jnp.sum(valid), 1.0)


def class_balanced_confident(probs: jax.Array, valid: jax.Array, threshold: float,
                             kept_fraction: float) -> jax.Array:
  """float32 [N, H, W]: 1 where a pseudo label counts, with a threshold per class (as CBST).

  A confidence threshold alone keeps almost no pixel of a class the network is unsure of, so
  self-training teaches it to stop predicting rare classes. Here a pixel whose argmax is c counts
  when its confidence reaches min(threshold, t_c), with t_c the (1 - kept_fraction) quantile of
  the confidences of the batch's valid pixels labeled c: at least `kept_fraction` of every class
  predicted in the batch counts, however unsure the network is of it.
  """
  confidence = jnp.max(probs, axis=-1)
  labels = jnp.argmax(probs, axis=-1)
  per_class = per_class_quantiles(confidence, labels, valid > 0, probs.shape[-1],
                                  1.0 - kept_fraction)
  per_class = jnp.minimum(jnp.nan_to_num(per_class, nan=threshold), threshold)
  return (confidence >= per_class[labels]).astype(jnp.float32)


def per_class_quantiles(values: jax.Array, labels: jax.Array, is_valid: jax.Array,
                        num_classes: int, q: float) -> jax.Array:
  """float32 [num_classes]: numpy's (linear) q-quantile of the valid values of each label, nan for
  a label with none. One sort of (label, value) pairs serves every class: a sort per class costs
  num_classes times as much (21 sorts of every pixel of the batch for VOC)."""
  class_key = jnp.where(is_valid, labels, num_classes).ravel()  # Invalid pixels sort last.
  _, sorted_values = jax.lax.sort((class_key, values.ravel()), num_keys=2)
  counts = jnp.bincount(class_key, length=num_classes + 1)[:num_classes]
  starts = jnp.cumsum(counts) - counts
  # jnp.nanquantile's arithmetic, so that the thresholds are bit for bit the same as one per class.
  position = q * (counts - 1).astype(jnp.float32)
  below, above = jnp.floor(position), jnp.ceil(position)
  high_weight = position - below
  last = jnp.maximum(counts - 1, 0)
  low = sorted_values[starts + jnp.clip(below, 0, last).astype(jnp.int32)]
  high = sorted_values[starts + jnp.clip(above, 0, last).astype(jnp.int32)]
  quantiles = low * (1 - high_weight) + high * high_weight
  return jnp.where(counts > 0, quantiles, jnp.nan)
