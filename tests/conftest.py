"""Test-wide set-up: several CPU devices for sharding tests, TensorFlow kept off accelerators, and
the test tiers.

Tiers. The everyday run: four tests in five, in 50-80 s on 2 cores (without -n 2: 90-120 s; the
whole suite: about 10 min):

  python -m pytest -q -m "not slow" -n 2 --dist loadfile tests

README command 2 and CI (.ci/run) name no marker and run everything. Every test has exactly one
kind, set here (pytest_collection_modifyitems, from OTHER_KINDS and SLOW; the test files name
none), registered in pytest.ini:
  unit          in-process tests of one piece, mostly known answers: every test of no other kind;
  end_to_end    trains (the CLI or train.run) and checks what the run leaves: workdir, resuming,
                evaluation;
  multiprocess  starts several training processes as one jax.distributed job on localhost;
  notebook      tests launch/colab.ipynb;
  benchmark     tests benchmarks/: the scripts at toy sizes, and the FLOP counts they rest on;
and `slow` on top for what the everyday run cannot afford: every end_to_end and multiprocess test,
the notebook run, the benchmark runs, and the unit tests that compile whole models or steps or
start processes (SLOW). Select with -m, e.g. -m "unit and not slow", -m end_to_end.
"""

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
                         "test_voc.py", "test_steps.py", "test_folder.py", "test_pipeline.py",
                         "test_paper_config.py")

# The tests of a kind other than unit, per module: "*" (all of them), a test's name (without its
# parameters), or a module fixture that the tests using it share (the fixture is what trains).
OTHER_KINDS = {
    "test_train.py": {"*": "end_to_end"},
    "test_evaluate.py": {"*": "end_to_end"},
    "test_preemption.py": {"data_dir": "end_to_end"},  # train.run up to a NaN step.
    "test_gcs.py": {"runs": "end_to_end"},
    "test_folder.py": {"test_two_pseudoseg_steps_through_the_cli": "end_to_end"},
    "test_voc.py": {"test_pseudoseg_trains_on_voc_with_image_level_labels": "end_to_end"},
    "test_paper_config.py": {"*": "end_to_end"},  # The paper's command, up to training's start.
    "test_multiprocess.py": {"runs": "multiprocess"},
    "test_notebook.py": {"*": "notebook"},
    "test_benchmarks.py": {"*": "benchmark"},
}

