"""Pure train and eval steps: (state, batch) -> (state, metrics). Jitted and sharded by train.py.

The model crosses the jit boundary as a static graphdef plus two pytrees of plain arrays (params and
batch statistics, as pure nested dicts): nnx.merge rebuilds the module inside the traced function, so
nothing stateful leaks across steps and the state is an ordinary pytree for optax and orbax.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from pseudoseg_jax import evaluation, losses
from pseudoseg_jax.models import build_model
from pseudoseg_jax.models.resize import resize_bilinear


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  batch_stats: dict
  opt_state: Any


def init_model(config: ml_collections.ConfigDict, seed: int):
  """Returns (graphdef, params, batch_stats) with params and stats as pure dicts.

  Initialization runs under jit with the 'rbg' key type: eagerly, or with threefry keys, XLA
  compiles hundreds of small random ops one by one and even the tiny model takes ~12 s on a CPU.
  """
  def make():
    return build_model(config.model, config.data.num_classes,
                       rngs=nnx.Rngs(params=jax.random.key(seed, impl="rbg")))

  def initial_values():
    _, params, batch_stats = nnx.split(make(), nnx.Param, nnx.BatchStat)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)

  graphdef = nnx.split(nnx.eval_shape(make), nnx.Param, nnx.BatchStat)[0]
  params, batch_stats = jax.jit(initial_values)()
  return graphdef, params, batch_stats


def weight_decay_mask(params: dict) -> dict:
  """True for conv/linear kernels (DeepLab's L2 regularizer), False for biases and norm params.

  The SGC head's projections are excluded as in the original (SPEC section 5).
  """
  def is_decayed(path, _):
    names = [str(getattr(entry, "key", entry)) for entry in path]
    return names[-1] == "kernel" and "sgc" not in names
  return jax.tree_util.tree_map_with_path(is_decayed, params)


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Poly decay from the base rate to `end_learning_rate` over all steps, no warm-up (SPEC 7)."""
  opt = config.optimizer
  return optax.polynomial_schedule(init_value=opt.learning_rate, end_value=opt.end_learning_rate,
                                   power=opt.poly_power, transition_steps=config.total_steps)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """SGD with momentum (SPEC 7), or Adam for models trained from scratch in few steps: with
  He-initialized kernels behind batch norm, SGD's effective step lr / |w|^2 is tiny at first, which
  pretrained backbones do not mind but a from-scratch CPU demo does."""
  schedule = learning_rate_schedule(config)
  if config.optimizer.name == "adam":
    update = optax.adam(schedule)
  else:
    update = optax.sgd(schedule, momentum=config.optimizer.momentum)
  # Coupled L2 (added to the gradient), as slim's l2_regularizer does: the gradient of
  # wd/2 * |w|^2 is wd * w.
  return optax.chain(
      optax.add_decayed_weights(config.optimizer.weight_decay, mask=weight_decay_mask), update)


def create_train_state(config: ml_collections.ConfigDict, seed: int):
  """Returns (graphdef, optimizer, state) for a freshly initialized model."""
  graphdef, params, batch_stats = init_model(config, seed)
  tx = make_optimizer(config)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                     opt_state=tx.init(params))
  return graphdef, tx, state


def step_key(seed: int, step: jax.Array) -> jax.Array:
  """The randomness of one step depends only on (seed, step): resuming replays it exactly."""
  return jax.random.fold_in(jax.random.key(seed), step)


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


def train_step(state: TrainState, batch: dict, *, graphdef: nnx.GraphDef,
               tx: optax.GradientTransformation, config: ml_collections.ConfigDict):
  key = step_key(config.seed, state.step)
  grad_fn = jax.value_and_grad(supervised_loss, has_aux=True)
  (loss, (new_stats, metrics)), grads = grad_fn(state.params, state.batch_stats, batch, key,
                                               graphdef=graphdef, config=config)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  metrics = {**metrics, "train/loss": loss, "train/grad_norm": optax.global_norm(grads),
             "train/learning_rate": learning_rate_schedule(config)(state.step)}
  new_state = state.replace(step=state.step + 1, params=new_params, batch_stats=new_stats,
                            opt_state=new_opt_state)
  return new_state, metrics


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
