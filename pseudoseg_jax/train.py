"""run(config, workdir): the whole training job, top to bottom.

mesh -> data -> model/optimizer -> restore -> loop (step, log, eval, checkpoint) -> results.json and
learning_curves.png. Rerunning the same command on the same workdir resumes from the latest
checkpoint; a finished run only reports its results again.
"""

from __future__ import annotations

import functools
import signal
import tempfile

import jax
import ml_collections
import numpy as np

from pseudoseg_jax import checkpointing, convert, distributed, evaluation, paths, preemption
from pseudoseg_jax import sharding, steps
from pseudoseg_jax import visualize, workdirs, writers
from pseudoseg_jax import config as config_lib
from pseudoseg_jax.data import datasets, pipeline, streams
from pseudoseg_jax.models import normalization
from pseudoseg_jax.writers import log

class TrainingDiverged(RuntimeError):
  """A step's loss or gradient norm was not finite (and config.skip_nonfinite_steps is off)."""


def raise_if_diverged(pending_metrics: list, last_step: int, manager) -> None:
  """TrainingDiverged naming the first pending step whose loss or gradient norm is not finite.

  Called before anything leaves the loop (a log, an eval, a checkpoint), so a non-finite state is
  never saved. It waits for the device only there, not every step; the steps run between a
  divergence and its check are lost anyway.
  """
  finite = jax.device_get([m["train/all_finite"] for m in pending_metrics])
  if all(finite):
    return
  index = next(i for i, ok in enumerate(finite) if not ok)
  names = ("train/loss", "train/grad_norm")
  values = jax.device_get([pending_metrics[index][name] for name in names])
  named = ", ".join(f"{name}={float(value)}" for name, value in zip(names, values)
                    if not np.isfinite(value))
  checkpointing.wait_until_finished(manager)  # The last good save completes first.
  latest = manager.latest_step()
  kept = (f"the last checkpoint (step {latest}, in {manager.directory}) is untouched"
          if latest is not None else "no checkpoint was written")
  raise TrainingDiverged(
      f"Training diverged at step {last_step - len(pending_metrics) + 1 + index}: {named}. "
      f"Nothing of this step was saved; {kept}. Lower config.optimizer.learning_rate, or set "
      "config.skip_nonfinite_steps=True to skip such steps.")


def average_pending(pending_metrics: list, source: datasets.Source) -> tuple[dict, int]:
  """(the mean of each metric over the finite steps, how many steps were not finite). The
  pseudo labels' per-class counts are summed instead, into their per-class recall and precision."""
  fetched = jax.device_get(pending_metrics)
  finite = [m for m in fetched if m["train/all_finite"]]
  if not finite:
    return {}, len(fetched)
  counts = [name for name in steps.PSEUDO_LABEL_CLASS_COUNTS if name in finite[0]]
  averaged = {name: float(np.mean([m[name] for m in finite]))
              for name in finite[0] if name != "train/all_finite" and name not in counts}
  if counts:
    averaged.update(per_class_pseudo_label_quality(
        {name: np.sum([m[name] for m in finite], axis=0) for name in counts}))
  return without_unmeasured(averaged, source), len(fetched) - len(finite)


def per_class_pseudo_label_quality(counts: dict) -> dict:
  """Per-class recall (of the true pixels, the share the pseudo labels got right) and precision (of
  the pixels pseudo-labeled as the class, the share that are it) from PSEUDO_LABEL_CLASS_COUNTS
  summed over steps; NaN where a class has no such pixel. A class that the pseudo labels drop
  shows as recall near 0 while the class-balanced accuracy barely moves."""
  pixels, correct, labeled = (np.asarray(counts[name], np.float64)
                              for name in steps.PSEUDO_LABEL_CLASS_COUNTS)
  with np.errstate(divide="ignore", invalid="ignore"):
    return {"pseudo/recall_per_class": np.where(pixels > 0, correct / pixels, np.nan),
            "pseudo/precision_per_class": np.where(labeled > 0, correct / labeled, np.nan)}


