"""The one place that knows orbax: save, keep the last N, restore the latest into a given state.

The state is stored as a nested dict of arrays (flax's state-dict form), so any pytree of the trainer
can be saved and the checkpoint is readable without our classes. Before restoring, the saved shapes
are compared with the expected ones, so a workdir holding a different model gives an error naming the
checkpoint and the first mismatching tensors instead of an orbax traceback or a silent partial load.
"""

from __future__ import annotations

import os
from typing import Any

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  # Naming the handler lets a new manager (a resumed run) read the saved tree's metadata.
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def save(manager: ocp.CheckpointManager, step: int, state: Any) -> None:
  """Saves asynchronously; orbax writes to a temporary folder and renames it when complete,
  so an interrupted save never replaces the previous checkpoint."""
  manager.save(step, args=ocp.args.StandardSave(flax.serialization.to_state_dict(state)))


def _shapes_by_path(tree: Any) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): tuple(np.shape(leaf)) for path, leaf in flat}


def _describe_mismatch(expected: dict, saved: dict, limit: int = 5) -> str:
  missing = sorted(set(expected) - set(saved))
  unexpected = sorted(set(saved) - set(expected))
  # Parameters first: they say most plainly which layer differs.
  reshaped = sorted((p for p in set(expected) & set(saved) if expected[p] != saved[p]),
                    key=lambda p: (not p.startswith("['params']"), p))
  lines = []
  if missing:
    lines.append(f"missing in checkpoint: {missing[:limit]}" + (" ..." if len(missing) > limit else ""))
  if unexpected:
    lines.append(f"not in this model: {unexpected[:limit]}" + (" ..." if len(unexpected) > limit else ""))
  for path in reshaped[:limit]:
    lines.append(f"shape of {path}: checkpoint {saved[path]} vs model {expected[path]}")
  return "\n  ".join(lines)


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> Any | None:
  """Restores the latest checkpoint into the structure, shapes and shardings of `target`.

  Returns None when there is no checkpoint. Raises ValueError when the checkpoint does not fit.
  """
  step = manager.latest_step()
  if step is None:
    return None
  path = os.path.join(str(manager.directory), str(step))
  target_dict = flax.serialization.to_state_dict(target)
  saved_shapes = _shapes_by_path(manager.item_metadata(step))
  expected_shapes = _shapes_by_path(target_dict)
  if saved_shapes != expected_shapes:
    raise ValueError(
        f"The checkpoint {path} was written for a different model or optimizer than the config "
        f"asks for:\n  {_describe_mismatch(expected_shapes, saved_shapes)}\n"
        "Use a new --workdir, or the config that wrote this one (see config.json there).")
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      target_dict)
  restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
  return flax.serialization.from_state_dict(target, restored)
