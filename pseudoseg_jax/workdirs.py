"""The workdir contract in one place: the files a run keeps in WORKDIR, and how they are read back.

  WORKDIR/config.json        the run's resolved config; a resume must match it (check_matches)
  WORKDIR/results.json       the final evaluation: step, val/miou, per-class IoU, class names
  WORKDIR/metrics.jsonl      every logged scalar (writers.py appends it)
  WORKDIR/learning_curves.png, tensorboard/, checkpoints/ (checkpointing.py), eval_SPLIT.json
  (evaluate.py)

Train, evaluate, predict and inference name these files and read and write the JSON ones only
through this module.
"""

from __future__ import annotations

import json
import os

import ml_collections

from pseudoseg_jax import config as config_lib
from pseudoseg_jax import paths
from pseudoseg_jax.writers import log

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
LEARNING_CURVES_FILE = "learning_curves.png"


def write_json(path: str, payload: dict) -> None:
  """Written whole or not at all (paths.replace_file): a crash never leaves a truncated file."""
  paths.replace_file(path, lambda f: json.dump(payload, f, indent=2))


def read_json_object(path: str, what: str) -> dict:
  """The JSON object in `path`; ValueError naming the file and `what` it should hold otherwise."""
  try:
    with paths.open(path) as f:
      value = json.load(f)
    if not isinstance(value, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as error:
    raise ValueError(f"Cannot read {path} ({error}); it should hold {what}.") from error
  return value


# ---------------------------------------------------------------- config.json
def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  write_json(os.path.join(workdir, CONFIG_FILE), config.to_dict())


def config_from_dict(saved: dict) -> ml_collections.ConfigDict:
  """base_config() with the saved values: fields added since the run keep their defaults, JSON lists
  become the tuples the schema holds. Saved fields the schema no longer has are dropped, named."""
  config = config_lib.base_config()

  def overlay(section: ml_collections.ConfigDict, values: dict, prefix: str) -> None:
    for name, value in values.items():
      if name not in section:
        log.info("Ignoring %s%s from the saved config: not a config field any more.", prefix, name)
      elif isinstance(section[name], ml_collections.ConfigDict):
        overlay(section[name], value, f"{prefix}{name}.")
      elif isinstance(section[name], tuple) and isinstance(value, list):
        section[name] = tuple(value)
      else:
        section[name] = value

  overlay(config, saved, "")
  return config


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The validated config a run wrote into `workdir`."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not paths.exists(path):
    raise FileNotFoundError(f"{path} does not exist: --workdir must be a directory written by "
                            "`python -m pseudoseg_jax.main` (config.json and checkpoints/).")
  config = config_from_dict(read_json_object(path, "the config of the run that wrote it"))
  config_lib.validate(config)
  return config


def check_matches(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A workdir belongs to one model trained on one dataset: resuming it with another would mix
  incompatible weights or data. Changes that only break bit-exact resumption are warned about."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not paths.exists(path):
    return
  saved = read_json_object(path, "the config of the run that wrote this workdir")
  current = config.to_dict()
  for identity, what in ((config_lib.model_identity, "model or optimizer"),
                         (config_lib.data_identity, "dataset")):
    saved_values, current_values = identity(saved), identity(current)
    for field, saved_value in saved_values.items():
      if saved_value != current_values[field]:
        raise ValueError(
            f"{path} holds a run with {field}={saved_value!r}, but the config asks for "
            f"{current_values[field]!r}. Use a new --workdir for a different {what}; nothing in "
            f"{workdir} was changed.")
  saved_values, current_values = (config_lib.stream_settings(saved),
                                  config_lib.stream_settings(current))
  changed = [f"{field}: {saved_values[field]!r} -> {current_values[field]!r}"
             for field in saved_values if saved_values[field] != current_values[field]]
  if changed:
    log.warning("Resuming %s with changed %s: the run continues, but will not equal one that "
                "ran uninterrupted with either config.", workdir, "; ".join(changed))


# ---------------------------------------------------------------- results.json
def results_path(workdir: str) -> str:
  return os.path.join(workdir, RESULTS_FILE)


def read_results(workdir: str) -> dict | None:
  """results.json, or None when the run has not finished (or the file cannot be read: a results
  file is never the only copy of what it says)."""
  path = results_path(workdir)
  if not paths.exists(path):
    return None
  try:
    return read_json_object(path, "the run's final evaluation")
  except ValueError:
    return None


def write_results(workdir: str, results: dict) -> None:
  write_json(results_path(workdir), results)


def learning_curves_path(workdir: str) -> str:
  return os.path.join(workdir, LEARNING_CURVES_FILE)
