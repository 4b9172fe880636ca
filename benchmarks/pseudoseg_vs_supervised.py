"""Quality benchmark: supervised-only vs PseudoSeg (unlabeled) vs PseudoSeg (image-level labels),
same labeled subset and steps, several seeds; then the paper's ablations at one seed.

  python benchmarks/pseudoseg_vs_supervised.py --out=workdirs/benchmark [--seeds=0,1,2]
      [--config=configs/demo.py] [--num_labeled=20] [--steps=1000] [--only=main|reference|ablations|all]
      [--runs=supervised,pseudoseg,image_labels] [--report_only]

Each run is the ordinary training command (`python -m pseudoseg_jax.main ...`) in its own workdir
under --out, so an interrupted benchmark resumes where it stopped (finished runs are read back from
their results.json, unfinished ones resume from their last checkpoint). The table goes to stdout
and to OUT/results.md; the raw numbers to OUT/results.json. It is a benchmark, not a test: it takes
hours on a 2-core CPU.

Run it from a copy of the source tree that you do not edit meanwhile: tf.data's autograph reads the
pipeline functions' source files again when it traces them, so an edit in the middle of a run can
crash it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name -> the config's own arguments (CONFIG:method=...,weak_labels=...), so each row is the
# command a user runs: the config may choose its recipe by them (configs/demo.py does). The main
# comparison.
MAIN_RUNS = {
    "supervised": {"method": "supervised"},
    "pseudoseg (unlabeled)": {"method": "pseudoseg", "weak_labels": "false"},
    "pseudoseg (image-level labels)": {"method": "pseudoseg", "weak_labels": "true"},
}
# --runs: the short names of MAIN_RUNS, to train only some of them (e.g. one per process).
RUN_KEYS = dict(zip(("supervised", "pseudoseg", "image_labels"), MAIN_RUNS))
# What full supervision reaches in the same steps: the most any use of the unlabeled images could
# add at this budget (one seed).
REFERENCE_RUNS = {
    "supervised, every train image labeled": {"method": "supervised", "num_labeled": 0},
}
# The paper's ablations (Tables 3-5): each sets the fields named (--config.FIELD=VALUE) on top of
# "pseudoseg (unlabeled)".
ABLATIONS = {
    "source: fusion (the paper's)": {"pseudoseg.pseudo_label_source": "fusion"},
    "source: SGC only": {"pseudoseg.pseudo_label_source": "sgc"},
    "fusion without calibration": {"pseudoseg.pseudo_label_source": "fusion",
                                   "pseudoseg.calibrated": False},
    "soft labels (the paper's)": {"pseudoseg.soft_labels": True,
                                  "pseudoseg.confidence_threshold": 0.0,
                                  "pseudoseg.class_balanced_fraction": 0.0},
    "no strong augmentation": {"pseudoseg.strong_augment": False},
}


def run_name(name: str, seed: int) -> str:
  slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
  return f"{slug}_seed{seed}"


def train(out: str, name: str, config_args: dict, seed: int, args,
          fields: dict | None = None) -> dict | None:
  """Runs (or resumes, or reads back) one training run: --config=CONFIG:ARGS with `config_args`
  after --num_labeled and --steps, then --config.FIELD=VALUE for `fields`; returns its
  results.json, or None for a run not finished yet under --report_only."""
  arguments = {"num_labeled": args.num_labeled, "steps": args.steps, **config_args}
  config_arg = f"{args.config}:" + ",".join(f"{key}={value}" for key, value in arguments.items())
  return train_run(os.path.join(out, run_name(name, seed)), name, config_arg,
                   {"seed": seed, **(fields or {})}, seed=seed, report_only=args.report_only)


def train_run(workdir: str, name: str, config_arg: str, overrides: dict, *, seed: int,
              report_only: bool) -> dict | None:
  """The training command `--config=CONFIG_ARG --config.FIELD=VALUE...` in `workdir`, run (or
  resumed, or read back when finished); its results.json with the wall clock and the last
  pseudo-label accuracies, or None for a run not finished under `report_only`."""
  results_path = os.path.join(workdir, "results.json")
  flags = [f"--config.{field}={value}" for field, value in overrides.items()]
  command = [sys.executable, "-m", "pseudoseg_jax.main", f"--config={config_arg}",
             f"--workdir={workdir}", *flags]
  if not os.path.exists(results_path) and report_only:
    return None
  if not os.path.exists(results_path):
    print(f"[{time.strftime('%H:%M:%S')}] {name}, seed {seed}: {' '.join(command[1:])}",
          flush=True)
    started = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "train.log"), "a") as log:
      subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
    print(f"  done in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
  with open(results_path) as f:
    results = json.load(f)
  results["wall_clock_minutes"] = _wall_clock_minutes(workdir)
  results.update(_final_pseudo_label_accuracies(workdir))
  return results


PSEUDO_METRICS = {"pseudo_accuracy": "pseudo/accuracy", "decoder_accuracy": "pseudo/decoder_accuracy",
                  "sgc_accuracy": "pseudo/sgc_accuracy"}


def _final_pseudo_label_accuracies(workdir: str) -> dict:
  """The last logged class-balanced accuracies, against the unlabeled images' hidden ground truth,
  of the pseudo labels, of the decoder alone and of the SGC alone (absent for supervised runs)."""
  found = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      found.update({key: record[name] for key, name in PSEUDO_METRICS.items() if name in record})
  return found


def _wall_clock_minutes(workdir: str):
  """From the training log's first and last timestamps (HH:MM:SS), if present."""
  path = os.path.join(workdir, "train.log")
  if not os.path.exists(path):
    return None
  stamps = []
  with open(path) as f:
    for line in f:
      head = line[:8]
      if len(head) == 8 and head[2] == ":" and head[5] == ":":
        h, m, s = (int(x) for x in head.split(":"))
        stamps.append(h * 3600 + m * 60 + s)
  if len(stamps) < 2:
    return None
  return round(((stamps[-1] - stamps[0]) % 86400) / 60, 1)


