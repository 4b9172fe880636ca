"""Train on a Cloud TPU pod slice (TPU VMs): the same command on every worker, over gcloud ssh.

  python launch/tpu_pod.py --tpu=NAME --zone=ZONE [--project=P] --repo_url=URL [--ref=COMMIT] \
      [--setup] [--detach] [--env=KEY=VALUE ...] [--dry_run] -- \
      --config=configs/voc_pseudoseg.py:split=92 --workdir=gs://BUCKET/workdirs/voc_92 \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets [--config.FIELD=VALUE ...]

--setup (the first time, or after changing --ref) clones or updates the checkout to --ref (default:
this checkout's HEAD commit, so every worker runs the code you have; push it first) in --dir on
every worker and installs it with JAX for TPUs in DIR/.venv. Then every worker runs
`python -m pseudoseg_jax.main ARGS`; the processes find each other through the TPU metadata
(pseudoseg_jax/distributed.py), and each reads its own shard of the data.
The workdir and the data must be where every worker sees them at the same path: a gs:// bucket (read
and written directly; the TPU VM's service account needs access to it), Filestore NFS or a mounted
bucket. orbax writes each checkpoint from all workers, and process 0 writes the metrics. Without
--detach the output of all workers streams here and the run stops if this ssh session ends; --detach
runs it under nohup with each worker's output in DIR/logs/RUN.log. Rerunning the command resumes
from the last checkpoint (after a preemption too).
--dry_run prints the gcloud commands instead of running them.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = "~/pseudoseg-jax"


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tpu", required=True, help="TPU VM name (gcloud compute tpus tpu-vm).")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default=None, help="Default: gcloud's configured project.")
  parser.add_argument("--repo_url", default=None, help="Where workers clone from (--setup).")
  parser.add_argument("--ref", default=None, help="Commit, branch or tag; default: local HEAD.")
  parser.add_argument("--dir", default=DEFAULT_DIR, help="The checkout on each worker.")
  parser.add_argument("--setup", action="store_true",
                      help="Clone/update the checkout and install it before running.")
  parser.add_argument("--detach", action="store_true",
                      help="Run under nohup; output to DIR/logs/RUN.log on each worker.")
  parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                      help="Environment of the training processes (repeatable).")
  parser.add_argument("--dry_run", action="store_true", help="Print the commands only.")
  parser.add_argument("train_args", nargs="*",
                      help="After --: the arguments of python -m pseudoseg_jax.main.")
  args = parser.parse_args(argv)
  check_train_args(args.train_args)
  if args.setup and not args.repo_url:
    parser.error("--setup needs --repo_url (the workers clone the code from there).")
  for assignment in args.env:
    if "=" not in assignment or not assignment.split("=", 1)[0].isidentifier():
      parser.error(f"--env={assignment!r} is not KEY=VALUE.")
  return args


def check_train_args(train_args) -> None:
  """The same checks everywhere a launcher builds a training command."""
  named = {arg.split("=", 1)[0] for arg in train_args if arg.startswith("--")}
  missing = [flag for flag in ("--config", "--workdir") if flag not in named]
  if missing:
    raise SystemExit(f"The training command needs {' and '.join(missing)} (after --).")


def local_head() -> str:
  return subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], check=True,
                        capture_output=True, text=True).stdout.strip()


def gcloud_ssh(args, remote_command: str) -> list:
  """gcloud's ssh to every worker of the slice, all running `remote_command` at once."""
  command = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, f"--zone={args.zone}"]
  if args.project:
    command.append(f"--project={args.project}")
  return command + ["--worker=all", f"--command={remote_command}"]


def setup_command(repo_url: str, ref: str, checkout: str) -> str:
  """Clone or update to `ref`, then install the package and TPU JAX in CHECKOUT/.venv. A shell
  line run on each worker (the `~` of --dir expands there)."""
  directory = remote_path(checkout)
  return " && ".join([
      "set -e",
      f"if [ ! -d {directory}/.git ]; then git clone --quiet {shlex.quote(repo_url)} "
      f"{directory}; fi",
      f"cd {directory}",
      # FETCH_HEAD: a branch's latest commit, a tag, or a commit id alike.
      f"git fetch --quiet origin {shlex.quote(ref)}",
      "git checkout --quiet --detach FETCH_HEAD",
      # TPU VM images may lack the venv module.
      "(python3 -m venv .venv || (sudo apt-get -qq update && sudo apt-get -qq install -y "
      "python3-venv && python3 -m venv .venv))",
      ".venv/bin/pip install --quiet -U pip",
      # One resolve: TPU JAX within the package's own JAX bounds.
      ".venv/bin/pip install --quiet -U -e . 'jax[tpu]'",
  ])


def run_command(train_args, checkout: str, env_assignments, detach: bool) -> str:
  """The training command as each worker's shell runs it."""
  directory = remote_path(checkout)
  env = " ".join(shlex.quote(assignment) for assignment in env_assignments)
  train = " ".join(["python", "-m", "pseudoseg_jax.main", *map(shlex.quote, train_args)])
  train = f"env {env} {train}" if env else train
  if not detach:
    return f"cd {directory} && . .venv/bin/activate && {train}"
  log = shlex.quote(f"logs/{run_name(train_args)}.log")
  return (f"cd {directory} && . .venv/bin/activate && mkdir -p logs && "
          f"nohup {train} > {log} 2>&1 < /dev/null &")


def remote_path(path: str) -> str:
  """Quoted for the remote shell, with a leading ~ left for it to expand."""
  if path == "~" or path.startswith("~/"):
    return "~" + (shlex.quote(path[1:]) if len(path) > 1 else "")
  return shlex.quote(path)


def run_name(train_args) -> str:
  workdir = next(arg.split("=", 1)[1] for arg in train_args if arg.startswith("--workdir="))
  return os.path.basename(os.path.normpath(workdir)) or "run"


def commands(args) -> list:
  """The gcloud commands, in order."""
  steps = []
  if args.setup:
    steps.append(gcloud_ssh(args, setup_command(args.repo_url, args.ref or local_head(),
                                                args.dir)))
  steps.append(gcloud_ssh(args, run_command(args.train_args, args.dir, args.env, args.detach)))
  return steps


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  for command in commands(args):
    print(shlex.join(command), flush=True)
    if not args.dry_run:
      completed = subprocess.run(command)
      if completed.returncode:
        return completed.returncode
  return 0


if __name__ == "__main__":
  sys.exit(main())