def previously_skipped_steps(workdir: str) -> int:
  """The 'train/skipped_steps' count logged before a resume (metrics.jsonl is already cut back to
  the restored step), so the count stays cumulative over the whole run."""
  counts = [m["train/skipped_steps"] for m in writers.read_metrics(workdir)
            if "train/skipped_steps" in m]
  return int(counts[-1]) if counts else 0


def evaluate(eval_fn, state: steps.TrainState, eval_batches, mesh) -> tuple[dict, np.ndarray]:
  """Accumulates the confusion matrix over the whole eval split; returns its summary (mIoU ...)
  and the matrix itself."""
  confusion = None
  for local_batch in eval_batches():
    batch_confusion = np.asarray(eval_fn(state.params, state.batch_stats,
                                         sharding.to_global(local_batch, mesh)), np.int64)
    confusion = batch_confusion if confusion is None else confusion + batch_confusion
  return evaluation.summarize(confusion, prefix="val"), confusion


def write_evaluation(writer: writers.MetricWriter, step: int, summary: dict,
                     confusion: np.ndarray, class_names) -> None:
  """The summary to metrics.jsonl and TensorBoard, and the confusion matrix as a picture."""
  writer.write(step, summary)
  if writer.enabled:  # Drawing takes a second: only where it is kept.
    title = f"step {step}: val mIoU {summary['val/miou']:.3f}"
    writer.write_images(step, {"confusion_matrix": visualize.confusion_matrix_image(
        confusion, class_names, title=title)})
  log.info("step %d: val/miou = %.4f", step, summary["val/miou"])


def make_train_fn(config: ml_collections.ConfigDict, graphdef, state, mesh):
  """The jitted train step, called as (state, batch, schedule_length(config, mesh)): the state
  replicated and donated, the batch split over 'data'. The schedule's length is an argument rather
  than a constant, so a run resumed with a larger total_steps reuses the compiled program."""
  replicated = sharding.replicated(mesh)
  state_sharding = jax.tree.map(lambda _: replicated, state)
  return jax.jit(functools.partial(steps.train_step, graphdef=graphdef, config=config),
                 in_shardings=(state_sharding, sharding.batch_sharding(mesh), replicated),
                 out_shardings=(state_sharding, replicated), donate_argnums=0)


def schedule_length(config: ml_collections.ConfigDict, mesh) -> jax.Array:
  """config.total_steps as the train step's argument: an int32 scalar replicated over the mesh."""
  return sharding.replicate(np.int32(config.total_steps), mesh)


def read_init_weights(model_config: ml_collections.ConfigDict) -> dict:
  """convert.read_weights of model_config.init_from; a gs:// (any URL) file is copied to a
  temporary folder first, since the readers map or seek local files."""
  path = model_config.init_from
  if not paths.is_remote(path):
    return convert.read_weights(path, model_config)
  with tempfile.TemporaryDirectory(prefix="pseudoseg_init_from_") as folder:
    prefix = path.removesuffix(".index")  # A TF checkpoint: its .index and .data-* come along.
    return convert.read_weights(paths.local_copy(prefix, folder) + path[len(prefix):],
                                model_config)


def with_pretrained_backbone(state: steps.TrainState, tx,
                             model_config: ml_collections.ConfigDict) -> steps.TrainState:
  """A fresh state whose backbone holds the weights of model_config.init_from, all or nothing.

  Only at step 0: a resumed run has its own weights, and need not find the file again.
  """
  weights = read_init_weights(model_config)
  params, batch_stats = convert.load_backbone(
      jax.device_get(state.params), jax.device_get(state.batch_stats), weights,
      source=model_config.init_from)
  log.info("Backbone initialized from %s (%d tensors); heads initialized at random.",
           model_config.init_from, len(weights))
  return state.replace(params=params, batch_stats=batch_stats,
                       opt_state=steps.initial_optimizer_state(tx, params))


