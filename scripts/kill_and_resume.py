"""Kills a training command at random moments, reruns it each time, and checks that the run it ends
with equals an uninterrupted run of the same command: results.json, every saved tensor (bit for
bit) and the training metrics of each logging window both runs share.

  python scripts/kill_and_resume.py --workdir=workdirs/kill_check --kills=4 -- \
      --config=configs/demo.py [--config.FIELD=VALUE ...]

Everything after `--` goes to `python -m pseudoseg_jax.main` (without --workdir). The reference
run goes to WORKDIR/uninterrupted (reused when it has finished) and the killed one to
WORKDIR/killed (started afresh). Each kill is SIGKILL (no warning) or, with --sigterm_share, SIGTERM
(a preemption notice), at a moment drawn uniformly from [--min_seconds, --max_seconds] after the
(re)start. Exits 1 if anything differs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from pseudoseg_jax import checkpointing, workdirs, writers  # noqa: E402


def command(workdir: str, main_args: list[str]) -> list[str]:
  return [sys.executable, "-m", "pseudoseg_jax.main", f"--workdir={workdir}", *main_args]


def run_with_kills(args: list[str], kills: int, rng: random.Random, min_seconds: float,
                   max_seconds: float, sigterm_share: float, log_path: str) -> list[str]:
  """Runs `args` until it exits 0, killing it `kills` times first; returns what happened."""
  events = []
  with open(log_path, "a") as log_file:
    while True:
      process = subprocess.Popen(args, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT)
      if len(events) < kills:
        delay = rng.uniform(min_seconds, max_seconds)
        try:
          process.wait(timeout=delay)
        except subprocess.TimeoutExpired:
          signal_number = signal.SIGTERM if rng.random() < sigterm_share else signal.SIGKILL
          process.send_signal(signal_number)
          code = process.wait()
          events.append(f"{signal.Signals(signal_number).name} after {delay:.0f} s (exit {code})")
          continue
      code = process.wait()
      if code == 0:
        return events
      if code in (128 + signal.SIGTERM, -signal.SIGKILL) and len(events) < kills:
        continue
      raise SystemExit(f"{' '.join(args)} failed with exit code {code}; see {log_path}.")


def saved_tensors(workdir: str, step: int) -> dict:
  manager = checkpointing.make_manager(workdir, keep=1, read_only=True)
  saved = manager.restore(step)
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]}


def training_records(workdir: str) -> list[dict]:
  return [{k: v for k, v in record.items() if k != "train/steps_per_second"}
          for record in writers.read_metrics(workdir) if "train/loss" in record]


def differences(reference: str, candidate: str) -> list[str]:
  """What differs between two finished workdirs (empty: identical)."""
  found = []
  results = []
  for workdir in (reference, candidate):
    with open(os.path.join(workdir, workdirs.RESULTS_FILE)) as f:
      results.append(json.load(f))
  if results[0] != results[1]:
    found.append(f"results.json: {results[0].get('val/miou')} vs {results[1].get('val/miou')}")
  step = results[0]["step"]
  tensors = [saved_tensors(workdir, step) for workdir in (reference, candidate)]
  if tensors[0].keys() != tensors[1].keys():
    found.append("the checkpoints hold different tensors")
  else:
    found += [f"tensor {path} differs" for path in tensors[0]
              if not np.array_equal(tensors[0][path], tensors[1][path])]
  records = [training_records(workdir) for workdir in (reference, candidate)]
  windows = [_by_window(rs) for rs in records]
  for window, record in windows[1].items():
    if window in windows[0] and windows[0][window] != record:
      found.append(f"the metrics logged over steps {window[0] + 1}-{window[1]} differ")
  if not set(windows[0]) & set(windows[1]):
    found.append("no logged window in common to compare")
  return found


def _by_window(records: list[dict]) -> dict:
  """{(previous logged step, step): record}. A preempted run also logs the step it stopped at, so
  only records averaged over the same steps in both runs are comparable."""
  steps = [0] + [record["step"] for record in records]
  return {(previous, record["step"]): record for previous, record in zip(steps, records)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--kills", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0, help="Of the kill moments.")
  parser.add_argument("--min_seconds", type=float, default=20.0)
  parser.add_argument("--max_seconds", type=float, default=120.0)
  parser.add_argument("--sigterm_share", type=float, default=0.25)
  parser.add_argument("main_args", nargs="+", help="After --: the arguments of pseudoseg_jax.main.")
  options = parser.parse_args()
  if any(arg.startswith("--workdir") for arg in options.main_args):
    parser.error("Give --workdir before --, not to pseudoseg_jax.main.")

  reference = os.path.join(options.workdir, "uninterrupted")
  killed = os.path.join(options.workdir, "killed")
  os.makedirs(options.workdir, exist_ok=True)
  started = time.monotonic()
  if not os.path.exists(os.path.join(reference, workdirs.RESULTS_FILE)):
    subprocess.run(command(reference, options.main_args), cwd=ROOT, check=True,
                   stdout=open(os.path.join(options.workdir, "uninterrupted.log"), "w"),
                   stderr=subprocess.STDOUT)
  print(f"uninterrupted run: {time.monotonic() - started:.0f} s", flush=True)
  shutil.rmtree(killed, ignore_errors=True)
  started = time.monotonic()
  events = run_with_kills(command(killed, options.main_args), options.kills,
                          random.Random(options.seed), options.min_seconds, options.max_seconds,
                          options.sigterm_share, os.path.join(options.workdir, "killed.log"))
  print(f"killed run: {time.monotonic() - started:.0f} s; " + "; ".join(events), flush=True)
  found = differences(reference, killed)
  for line in found:
    print("DIFFERS:", line)
  if found:
    raise SystemExit(1)
  with open(os.path.join(killed, workdirs.RESULTS_FILE)) as f:
    miou = json.load(f)["val/miou"]
  print(f"identical: results.json (val/miou {miou:.4f}), every saved tensor, the metrics of every "
        "logging window both runs share.")


if __name__ == "__main__":
  main()
