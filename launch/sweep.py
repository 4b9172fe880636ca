"""Expand a sweep into training runs, one workdir each; run them one after another, or hand them to
a launcher, or print them.

  python launch/sweep.py --sweep=voc_classic --workdir_root=/shared/workdirs/voc_pseudoseg \
      [--seeds=0,1,2] [--launcher="sbatch launch/slurm.sbatch"] [--dry_run] \
      [-- --config.data.manual_dir=/shared/voc_manual ...]
  python launch/sweep.py --config=configs/demo.py --arg=method=supervised,pseudoseg \
      --set=seed=0,1 --workdir_root=workdirs/demo_sweep --dry_run

A sweep is a config file and the product of its axes: `--arg=NAME=V1,V2` varies an argument of the
config file (`configs/NAME.py:NAME=V1`), `--set=FIELD=V1,V2` a config field (`--config.FIELD=V1`).
Named sweeps (--sweep, see SWEEPS) hold the papers' protocols. Each run gets
WORKDIR_ROOT/NAME-V1_FIELD-V1 and the ordinary command
`python -m pseudoseg_jax.main --config=... --workdir=...` plus the arguments after `--`.
By default the runs go one after another on this machine; a run already finished only reports its
results, an interrupted one resumes, so rerunning the sweep completes it. A run that fails is
reported and the sweep goes on; one stopped by SIGTERM/SIGINT (exit 143/130) stops the sweep.
--launcher replaces `python -m pseudoseg_jax.main` by another command that takes the same
arguments: `sbatch launch/slurm.sbatch` submits each run as a SLURM job,
`python launch/tpu_pod.py --tpu=NAME --zone=ZONE --` runs each on a TPU pod.
--dry_run prints the commands, one per line, and runs nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import re
import shlex
import subprocess
import sys

from pseudoseg_jax import recipes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_COMMAND = (sys.executable, "-m", "pseudoseg_jax.main")
SEEDS = ("0", "1", "2")
PREEMPTED_EXIT_CODES = (130, 143)  # 128 + SIGINT, 128 + SIGTERM: see pseudoseg_jax/preemption.py


@dataclasses.dataclass(frozen=True)
class Sweep:
  config: str
  args: tuple = ()  # ((config-file argument, values), ...): configs/X.py:NAME=VALUE
  fields: tuple = ()  # ((config field, values), ...): --config.FIELD=VALUE


# The papers' protocols, over config.seed (--seeds). VOC classic: PseudoSeg's Table 1 (N of the
# 1,464 finely labeled images); blended: the later peers' fractions of train_aug; COCO: Table 2.
SWEEPS = {
    "voc_classic": Sweep("configs/voc_pseudoseg.py", (("split", recipes.VOC_CLASSIC_SPLITS),)),
    "voc_blended": Sweep("configs/voc_pseudoseg.py", (("split", recipes.VOC_BLENDED_SPLITS),)),
    "voc_classic_supervised": Sweep("configs/voc_supervised.py",
                                    (("split", recipes.VOC_CLASSIC_SPLITS),)),
    "coco": Sweep("configs/coco_pseudoseg.py", (("split", recipes.COCO_SPLITS),)),
}


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  config: str  # With its arguments: configs/X.py:A=1,B=2
  workdir: str
  overrides: tuple  # --config.FIELD=VALUE flags

  def command(self, launcher, extra_args) -> list:
    return [*launcher, f"--config={self.config}", f"--workdir={self.workdir}",
            *self.overrides, *extra_args]


def parse_axis(text: str, flag: str) -> tuple:
  """'NAME=V1,V2' -> ('NAME', ('V1', 'V2'))."""
  name, equals, values = text.partition("=")
  if not equals or not re.fullmatch(r"[A-Za-z_][\w.]*", name) or not values:
    raise SystemExit(f"{flag}={text!r} must be NAME=VALUE[,VALUE...].")
  return name, tuple(values.split(","))


def expand(sweep: Sweep, workdir_root: str) -> list:
  """Every combination of the axes, in order (the first axis varies slowest)."""
  axes = [("arg", name, values) for name, values in sweep.args]
  axes += [("field", name, values) for name, values in sweep.fields]
  runs = []
  for combination in itertools.product(*[values for _, _, values in axes]):
    chosen = [(kind, name, value) for (kind, name, _), value in zip(axes, combination)]
    config_args = ",".join(f"{name}={value}" for kind, name, value in chosen if kind == "arg")
    overrides = tuple(f"--config.{name}={value}" for kind, name, value in chosen
                      if kind == "field")
    name = "_".join(f"{name}-{value}" for _, name, value in chosen) or "run"
    name = re.sub(r"[^\w.=-]", "_", name)
    config = f"{sweep.config}:{config_args}" if config_args else sweep.config
    runs.append(Run(name, config, os.path.join(workdir_root, name), overrides))
  if len({run.workdir for run in runs}) != len(runs):
    raise SystemExit("Two runs of the sweep would share a workdir; make the values distinct.")
  return runs


def run_all(commands: list) -> int:
  """One after another. Returns the exit status: 0, the first preemption's code, or 1 when a run
  failed."""
  failed = []
  for index, command in enumerate(commands, start=1):
    print(f"[{index}/{len(commands)}] {shlex.join(command)}", flush=True)
    status = subprocess.run(command).returncode
    if status in PREEMPTED_EXIT_CODES:
      print(f"Stopped by a signal (exit {status}); rerun the sweep to resume.", flush=True)
      return status
    if status:
      failed.append((index, status))
      print(f"[{index}/{len(commands)}] failed with exit {status}; going on.", flush=True)
  if failed:
    print(f"{len(failed)} of {len(commands)} runs failed: "
          + ", ".join(f"#{index} (exit {status})" for index, status in failed), flush=True)
    return 1
  return 0


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--sweep", choices=sorted(SWEEPS), help="A named sweep.")
  parser.add_argument("--config", help="A config file, for a sweep given by --arg / --set.")
  parser.add_argument("--arg", action="append", default=[], metavar="NAME=V1,V2",
                      help="Vary an argument of the config file (repeatable).")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=V1,V2",
                      help="Vary a config field (repeatable).")
  parser.add_argument("--seeds", default=None,
                      help="config.seed values; default 0,1,2 for named sweeps.")
  parser.add_argument("--workdir_root", required=True)
  parser.add_argument("--launcher", default=None,
                      help="Command that replaces `python -m pseudoseg_jax.main`.")
  parser.add_argument("--dry_run", action="store_true", help="Print the commands only.")
  parser.add_argument("extra_args", nargs="*", help="After --: added to every run's command.")
  args = parser.parse_args(argv)
  if bool(args.sweep) == bool(args.config):
    parser.error("Give either --sweep or --config.")
  return args


def sweep_from_args(args) -> Sweep:
  base = SWEEPS[args.sweep] if args.sweep else Sweep(args.config)
  if args.sweep:  # The named sweeps' config files, as seen from here (the main CLI reads them).
    path = os.path.relpath(os.path.join(REPO, base.config))
    path = os.path.join(REPO, base.config) if path.startswith("..") else path
    base = dataclasses.replace(base, config=path)
  fields = list(base.fields) + [parse_axis(text, "--set") for text in args.set]
  seeds = args.seeds.split(",") if args.seeds else (SEEDS if args.sweep else ())
  if seeds and "seed" not in dict(fields):
    fields.append(("seed", tuple(seeds)))
  return Sweep(base.config, tuple(base.args) + tuple(parse_axis(text, "--arg")
                                                     for text in args.arg), tuple(fields))


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  runs = expand(sweep_from_args(args), args.workdir_root)
  launcher = shlex.split(args.launcher) if args.launcher else list(TRAIN_COMMAND)
  commands = [run.command(launcher, args.extra_args) for run in runs]
  if args.dry_run:
    for command in commands:
      print(shlex.join(command))
    return 0
  return run_all(commands)


if __name__ == "__main__":
  sys.exit(main())
