"""Pixel-wise losses with an ignore label, in float32 whatever the compute dtype.

Each loss returns a scalar mean over the pixels (or images) that count. The masked sum and the count
are reduced over the whole global batch under jit, so the result does not depend on how the batch is
sharded across devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_label: int) -> jax.Array:
  """Mean softmax cross-entropy over pixels whose label is not `ignore_label`.

  logits: [N, H, W, C]; labels: int [N, H, W]. Returns 0 when no pixel is valid (instead of NaN),
  so a batch made only of padding cannot poison the parameters.
  """
  logits = logits.astype(jnp.float32)
  valid = labels != ignore_label
  safe_labels = jnp.where(valid, labels, 0)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  picked = jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  total = -jnp.sum(jnp.where(valid, picked, 0.0))
  count = jnp.sum(valid)
  return total / jnp.maximum(count, 1)


def pixel_accuracy(logits: jax.Array, labels: jax.Array, ignore_label: int) -> jax.Array:
  """Fraction of valid pixels whose argmax equals the label (a cheap training-time signal)."""
  valid = labels != ignore_label
  correct = (jnp.argmax(logits, axis=-1) == labels) & valid
  return jnp.sum(correct) / jnp.maximum(jnp.sum(valid), 1)


def consistency_cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                              num_valid: jax.Array) -> jax.Array:
  """sum over pixels of weights * (-sum_c targets_c log softmax(logits)_c), divided by num_valid.

  logits, targets: [N, H, W, C] (targets soft probabilities or one-hot); weights: [N, H, W].
  The caller picks the denominator: the original divides by the number of valid (non-padding,
  non-cutout) pixels even when a confidence threshold zeroes some of them in the numerator.
  Returns 0 when num_valid is 0.
  """
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  per_pixel = -jnp.sum(targets.astype(jnp.float32) * log_probs, axis=-1)
  total = jnp.sum(per_pixel * weights.astype(jnp.float32))
  return jnp.where(num_valid > 0, total / jnp.maximum(num_valid, 1e-5), 0.0)


def multilabel_sigmoid_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean over images and classes of the sigmoid cross-entropy (image-level, multi-label)."""
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.float32)
  # max(x, 0) - x z + log(1 + exp(-|x|)): the numerically stable form.
  losses = jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  return jnp.mean(losses)