# Slow, besides every end_to_end and multiprocess test (selectors as in OTHER_KINDS): what a "not
# slow" run cannot afford in its 2 minutes on 2 cores, from a full run's --durations and a "not
# slow" run's (where the compilation cache is cold: a test that reuses another's compiled model in
# the full run compiles it itself), module fixtures counted with the tests that use them. Mostly
# inits and compiles of whole models or steps (2-40 s each at the tests' XLA flags) and commands
# run as processes (an import of JAX and TensorFlow each); the known-answer tests of the pieces
# (augment, pseudo_labels, losses, conv, pipeline, data sources, readers, checkpoints) stay.
SLOW = {
    "test_notebook.py": ("test_the_notebook_trains_the_demo_and_shows_its_pictures",),
    "test_benchmarks.py": ("test_train_step_benchmark_reports_the_step_against_the_peak",
                           "test_the_pseudoseg_step_gets_the_trainers_batch",
                           "test_input_pipeline_benchmark_reports_rates_and_the_wait"),
    "test_pseudoseg_step.py": ("model_state",
                               "test_pseudoseg_loss_does_not_depend_on_the_device_count"),
    "test_steps.py": ("setup",),
    "test_cpu_preset.py": ("test_a_pseudoseg_step_of_the_preset_trains_only_the_unfrozen_layers",),
    "test_confirmation_bias.py": (
        "remedies_step", "test_without_image_labels_the_classifier_names_what_to_claim"),
    "test_feature_perturbation.py": (
        "test_heads_of_the_backbone_features_are_the_model",
        "test_undropped_stream_on_the_strong_view_equals_the_consistency_loss",
        "test_stream_with_a_mean_teacher_learns_the_teachers_labels",
        "test_strong_mode_perturbs_only_the_strong_pass",
        "test_a_step_with_feature_perturbation_trains"),
    "test_mixed_precision.py": ("*",),
    "test_predict.py": ("workdir",),
    "test_convert.py": ("fresh",),
    "test_named_weights.py": ("xception_archive",),
    "test_normalization.py": ("test_model_feeds_its_backbone_the_converted_image",),
    "test_models.py": ("tiny_model", "resnet50_deep_stem_os8", "test_resnet50_os16_shapes_513"),
    "test_deeplab_heads.py": ("tiny_separable", "xception_heads",
                              "test_separable_heads_take_deeplabs_dense_and_logits_initializers",
                              "test_dense_heads_stay_the_default",
                              "test_separable_conv_is_depthwise_bn_relu_then_pointwise_bn_relu"),
    "test_xception.py": ("abstract_models",),
    "test_efficientnet_lite.py": ("imagenet_outputs", "test_feature_shapes_and_strides",
                                  "test_build_model_uses_its_own_bn_epsilon"),
    "test_ghost_batch_norm.py": ("train_passes", "test_jit_over_a_sharded_batch_equals_eager",
                                 "test_tiny_deeplab_rejects_a_batch_the_group_size_does_not_divide",
                                 "test_group_size_changes_no_parameter_or_statistic"),
    "test_convert_keras.py": ("resnet50_files", "keras_resnet50", "resnet50_weights",
                              "test_resnet101_with_top_drops_only_the_classifier",
                              "test_only_the_keras_variant_has_conv_biases",
                              "test_keras_variant_strides_the_first_1x1_and_dilates_like_"
                              "torchvision"),
    "test_convert_torch.py": ("test_round_trip_is_exact", "test_stem_mismatches_are_named",
                              "test_missing_unexpected_and_misshaped_tensors_are_named"),
    "test_augment_window.py": ("test_window_geometry_equals_the_whole_image_path",),
    "test_pipeline.py": ("test_a_stream_started_at_batch_k_equals_the_uninterrupted_stream_from_k",
                         "test_weak_and_strong_views_share_one_geometry",
                         "test_training_streams_are_a_function_of_the_seed",
                         "test_a_stream_seeks_the_same_without_a_known_cardinality",
                         "test_colour_jitter_changes_colours_but_not_where_pixels_go",
                         "test_unlabeled_stream_fills_missing_masks_with_the_ignore_label"),
    "test_coco.py": ("test_the_pipeline_takes_the_coco_voc_source",),
    "test_checkpointing.py": (
        "test_a_save_killed_midway_leaves_the_previous_checkpoints_and_saves_again",),
    "test_visuals.py": ("test_confusion_matrix_image_fits_the_class_count",),
}


def named(item, selectors) -> bool:
  """Whether `selectors` (of the test's module) take in this test: see OTHER_KINDS."""
  return ("*" in selectors or getattr(item, "originalname", item.name) in selectors
          or not set(selectors).isdisjoint(getattr(item, "fixturenames", ())))


def kind_of(item) -> str:
  """unit, or what OTHER_KINDS gives (a misspelt kind fails: pytest.ini has --strict-markers)."""
  table = OTHER_KINDS.get(item.path.name, {})
  return next((kind for selector, kind in table.items() if named(item, {selector})), "unit")


def is_slow(item, kind: str) -> bool:
  return kind in ("end_to_end", "multiprocess") or named(item, SLOW.get(item.path.name, ()))


def stale_selectors(module_name: str, module) -> list:
  """The names OTHER_KINDS and SLOW give for a module that it does not define: a test or fixture
  renamed or removed would otherwise silently move into the fast tier."""
  selectors = set(OTHER_KINDS.get(module_name, {})) | set(SLOW.get(module_name, ()))
  return sorted(s for s in selectors - {"*"} if not hasattr(module, s))


def rank(item) -> int:
  name = item.path.name
  return END_TO_END_MODULES_FIRST.index(name) if name in END_TO_END_MODULES_FIRST else len(
      END_TO_END_MODULES_FIRST)


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below.
    config.option.loadscopereorder = False


# tryfirst: the markers must be there before pytest's own hook deselects with -m.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
  modules = {item.path.name: item.module for item in items if hasattr(item, "module")}
  stale = {name: stale_selectors(name, module) for name, module in modules.items()}
  stale = {name: selectors for name, selectors in stale.items() if selectors}
  if stale:
    raise pytest.UsageError(f"tests/conftest.py's OTHER_KINDS or SLOW name what these modules no "
                            f"longer define (a renamed test or fixture?): {stale}")
  for item in items:
    kind = kind_of(item)
    item.add_marker(kind)
    if is_slow(item, kind):
      item.add_marker("slow")
  items.sort(key=rank)  # Stable: each module's own order, and the others', is kept.


def pytest_unconfigure(config):
  """The run's own cache goes with it (removed by the controller, after the workers finished)."""
  if _OWN_CACHE and "PYTEST_XDIST_WORKER" not in os.environ:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
