"""gs:// paths, against a GCS emulator (gcp-storage-emulator) that this module starts on
127.0.0.1: the path layer, a training run with a gs:// workdir interrupted and resumed to the
results of an uninterrupted one, evaluate and predict reading that run.

What talks to the emulator: the project's own files (paths.py, through etils.epath's fsspec
backend, i.e. gcsfs, which STORAGE_EMULATOR_HOST redirects), orbax's folders and metadata (etils.epath
too) and its arrays (tensorstore, redirected by TENSORSTORE_GCS_HTTP_URL).
What cannot: TensorFlow's own GCS file system (tf.io.gfile, tf.summary, tf.data, TFDS) has its
endpoint, https://www.googleapis.com/storage/v1/, compiled in, with no setting to change it. So
here epath is told to use gcsfs rather than tf.io.gfile (its choice whenever TensorFlow is
installed), and the TensorBoard logdir of a gs:// workdir is redirected to a local folder. The
dataset stays local. On a real bucket those TensorFlow paths are TensorFlow's long-used GCS client.
"""

import io
import json
import logging
import os
import socket

import gcp_storage_emulator.server
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import test_train
from configs import demo
from pseudoseg_jax import convert, evaluate, paths, predict, train, workdirs, writers
from test_evaluate import OVERRIDES as EVALUATE_OVERRIDES

BUCKET = "pseudoseg-test"
# test_evaluate.py's tiny supervised run, 4 steps with a checkpoint every 2 and every step logged.
OVERRIDES = {**EVALUATE_OVERRIDES, "total_steps": 4, "eval_every": 4, "checkpoint_every": 2}
INTERRUPTED_AFTER_LOGGING_STEP = 3  # After checkpoint 2: the resume repeats step 3.


def free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    return probe.getsockname()[1]


