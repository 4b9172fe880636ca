"""Test-wide set-up: several CPU devices for sharding tests, TensorFlow kept off accelerators."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import shutil  # noqa: E402
import tempfile  # noqa: E402

# One persistent compilation cache for the test run, shared by pytest-xdist's workers and inherited
# by the training commands tests start: a program that several tests compile (the tiny demo's
# steps, above all) is compiled once. Set JAX_COMPILATION_CACHE_DIR to keep or place it yourself.
_RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
      tempfile.gettempdir(), f"pseudoseg_jax_test_compilation_cache_{_RUN_ID}")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# The tests' programs are tiny and each runs a few times, so compiling them fast matters more than
# running them fast: XLA:CPU's LLVM optimizations off (the tiny demo's train step: 42 s to compile
# optimized, 27 s at level 0; a whole CLI run 175 s -> 86 s), its older loop emitters instead of
# the MLIR fusion emitters (that step 26 s -> 13 s; a CLI run 80 s -> 63 s), and its code generated
# as one module rather than split for parallel compilation (the step 14 s -> 10.5 s; a CLI run's CPU
# time 62 s -> 53 s: with two workers on two cores there is no idle core to compile on). The HLO
# passes, hence what is computed, are the same; benchmarks/ and real runs keep XLA's defaults.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
                             " --xla_llvm_disable_expensive_passes=true"
                             " --xla_cpu_use_fusion_emitters=false"
                             " --xla_cpu_parallel_codegen_split_count=1").strip()

import jax  # noqa: E402

# Must happen before the first JAX computation; 4 devices let tests compare 1- vs 4-way sharding.
jax.config.update("jax_num_cpu_devices", 4)

import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], "GPU")

import pathlib  # noqa: E402

import pytest  # noqa: E402

# Small genuine samples (VOC, SBD format, COCO panoptic, split lists) committed under tests/data;
# tests/data/SOURCES.md says where each file comes from and under which licence.
SAMPLE_DATA_DIR = pathlib.Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def sample_data_dir() -> pathlib.Path:
  return SAMPLE_DATA_DIR


# The end-to-end modules: each starts training processes or compiles several PseudoSeg steps (1-5
# min of a 2-worker run each). They go first, so that pytest-xdist's two workers finish together;
# by default it orders files by their number of tests, which put these few-test files last and
# left one worker running them alone for minutes. test_train, the longest (one CLI run that is
# both the workdir-contract tests' run and the preemption test's reference, then three more
# launches that resume and one more in-process run), goes first.
END_TO_END_MODULES_FIRST = ("test_train.py", "test_multiprocess.py", "test_preemption.py",
                         "test_notebook.py", "test_evaluate.py", "test_pseudoseg_step.py",
                         "test_voc.py", "test_steps.py", "test_folder.py", "test_pipeline.py")


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below.
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  def rank(item):
    name = item.path.name
    return END_TO_END_MODULES_FIRST.index(name) if name in END_TO_END_MODULES_FIRST else len(
        END_TO_END_MODULES_FIRST)
  items.sort(key=rank)  # Stable: each module's own order, and the others', is kept.


def pytest_unconfigure(config):
  """The run's own cache goes with it (removed by the controller, after the workers finished)."""
  if _OWN_CACHE and "PYTEST_XDIST_WORKER" not in os.environ:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