def paired_gains(runs: list, supervised_runs: list) -> list:
  """val mIoU minus the supervised run's at the same seed (both lists in seed order, None for a
  run not finished), for the seeds both finished."""
  return [run["val/miou"] - supervised["val/miou"] for run, supervised in zip(runs, supervised_runs)
          if run is not None and supervised is not None]


def summarize(values: list) -> str:
  """mean +- sample standard deviation (in mIoU points), and the individual runs."""
  points = [100 * v for v in values]
  if len(points) == 1:
    return f"{points[0]:.1f}"
  spread = statistics.stdev(points)
  runs = ", ".join(f"{p:.1f}" for p in points)
  return f"{statistics.mean(points):.1f} ± {spread:.1f} ({runs})"


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--num_labeled", type=int, default=20)
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--only", choices=("main", "reference", "ablations", "all"), default="all")
  parser.add_argument("--runs", default=",".join(RUN_KEYS),
                      help="Which of the main runs to train: " + ", ".join(RUN_KEYS) + ".")
  parser.add_argument("--report_only", action="store_true",
                      help="Tabulate the finished runs; train nothing.")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  unknown = sorted(set(args.runs.split(",")) - set(RUN_KEYS))
  if unknown:
    parser.error(f"--runs: unknown {', '.join(unknown)}; known: {', '.join(RUN_KEYS)}.")
  main_runs = {RUN_KEYS[key]: MAIN_RUNS[RUN_KEYS[key]] for key in args.runs.split(",")}
  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)

  table = {}
  if args.only in ("main", "all"):
    for seed in seeds:  # Seed-major, so a partial benchmark has every method at the first seeds.
      for name, config_args in main_runs.items():
        table.setdefault(name, []).append(train(out, name, config_args, seed, args))
  # Main runs' lists are in seed order, unfinished runs still None: pair them before dropping those.
  gains = {name: paired_gains(table[name], table.get("supervised", []))
           for name in main_runs if name != "supervised" and name in table}
  if args.only in ("reference", "all"):
    for name, config_args in REFERENCE_RUNS.items():
      table[name] = [train(out, name, config_args, seeds[0], args)]
  if args.only in ("ablations", "all"):
    base = MAIN_RUNS["pseudoseg (unlabeled)"]
    for name, fields in ABLATIONS.items():
      table[name] = [train(out, name, base, seeds[0], args, fields)]

  table = {name: [r for r in runs if r is not None] for name, runs in table.items()}
  table = {name: runs for name, runs in table.items() if runs}
  lines = [f"{args.config}, {args.num_labeled} labeled images, {args.steps} steps; val mIoU (%), "
           "mean ± std over seeds (runs); pseudo-label accuracy is class-balanced, against the "
           "unlabeled images' hidden masks", "",
           "| run | seeds | val mIoU | gain over supervised | accuracy of: pseudo labels | decoder | "
           "SGC | minutes per run |",
           "|---|---|---|---|---|---|---|---|"]
  for name, runs in table.items():
    cells = [name, str(len(runs)), summarize([r["val/miou"] for r in runs]),
             summarize(gains[name]) if gains.get(name) else "-"]
    for key in PSEUDO_METRICS:
      values = [r[key] for r in runs if r.get(key) is not None]
      cells.append(summarize(values) if values else "-")
    minutes = [r["wall_clock_minutes"] for r in runs if r.get("wall_clock_minutes")]
    cells.append(f"{statistics.mean(minutes):.1f}" if minutes else "-")
    lines.append("| " + " | ".join(cells) + " |")
  text = "\n".join(lines)
  print(text)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({name: [{k: r.get(k) for k in ("step", "val/miou", *PSEUDO_METRICS,
                                             "wall_clock_minutes")} for r in runs]
               for name, runs in table.items()}, f, indent=2)


if __name__ == "__main__":
  main()
