"""run(config, workdir): the whole training job, top to bottom.

mesh -> data -> model/optimizer -> restore -> loop (step, log, eval, checkpoint) -> results.json.
Rerunning the same command on the same workdir resumes from the latest checkpoint; a finished run
only reports its results again.
"""

from __future__ import annotations

import functools
import json
import os

import jax
import ml_collections
import numpy as np

from pseudoseg_jax import checkpointing, evaluation, sharding, steps, writers
from pseudoseg_jax import config as config_lib
from pseudoseg_jax.data import datasets, pipeline
from pseudoseg_jax.writers import log

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"


def check_workdir_matches(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A workdir belongs to one model: resuming it with another would mix incompatible weights."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, json.JSONDecodeError) as error:
    raise ValueError(f"Cannot read {path} ({error}); it should hold the config of the run "
                     "that wrote this workdir.") from error
  current = config_lib.model_identity(config.to_dict())
  for field, saved_value in config_lib.model_identity(saved).items():
    if _normalize(saved_value) != _normalize(current[field]):
      raise ValueError(
          f"{path} holds a run with {field}={saved_value!r}, but the config asks for "
          f"{current[field]!r}. Use a new --workdir for a different model or optimizer.")


def _normalize(value):
  return list(value) if isinstance(value, tuple) else value


def write_json(path: str, payload: dict) -> None:
  """Write-then-rename, so a crash never leaves a truncated file behind."""
  with open(path + ".tmp", "w") as f:
    json.dump(payload, f, indent=2)
  os.replace(path + ".tmp", path)


def evaluate(eval_fn, state: steps.TrainState, eval_batches, mesh) -> dict:
  """Accumulates the confusion matrix over the whole eval split, then summarizes it."""
  confusion = None
  for local_batch in eval_batches():
    batch_confusion = np.asarray(eval_fn(state.params, state.batch_stats,
                                         sharding.to_global(local_batch, mesh)), np.int64)
    confusion = batch_confusion if confusion is None else confusion + batch_confusion
  return evaluation.summarize(confusion, prefix="val")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  check_workdir_matches(config, workdir)
  is_writer = jax.process_index() == 0

  # ---------------------------------------------------------------- mesh and data
  mesh = sharding.make_mesh()
  source = datasets.load_source(config)
  local_batch_size = sharding.per_process_batch_size(config.batch_size, mesh, "batch_size")
  local_eval_batch_size = sharding.per_process_batch_size(config.eval_batch_size, mesh,
                                                          "eval_batch_size")

  def eval_batches():
    return pipeline.as_numpy_batches(pipeline.eval_stream(
        source.eval, batch_size=local_eval_batch_size, crop_size=config.eval_crop_size,
        ignore_label=config.data.ignore_label, process_index=jax.process_index(),
        process_count=jax.process_count(), num_examples=source.num_eval))

  # ---------------------------------------------------------------- model, optimizer, restore
  graphdef, tx, state = steps.create_train_state(config, config.seed)
  state = jax.device_put(state, sharding.replicated(mesh))
  manager = checkpointing.make_manager(workdir, config.keep_checkpoints)
  restored = checkpointing.restore_latest(manager, state)
  if restored is not None:
    state = restored
    log.info("Resumed from %s at step %d.", checkpointing.checkpoint_dir(workdir),
             int(state.step))
  start_step = int(state.step)
  if is_writer:
    write_json(os.path.join(workdir, CONFIG_FILE), config.to_dict())
    writers.truncate_metrics(workdir, start_step)
  writer = writers.MetricWriter(workdir, enabled=is_writer)

  replicated = sharding.replicated(mesh)
  state_sharding = jax.tree.map(lambda _: replicated, state)
  train_fn = jax.jit(
      functools.partial(steps.train_step, graphdef=graphdef, tx=tx, config=config),
      in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
      out_shardings=(state_sharding, replicated), donate_argnums=0)
  eval_fn = jax.jit(
      functools.partial(steps.eval_step, graphdef=graphdef, num_classes=config.data.num_classes,
                        ignore_label=config.data.ignore_label),
      out_shardings=replicated)

  # ---------------------------------------------------------------- train loop
  # The stream's seed includes the start step so that a resumed run does not replay the batches
  # it has already trained on.
  train_batches = pipeline.as_numpy_batches(pipeline.labeled_stream(
      source.labeled, batch_size=local_batch_size, crop_size=config.crop_size,
      scales=tuple(config.scales), ignore_label=config.data.ignore_label,
      num_classes=config.data.num_classes, seed=(config.seed, start_step),
      process_index=jax.process_index(), process_count=jax.process_count(),
      shuffle_buffer=config.data.shuffle_buffer))
  progress = writers.Progress(start_step, config.total_steps)
  pending_metrics = []
  last_eval = None
  if start_step < config.total_steps:
    log.info("Training %s from step %d to %d on %d device(s), global batch %d.",
             config.method, start_step, config.total_steps, mesh.devices.size, config.batch_size)
  for step in range(start_step + 1, config.total_steps + 1):
    state, metrics = train_fn(state, sharding.to_global(next(train_batches), mesh))
    pending_metrics.append(metrics)
    if step == start_step + 1:
      progress.restart_clock(step)  # Keep compile time out of steps/s.
    if step % config.log_every == 0 or step == config.total_steps:
      averaged = {k: float(np.mean([m[k] for m in jax.device_get(pending_metrics)]))
                  for k in pending_metrics[0]}
      pending_metrics = []
      averaged["train/steps_per_second"] = progress.report(step, averaged)
      writer.write(step, averaged)
    if step % config.eval_every == 0 or step == config.total_steps:
      last_eval = (step, evaluate(eval_fn, state, eval_batches, mesh))
      writer.write(step, last_eval[1])
      log.info("step %d: val/miou = %.4f", step, last_eval[1]["val/miou"])
      progress.restart_clock(step)
    if step % config.checkpoint_every == 0 or step == config.total_steps:
      checkpointing.save(manager, step, state)
  manager.wait_until_finished()

  # ---------------------------------------------------------------- results
  final_step = int(state.step)
  results_path = os.path.join(workdir, RESULTS_FILE)
  if last_eval is None and os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
    if results.get("step") == final_step:
      log.info("Already trained to step %d; results in %s.", final_step, results_path)
      writer.close()
      return results
  if last_eval is None or last_eval[0] != final_step:
    last_eval = (final_step, evaluate(eval_fn, state, eval_batches, mesh))
    writer.write(final_step, last_eval[1])
  results = {"step": final_step, **last_eval[1], "class_names": list(source.class_names)}
  if is_writer:
    write_json(results_path, results)
  writer.close()
  log.info("Final val/miou = %.4f at step %d (%s).", results["val/miou"], final_step,
           results_path)
  return results
