"""Checkpoints under bad input and failures: damaged files, a full disk, a run killed mid-save.

A tiny state stands in for the model: one array big enough (8 KiB) to get a data file of its own,
like real weights, and small ones that orbax inlines into its index.
"""

import builtins
import errno
import hashlib
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pseudoseg_jax import checkpointing

KILL_LIMIT_S = 60


def tiny_state(step: int) -> dict:
  kernel = np.random.default_rng(step).standard_normal((32, 64)).astype(np.float32)
  return {"params": {"conv": {"kernel": jnp.asarray(kernel),
                              "bias": jnp.full((3,), step, jnp.float32)}},
          "opt_state": {"momentum": {"conv": {"bias": jnp.full((3,), -step, jnp.float32)}}},
          "step": jnp.asarray(step, jnp.int32)}


def assert_state_is(restored: dict, step: int) -> None:
  expected = tiny_state(step)
  for path in (("params", "conv", "kernel"), ("params", "conv", "bias"),
               ("opt_state", "momentum", "conv", "bias"), ("step",)):
    got, want = restored, expected
    for key in path:
      got, want = got[key], want[key]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(path))


def save_steps(workdir, steps, keep: int = 3) -> None:
  manager = checkpointing.make_manager(str(workdir), keep)
  for step in steps:
    checkpointing.save(manager, step, tiny_state(step))
  checkpointing.wait_until_finished(manager)
  manager.close()


def restore(workdir, step=None):
  manager = checkpointing.make_manager(str(workdir), None, read_only=True)
  try:
    return checkpointing.restore_latest(manager, tiny_state(0), step=step)
  finally:
    manager.close()


def folder_snapshot(folder) -> dict:
  """Every file under `folder` with its size, modification time and content hash."""
  snapshot = {}
  for root, dirs, files in os.walk(folder):
    for name in dirs + files:
      path = os.path.join(root, name)
      stat = os.stat(path)
      digest = hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest() if name in files else ""
      snapshot[os.path.relpath(path, folder)] = (stat.st_size, stat.st_mtime_ns, digest)
  return snapshot


# ---------------------------------------------------------------- round trip, steps, old ones
def test_round_trip_and_restore_of_a_given_step(tmp_path):
  save_steps(tmp_path, [1, 2])
  assert_state_is(restore(tmp_path), 2)
  assert_state_is(restore(tmp_path, step=1), 1)
  assert restore(tmp_path / "elsewhere") is None


def test_a_step_that_is_not_there_names_the_kept_ones(tmp_path):
  save_steps(tmp_path, [1, 2])
  with pytest.raises(FileNotFoundError, match=r"no checkpoint 7 in .*; kept steps: 1, 2\."):
    restore(tmp_path, step=7)


def test_checkpoints_written_without_checksums_still_restore(tmp_path):
  # As written before checksums existed: a plain orbax save.
  manager = checkpointing.make_manager(str(tmp_path), 3)
  manager.save(4, args=ocp.args.StandardSave(tiny_state(4)))
  manager.wait_until_finished()
  manager.close()
  assert_state_is(restore(tmp_path), 4)


def test_a_different_model_keeps_its_own_message(tmp_path):
  save_steps(tmp_path, [5])
  other = tiny_state(0)
  other["params"]["conv"]["kernel"] = jnp.zeros((32, 48), jnp.float32)
  manager = checkpointing.make_manager(str(tmp_path), 3)
  with pytest.raises(ValueError, match=r"checkpoints/5 was written for a different model") as info:
    checkpointing.restore_latest(manager, other)
  assert not isinstance(info.value, checkpointing.CheckpointCorrupt)
  assert ("shape of ['params']['conv']['kernel']: checkpoint (32, 64) vs model (32, 48)"
          in str(info.value))


# ---------------------------------------------------------------- damaged checkpoints
def largest_file(folder) -> str:
  files = [os.path.join(root, name) for root, _, names in os.walk(folder) for name in names]
  return max(files, key=os.path.getsize)


