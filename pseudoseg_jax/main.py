"""Command-line entry point.

  python -m pseudoseg_jax.main --config=configs/demo.py[:ARGS] --workdir=DIR [--config.FIELD=VALUE]

Rerunning the same command on the same DIR resumes from its latest checkpoint. Several processes
(hosts) run the same command: detected on TPU pods and under srun, else named by
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (pseudoseg_jax/distributed.py).
"""

import os

# TensorFlow only feeds data here: keep it quiet and off the accelerators JAX uses.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from pseudoseg_jax import hugepages  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/demo.py:method=supervised.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.mark_flags_as_required(["config", "workdir"])
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-process jobs that are not detected (TPU pods and srun are): HOST:PORT where process 0 "
    "serves the coordinator, the same on every process.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "With --coordinator_address: this process, 0 to N-1.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from pseudoseg_jax import distributed
  try:
    job = distributed.plan(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as error:
    raise app.UsageError(str(error)) from error
  distributed.initialize(job)  # Before anything touches a JAX backend.
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  from pseudoseg_jax import train, workdirs  # Imported after flag parsing: --help stays fast.
  results = train.run(_CONFIG.value, _WORKDIR.value)
  print(f"val/miou = {results['val/miou']:.4f} at step {results['step']} "
        f"(results in {workdirs.results_path(_WORKDIR.value)})")


def run():
  # First: glibc reads its malloc tunables only at process start (pseudoseg_jax/hugepages.py).
  hugepages.reexec_with_hugepages()
  # Our progress goes to stdout through pseudoseg_jax.writers.log; absl's log (orbax, TFDS) would
  # bury it under per-file INFO lines.
  logging.set_verbosity(logging.WARNING)
  app.run(main)


if __name__ == "__main__":
  run()