def with_resolved_normalization(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy whose model.input_normalization names what the model applies, so that the run's
  config.json records it (an empty field means the default of model.init_from's weights)."""
  resolved = config.copy_and_resolve_references()
  resolved.model.input_normalization = normalization.resolved_normalization(config.model)
  return resolved


def without_unmeasured(metrics: dict, source: datasets.Source) -> dict:
  """Drops the pseudo-label accuracies when the unlabeled images have no masks to measure them
  against (a user's folder): they would read 0, not "unknown"."""
  if source.unlabeled_has_masks:
    return metrics
  return {name: value for name, value in metrics.items()
          if not (name.startswith("pseudo/") and name.endswith(("accuracy", "_per_class")))}


def write_pseudo_label_summary(writer: writers.MetricWriter, images_fn, state: steps.TrainState,
                               local_batch: dict, global_batch: dict,
                               config: ml_collections.ConfigDict) -> None:
  """The pseudo_label_grid of the step about to run, computed before it with its own key: the
  pseudo labels this very step trains on. Every process computes (the batch is global)."""
  step_key = steps.step_key(config.seed, state.step)
  _, unlabeled_key = steps.labeled_and_unlabeled_keys(step_key)
  maps = jax.device_get(images_fn(state.params, state.batch_stats, global_batch["unlabeled"],
                                  unlabeled_key, teacher=state.teacher,
                                  class_frequencies=state.class_frequencies))
  writer.write_images(int(state.step) + 1, {"pseudo_labels": visualize.pseudo_label_grid(
      maps, local_batch["unlabeled"], config.data.num_classes)})


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  config_lib.validate(config)
  config = with_resolved_normalization(config)
  paths.makedirs(workdir)
  workdirs.check_matches(config, workdir)
  is_writer = jax.process_index() == 0

  # ---------------------------------------------------------------- mesh and data
  mesh = sharding.make_mesh()
  # Process 0 prepares a dataset first: processes preparing one shared data_dir at once collide.
  source = distributed.process_0_first(lambda: datasets.load_source(config))
  local_eval_batch_size = sharding.per_process_batch_size(config.eval_batch_size, mesh,
                                                          "eval_batch_size")

  def eval_batches():
    return pipeline.as_numpy_batches(pipeline.eval_stream(
        source.eval, batch_size=local_eval_batch_size, crop_size=config.eval_crop_size,
        ignore_label=config.data.ignore_label, process_index=jax.process_index(),
        process_count=jax.process_count(), num_examples=source.num_eval))

  # ---------------------------------------------------------------- model, optimizer, restore
  graphdef, tx, state = steps.create_train_state(config, config.seed)
  state = sharding.replicate(state, mesh)
  manager = checkpointing.make_manager(workdir, config.keep_checkpoints)
  restored = checkpointing.restore_latest(manager, state)
  if restored is not None:
    state = restored
    log.info("Resumed from %s at step %d.", checkpointing.checkpoint_dir(workdir),
             int(state.step))
  elif config.model.init_from:
    state = sharding.replicate(
        steps.with_fresh_teacher(with_pretrained_backbone(state, tx, config.model), config), mesh)
  start_step = int(state.step)
  if is_writer:
    workdirs.write_config(workdir, config)
    writers.truncate_metrics(workdir, start_step)
  writer = writers.MetricWriter(workdir, enabled=is_writer)

  replicated = sharding.replicated(mesh)
  train_fn = make_train_fn(config, graphdef, state, mesh)
  total_steps = schedule_length(config, mesh)
  eval_fn = jax.jit(
      functools.partial(steps.eval_step, graphdef=graphdef, num_classes=config.data.num_classes,
                        ignore_label=config.data.ignore_label),
      out_shardings=replicated)
  wants_images = config.method == "pseudoseg" and config.image_summary_every > 0
  if wants_images:
    images_fn = jax.jit(
        functools.partial(steps.pseudo_label_images, graphdef=graphdef, config=config),
        out_shardings=replicated)

  # ---------------------------------------------------------------- train loop
  train_batches = streams.training_batches(config, source, mesh, start_step)
  progress = writers.Progress(start_step, config.total_steps)
  pending_metrics = []
  last_eval = None
  if start_step < config.total_steps:
    log.info("Training %s from step %d to %d on %d device(s), global batch %d labeled%s.",
             config.method, start_step, config.total_steps, mesh.devices.size, config.batch_size,
             f" + {config.pseudoseg.unlabeled_batch_size} unlabeled (pool of "
             f"{source.num_unlabeled})" if config.method == "pseudoseg" else "")
  skipped_steps = (previously_skipped_steps(workdir)
                   if is_writer and config.skip_nonfinite_steps else 0)
  # Preemption: the signal only sets a flag; the step in flight finishes, is checkpointed (the save
  # waited for) with its pending metrics, and run() raises preemption.Preempted. From the signal to
  # the exit is one step and one save: no eval or image summary runs after it.
  with preemption.StopSignals() as stop_signals:
    for step in range(start_step + 1, config.total_steps + 1):
      local_batch = next(train_batches)
      global_batch = sharding.to_global(local_batch, mesh)
      if wants_images and (step % config.image_summary_every == 0 or step == start_step + 1):
        write_pseudo_label_summary(writer, images_fn, state, local_batch, global_batch, config)
      state, metrics = train_fn(state, global_batch, total_steps)
      pending_metrics.append(metrics)
      if step == start_step + 1:
        progress.restart_clock(step)  # Keep compile time out of steps/s.
      preempted = preemption.should_stop(manager, step, stop_signals)
      is_last = step == config.total_steps
      wants_log = step % config.log_every == 0 or is_last or preempted
      wants_eval = (step % config.eval_every == 0 or is_last) and not preempted
      wants_save = step % config.checkpoint_every == 0 or is_last or preempted
      if not config.skip_nonfinite_steps and (wants_log or wants_eval or wants_save):
        raise_if_diverged(pending_metrics, step, manager)
      if wants_log:
        averaged, skipped = average_pending(pending_metrics, source)
        if config.skip_nonfinite_steps:
          skipped_steps += skipped
          averaged["train/skipped_steps"] = skipped_steps
          if skipped:
            log.warning("Skipped %d of the last %d steps: loss or gradient norm not finite.",
                        skipped, len(pending_metrics))
        pending_metrics = []
        averaged["train/steps_per_second"] = progress.report(step, averaged)
        writer.write(step, averaged)
      if wants_eval:
        summary, confusion = evaluate(eval_fn, state, eval_batches, mesh)
        write_evaluation(writer, step, summary, confusion, source.class_names)
        last_eval = (step, summary)
        progress.restart_clock(step)
      if wants_save:
        checkpointing.save(manager, step, state)
      if preempted:
        checkpointing.wait_until_finished(manager)
        writer.close()
        log.info("Preempted at step %d; rerun the same command to resume.", step)
        # Other processes stop because one was signalled: they exit as if they had been too.
        raise preemption.Preempted(step, stop_signals.received or signal.SIGTERM)
  checkpointing.wait_until_finished(manager)

  # ---------------------------------------------------------------- results
  final_step = int(state.step)
  results_path = workdirs.results_path(workdir)
  if last_eval is None and (results := workdirs.read_results(workdir)) is not None:
    if results.get("step") == final_step:
      log.info("Already trained to step %d; results in %s.", final_step, results_path)
      writer.close()
      # A run finished before the curves existed gets them now.
      if is_writer and not paths.exists(workdirs.learning_curves_path(workdir)):
        log.info("Learning curves: %s.", visualize.write_learning_curves(workdir, config))
      return results
  if last_eval is None or last_eval[0] != final_step:
    summary, confusion = evaluate(eval_fn, state, eval_batches, mesh)
    write_evaluation(writer, final_step, summary, confusion, source.class_names)
    last_eval = (final_step, summary)
  results = {"step": final_step, **last_eval[1], "class_names": list(source.class_names)}
  writer.close()
  if is_writer:
    workdirs.write_results(workdir, results)
    log.info("Learning curves: %s.", visualize.write_learning_curves(workdir, config))
  log.info("Final val/miou = %.4f at step %d (%s).", results["val/miou"], final_step,
           results_path)
  return results
