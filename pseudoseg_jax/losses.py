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
