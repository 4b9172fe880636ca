"""CutMix of unlabeled pairs, with their pseudo labels mixed alike (CPS, UniMatch).

Not in the original PseudoSeg, whose only strong perturbation is colour jitter plus a cutout box:
config.pseudoseg.cutmix_probability > 0 switches it on. Image i of the batch gets a box pasted
from image i + 1 (cyclically) into its strong view; the targets the strong view learns from are
the weak view's pseudo labels mixed with the same box, so the network must segment a scene it
never saw whole, which resists fitting its own mistakes better than colour changes alone.

Boxes are drawn on the device from the step's key: area a fraction U(min_area, max_area) of the
crop, aspect ratio log-uniform in [1/3, 3], uniform position, each image boxed with the given
probability (otherwise its box is empty and it is left as it was).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MIN_AREA, MAX_AREA = 0.02, 0.4
MAX_ASPECT = 3.0


def partner(x: jax.Array) -> jax.Array:
  """The image each image takes its box from: the next one in the batch, the last the first."""
  return jnp.roll(x, -1, axis=0)


def random_boxes(key: jax.Array, batch_size: int, height: int, width: int, *,
                 probability: float) -> jax.Array:
  """bool [N, H, W]: True inside image n's box (all False when n is not boxed)."""
  area_key, aspect_key, row_key, col_key, use_key = jax.random.split(key, 5)
  area = jax.random.uniform(area_key, (batch_size,), minval=MIN_AREA, maxval=MAX_AREA)
  log_aspect = jax.random.uniform(aspect_key, (batch_size,), minval=-jnp.log(MAX_ASPECT),
                                  maxval=jnp.log(MAX_ASPECT))
  box_height = jnp.minimum(jnp.sqrt(area * jnp.exp(log_aspect)) * height, height)
  box_width = jnp.minimum(jnp.sqrt(area / jnp.exp(log_aspect)) * width, width)
  top = jax.random.uniform(row_key, (batch_size,)) * (height - box_height)
  left = jax.random.uniform(col_key, (batch_size,)) * (width - box_width)
  boxed = jax.random.uniform(use_key, (batch_size,)) < probability
  return box_masks(top, left, box_height, box_width, boxed, height, width)


def box_masks(top, left, box_height, box_width, boxed, height: int, width: int) -> jax.Array:
  """bool [N, H, W] of the pixels whose centres lie in [top, top + h) x [left, left + w)."""
  rows = jnp.arange(height, dtype=jnp.float32)[None, :, None] + 0.5
  cols = jnp.arange(width, dtype=jnp.float32)[None, None, :] + 0.5
  inside_rows = (rows >= top[:, None, None]) & (rows < (top + box_height)[:, None, None])
  inside_cols = (cols >= left[:, None, None]) & (cols < (left + box_width)[:, None, None])
  return inside_rows & inside_cols & boxed[:, None, None]


def mix(x: jax.Array, boxes: jax.Array) -> jax.Array:
  """x [N, H, W, ...] with each image's box taken from its partner. `boxes` [N, H, W] must have
  x's spatial size."""
  inside = boxes.reshape(boxes.shape + (1,) * (x.ndim - 3))
  return jnp.where(inside, partner(x), x)