def downloads_with_generation(patch):
  """The emulator leaves out a download's x-goog-generation header, which GCS sends and which
  tensorstore's OCDBT (orbax's format) reads to version its manifest: added here."""
  from gcp_storage_emulator.handlers import objects
  without_generation = objects.download

  def download(request, response, storage, *args, **kwargs):
    without_generation(request, response, storage, *args, **kwargs)
    if response.status.value < 300:
      response["x-goog-generation"] = storage.get_file_obj(
          request.params["bucket_name"], request.params["object_id"])["generation"]

  patch.setattr(objects, "download", download)  # objects.get(alt=media) calls it too.
  for _, handlers in gcp_storage_emulator.server.HANDLERS:
    if handlers.get("GET") is without_generation:
      patch.setitem(handlers, "GET", download)


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """gs://BUCKET on an emulator, for this module; yields a function naming a fresh gs:// path."""
  from etils.epath import gpath
  local_summaries = tmp_path_factory.mktemp("tensorboard_of_gs_workdirs")
  create_file_writer = tf.summary.create_file_writer

  def summaries_kept_local(logdir, *args, **kwargs):
    if paths.is_remote(logdir):
      logdir = str(local_summaries / logdir.replace("://", "/"))
    return create_file_writer(logdir, *args, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    downloads_with_generation(patch)
    port = free_port()
    server = gcp_storage_emulator.server.create_server("127.0.0.1", port, in_memory=True,
                                                default_bucket=BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    patch.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs (and google-cloud-storage).
    patch.setenv("TENSORSTORE_GCS_HTTP_URL", url)  # orbax's arrays.
    patch.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")  # tensorstore: no credentials.
    patch.setattr(gpath, "_is_tf_installed", lambda: False)  # epath: gcsfs, not tf.io.gfile.
    patch.setattr(tf.summary, "create_file_writer", summaries_kept_local)
    # Quiet: gcsfs on every new file system (no bucket type from the emulator), google.auth (no
    # credentials, none needed), the emulator on every probe for a missing object.
    for name in ("gcsfs", "google.auth", "gcp_storage_emulator"):
      patch.setattr(logging.getLogger(name), "level", logging.CRITICAL)
    names = iter(range(1_000_000))
    try:
      yield lambda name: f"gs://{BUCKET}/{name}-{next(names)}"
    finally:
      server.stop()


# ---------------------------------------------------------------- the path layer
def test_path_layer_reads_and_writes_objects(gcs):
  folder = gcs("layer")
  paths.makedirs(folder)
  paths.replace_file(f"{folder}/a.json", lambda f: json.dump({"x": 1}, f))
  paths.replace_file(f"{folder}/b.png", lambda f: f.write(b"\x89PNG"), binary=True)
  paths.replace_file(f"{folder}/a.json", lambda f: json.dump({"x": 2}, f))  # Replaced whole.
  assert json.loads(paths.read_text(f"{folder}/a.json")) == {"x": 2}
  assert paths.read_bytes(f"{folder}/b.png") == b"\x89PNG"
  paths.append_text(f"{folder}/log.txt", "one\n")
  paths.append_text(f"{folder}/log.txt", "two\n")
  assert paths.read_text(f"{folder}/log.txt") == "one\ntwo\n"
  assert sorted(paths.listdir(folder)) == ["a.json", "b.png", "log.txt"]
  assert paths.glob(f"{folder}/*.png") == [f"{folder}/b.png"]
  assert paths.isdir(folder) and paths.isfile(f"{folder}/a.json")
  assert not paths.exists(f"{folder}/missing") and not paths.isdir(f"{folder}/a.json")
  assert paths.absolute(folder + "/") == folder


def test_metrics_repair_on_gcs(gcs):
  """truncate_metrics cuts a resumed run's later lines and a torn last line on a bucket too."""
  workdir = gcs("metrics")
  writer = writers.MetricWriter(workdir)
  for step in (1, 2, 3):
    writer.write(step, {"train/loss": float(step)})
  writer.close()
  path = f"{workdir}/{writers.METRICS_FILE}"
  paths.replace_file(path, lambda f: f.write(paths.read_text(path) + '{"step": 4, "tr'))
  assert [r["step"] for r in writers.read_metrics(workdir)] == [1, 2, 3]
  writers.truncate_metrics(workdir, last_step=2)
  assert [r["step"] for r in writers.read_metrics(workdir)] == [1, 2]
  assert paths.read_text(path).endswith("\n")


def test_init_from_reads_weights_from_gcs(gcs, tmp_path):
  weights = {"stem/conv/kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}
  convert.save_npz(str(tmp_path / "w.npz"), weights)
  url = f"{gcs('weights')}/w.npz"
  paths.replace_file(url, lambda f: f.write((tmp_path / "w.npz").read_bytes()), binary=True)
  model_config = demo.get_config().model
  model_config.init_from = url
  read = train.read_init_weights(model_config)
  assert read.keys() == weights.keys()
  np.testing.assert_array_equal(read["stem/conv/kernel"], weights["stem/conv/kernel"])


# ---------------------------------------------------------------- a run on gs://
def tiny_config(data_dir):
  return test_train.tiny_config(data_dir, method="supervised", **OVERRIDES)


class Interrupted(Exception):
  """Stands for the kill: raised once metrics.jsonl has a line past the last checkpoint."""


@pytest.fixture(scope="module")
def runs(gcs, tmp_path_factory):
  """(uninterrupted local workdir, interrupted-then-resumed gs:// workdir, local data_dir)."""
  data_dir = tmp_path_factory.mktemp("tfds")
  local = str(tmp_path_factory.mktemp("run"))
  train.run(tiny_config(data_dir), local)

  workdir = gcs("run")
  write = writers.MetricWriter.write

  def write_then_die(self, step, metrics):
    write(self, step, metrics)
    if step == INTERRUPTED_AFTER_LOGGING_STEP:
      raise Interrupted

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(writers.MetricWriter, "write", write_then_die)
    with pytest.raises(Interrupted):
      train.run(tiny_config(data_dir), workdir)
  assert not paths.exists(f"{workdir}/{workdirs.RESULTS_FILE}")
  assert [r["step"] for r in writers.read_metrics(workdir)] == [1, 2, 3]
  train.run(tiny_config(data_dir), workdir)
  return local, workdir, data_dir


def read_json(path):
  return json.loads(paths.read_text(path))


def test_a_gcs_workdir_resumes_to_the_results_of_an_uninterrupted_run(runs):
  local, workdir, _ = runs
  assert read_json(f"{workdir}/{workdirs.RESULTS_FILE}") == read_json(
      os.path.join(local, workdirs.RESULTS_FILE))
  # metrics.jsonl was cut back to the checkpoint: each step once, as in the uninterrupted run.
  steps = [r["step"] for r in writers.read_metrics(workdir) if "train/loss" in r]
  assert steps == [1, 2, 3, 4]
  assert paths.read_bytes(f"{workdir}/{workdirs.LEARNING_CURVES_FILE}").startswith(b"\x89PNG")
  assert read_json(f"{workdir}/{workdirs.CONFIG_FILE}")["total_steps"] == OVERRIDES["total_steps"]
  assert sorted(paths.listdir(f"{workdir}/checkpoints")) == ["2", "4"]


def test_evaluate_and_predict_read_a_gcs_run(runs, gcs):
  local, workdir, _ = runs
  evaluated = evaluate.run(workdir)
  assert evaluated["miou"] == read_json(f"{workdir}/{workdirs.RESULTS_FILE}")["val/miou"]
  assert read_json(f"{workdir}/eval_validation.json") == evaluated
  assert evaluated["checkpoint"] == f"{workdir}/checkpoints/4"

  inputs, output = gcs("photos"), gcs("predictions")
  image = np.random.default_rng(0).integers(0, 256, (40, 50, 3), np.uint8)
  for name in ("a.png", "b.jpg"):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG" if name.endswith("png") else "JPEG")
    paths.replace_file(f"{inputs}/{name}", lambda f, data=buffer.getvalue(): f.write(data),
                       binary=True)
  report = predict.run(workdir, [inputs], output)
  assert [stem for _, stem in report.written] == ["a", "b"] and not report.failed
  assert sorted(paths.listdir(output)) == ["a.json", "a.png", "a_overlay.jpg", "b.json", "b.png",
                                           "b_overlay.jpg"]
  # The same masks as from the local run's checkpoint (the same weights).
  local_output = os.path.join(local, "predictions")
  predict.run(local, [f"{inputs}/a.png"], local_output)
  with open(os.path.join(local_output, "a.png"), "rb") as f:
    assert paths.read_bytes(f"{output}/a.png") == f.read()
  assert read_json(f"{output}/a.json")["image"] == f"{inputs}/a.png"
  assert predict.expand_inputs([f"{inputs}/*.jpg"]) == [f"{inputs}/b.jpg"]