def item_file(step_folder, name):
  return os.path.join(step_folder, "default", name)  # orbax's single item is called "default".


def truncate_to_half(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def overwrite_with_garbage(path):
  size = os.path.getsize(path)
  with open(path, "wb") as f:
    f.write(np.random.default_rng(0).bytes(size))


def flip_a_byte_in_the_middle(path):
  data = bytearray(pathlib.Path(path).read_bytes())
  data[len(data) // 2] ^= 0xFF
  pathlib.Path(path).write_bytes(bytes(data))


def empty_the_folder(step_folder):
  shutil.rmtree(step_folder)
  os.mkdir(step_folder)


DAMAGES = {
    # The weights' data file: orbax/tensorstore notice these when reading the array ...
    "data file truncated": (lambda step: truncate_to_half(largest_file(step)), "OUT_OF_RANGE"),
    "data file garbage": (lambda step: overwrite_with_garbage(largest_file(step)), "ZSTD"),
    "data file deleted": (lambda step: os.remove(largest_file(step)), "Error reading"),
    # ... but not this one (zstd decodes it to other numbers): the CRC32 written with it does.
    "data file byte flipped": (lambda step: flip_a_byte_in_the_middle(largest_file(step)), "CRC32"),
    # The index (an OCDBT b-tree) and the tree metadata fail when reading the metadata.
    "index truncated": (lambda step: truncate_to_half(item_file(step, "manifest.ocdbt")),
                        "its metadata"),
    "metadata garbage": (lambda step: overwrite_with_garbage(item_file(step, "_METADATA")),
                         "its metadata"),
    "metadata truncated": (lambda step: truncate_to_half(item_file(step, "_METADATA")),
                           "its metadata"),
    "metadata deleted": (lambda step: os.remove(item_file(step, "_METADATA")), "lists no arrays"),
    "empty folder": (empty_the_folder, "its metadata"),
}


@pytest.fixture(scope="module")
def pristine_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pristine")
  save_steps(workdir, [1, 2])
  return workdir


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_damaged_latest_checkpoint_is_named_and_left_as_is(damage, pristine_workdir, tmp_path):
  workdir = tmp_path / "workdir"
  shutil.copytree(pristine_workdir, workdir)
  step_folder = os.path.join(checkpointing.checkpoint_dir(str(workdir)), "2")
  damage_fn, problem = DAMAGES[damage]
  damage_fn(step_folder)
  before = folder_snapshot(workdir)

  with pytest.raises(checkpointing.CheckpointCorrupt) as info:
    restore(workdir)
  message = str(info.value)
  assert isinstance(info.value, ValueError)
  assert f"The checkpoint {step_folder} (step 2) cannot be read" in message
  assert problem in message.splitlines()[0]
  assert "Other checkpoints: steps 1. To use step 1 instead, move this folder" in message
  assert f"mv {step_folder} {workdir}/damaged_checkpoint_2" in message
  assert "Nothing on disk was changed." in message
  assert folder_snapshot(workdir) == before  # Nothing deleted, moved or rewritten.
  assert_state_is(restore(workdir, step=1), 1)  # The older one is still there for the taking.

  # Following the advice resumes from the older checkpoint.
  shutil.move(step_folder, workdir / "damaged_checkpoint_2")
  assert_state_is(restore(workdir), 1)


def test_a_damaged_only_checkpoint_says_there_is_no_older_one(tmp_path):
  save_steps(tmp_path, [3])
  truncate_to_half(largest_file(os.path.join(checkpointing.checkpoint_dir(str(tmp_path)), "3")))
  with pytest.raises(checkpointing.CheckpointCorrupt, match=r"steps none\. No older checkpoint"):
    restore(tmp_path)


# ---------------------------------------------------------------- a full disk while saving
@pytest.fixture
def full_disk(monkeypatch):
  """While `full_disk.on`, every file opened for writing under a checkpoints folder fails with
  ENOSPC: the layer under orbax's own files (step and tree metadata, commit markers), which are
  written through etils.epath -> open(). tensorstore's array writes go on: the save fails anyway."""
  real_open = builtins.open

  class FullDisk:
    on = False

  def open_on_a_full_disk(file, mode="r", *args, **kwargs):
    if (FullDisk.on and any(m in mode for m in "wax+") and
        f"{os.sep}checkpoints{os.sep}" in os.fspath(file)):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(file))
    return real_open(file, mode, *args, **kwargs)

  monkeypatch.setattr(builtins, "open", open_on_a_full_disk)
  return FullDisk


@pytest.mark.parametrize("reported_by", ["wait_until_finished", "the next save"])
def test_a_full_disk_fails_loudly_and_keeps_the_complete_checkpoints(reported_by, tmp_path,
                                                                     full_disk):
  manager = checkpointing.make_manager(str(tmp_path), keep=2)
  for step in (1, 2):
    checkpointing.save(manager, step, tiny_state(step))
  checkpointing.wait_until_finished(manager)

  full_disk.on = True
  with pytest.raises(checkpointing.CheckpointSaveFailed) as info:
    checkpointing.save(manager, 3, tiny_state(3))  # Returns: the writing goes on in the background.
    if reported_by == "the next save":
      checkpointing.save(manager, 4, tiny_state(4))
    checkpointing.wait_until_finished(manager)
  message = str(info.value)
  assert isinstance(info.value, OSError)
  assert f"Saving checkpoint 3 in {checkpointing.checkpoint_dir(str(tmp_path))} failed" in message
  assert "No space left on device" in message
  assert "The complete checkpoints are untouched: steps 1, 2" in message
  # keep=2 did not delete step 1 for a step 3 that never completed.
  assert sorted(manager.all_steps()) == [1, 2]
  assert_state_is(restore(tmp_path, step=1), 1)
  assert_state_is(restore(tmp_path), 2)

  full_disk.on = False  # Space freed: the same manager saves again, and keeps the last two.
  checkpointing.save(manager, 3, tiny_state(3))
  checkpointing.wait_until_finished(manager)
  assert sorted(manager.all_steps()) == [2, 3]
  manager.close()
  assert sorted(os.listdir(checkpointing.checkpoint_dir(str(tmp_path)))) == ["2", "3"]
  assert_state_is(restore(tmp_path), 3)


@pytest.fixture
def tiny_filesystem(tmp_path):
  """A 2 MiB tmpfs: a disk that really fills up, tensorstore's writes included. Needs the right
  to mount (root in a container with CAP_SYS_ADMIN); skipped elsewhere."""
  mount_point = tmp_path / "tiny_fs"
  mount_point.mkdir()
  try:
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True, check=False)
  except OSError as error:  # No mount command.
    pytest.skip(f"cannot mount a tmpfs here: {error}")
  if mounted.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
  try:
    yield mount_point
  finally:
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_really_full_disk_fails_loudly_and_a_rerun_saves_again(tiny_filesystem):
  workdir = tiny_filesystem / "workdir"
  save_steps(workdir, [1, 2], keep=2)
  filler = tiny_filesystem / "filler"
  with open(filler, "wb", buffering=0) as f:  # Fill what is left.
    try:
      while True:
        f.write(b"\0" * 4096)
    except OSError:
      pass

  manager = checkpointing.make_manager(str(workdir), keep=2)
  with pytest.raises(checkpointing.CheckpointSaveFailed,
                     match=r"Saving checkpoint 3 in .* failed: .*No space left on device"):
    checkpointing.save(manager, 3, tiny_state(3))
    checkpointing.wait_until_finished(manager)
  assert_state_is(restore(workdir, step=1), 1)
  assert_state_is(restore(workdir), 2)

  os.remove(filler)  # A rerun after space was freed.
  save_steps(workdir, [3], keep=2)
  assert sorted(os.listdir(checkpointing.checkpoint_dir(str(workdir)))) == ["2", "3"]
  assert_state_is(restore(workdir), 3)


# ---------------------------------------------------------------- kill -9 in the middle of a save
# Saves steps 1 and 2, then step 3 with orbax's renames patched to stop (forever) before the one
# into the path ending in `stop_before`: the item folder (its arrays are written, the step folder
# is not final) or the step folder (the very last act of a save). The parent kills it there.
SAVE_UNTIL_KILLED = textwrap.dedent("""
    import os, sys, time
    from orbax.checkpoint._src.path import async_path
    sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[1])))
    from test_checkpointing import tiny_state
    from pseudoseg_jax import checkpointing

    workdir, stop_before = sys.argv[2], sys.argv[3]
    real_rename = async_path.rename

    async def rename_or_stop(src, dst):
      if str(dst).endswith(stop_before):
        print("stopped", flush=True)
        time.sleep(600)
      return await real_rename(src, dst)

    async_path.rename = rename_or_stop
    manager = checkpointing.make_manager(workdir, 3)
    for step in (1, 2):
      checkpointing.save(manager, step, tiny_state(step))
    checkpointing.wait_until_finished(manager)
    checkpointing.save(manager, 3, tiny_state(3))
    checkpointing.wait_until_finished(manager)
    """)


@pytest.mark.parametrize("stop_before", ["3.orbax-checkpoint-tmp/default", "checkpoints/3"])
def test_a_save_killed_midway_leaves_the_previous_checkpoints_and_saves_again(stop_before,
                                                                              tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  child = subprocess.Popen(
      [sys.executable, "-c", SAVE_UNTIL_KILLED, __file__, str(tmp_path), stop_before],
      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
  try:
    assert child.stdout.readline().strip() == "stopped"
  finally:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=KILL_LIMIT_S)
  folder = checkpointing.checkpoint_dir(str(tmp_path))
  leftover = "3" + ocp.utils.TMP_DIR_SUFFIX
  assert sorted(os.listdir(folder)) == ["1", "2", leftover]
  assert os.listdir(os.path.join(folder, leftover))  # Written in part, or in whole but not final.

  # A reader takes the last complete checkpoint and leaves the leftover alone (it could be a
  # running trainer's save in progress).
  assert_state_is(restore(tmp_path), 2)
  assert leftover in os.listdir(folder)

  # The rerun: its manager sweeps the leftover (in the background), and it reaches step 3 again.
  manager = checkpointing.make_manager(str(tmp_path), 3)
  deadline = time.monotonic() + KILL_LIMIT_S
  while leftover in os.listdir(folder) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert sorted(os.listdir(folder)) == ["1", "2"]
  assert_state_is(checkpointing.restore_latest(manager, tiny_state(0)), 2)
  checkpointing.save(manager, 3, tiny_state(3))
  checkpointing.wait_until_finished(manager)
  manager.close()
  assert sorted(os.listdir(folder)) == ["1", "2", "3"]
  assert_state_is(restore(tmp_path), 3)


def test_an_array_split_over_processes_gets_a_crc_per_shard_it_holds():
  """A state sharded over hosts has no whole copy on any of them: each shard this process holds
  is checksummed under its own index, none left out. Faked here with an array split over the 4
  virtual devices, told it is not fully addressable."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ("data",))
  values = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  array = jax.device_put(values, jax.sharding.NamedSharding(mesh,
                                                            jax.sharding.PartitionSpec("data")))
  with mock.patch.object(type(array), "is_fully_addressable", new_callable=mock.PropertyMock,
                         return_value=False):
    checksums = checkpointing._checksums({"w": array, "step": np.int32(3)})
  expected = {f"['w']@[{2 * i}:{2 * i + 2}, :]":
              ["float32", zlib.crc32(values[2 * i:2 * i + 2].tobytes())] for i in range(4)}
  assert checksums == {**expected, "['step']": ["int32", zlib.crc32(np.int32(3).tobytes())]}
