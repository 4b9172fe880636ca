"""Security: no user-supplied file is unpickled or read beyond itself, and outputs stay in their
folders. Each test fails if a hole reopens; none needs a trained model (about 10 s in all)."""

import io
import os
import pathlib
import pickle
import re
import tarfile
import types
import zipfile

import h5py
import ml_collections
import numpy as np
import pytest
import scipy.io
from PIL import Image

from pseudoseg_jax import convert, evaluate, predict
from pseudoseg_jax.convert import __main__ as convert_cli
from pseudoseg_jax.convert import keras_resnet
from pseudoseg_jax.data.datasets import label_files, subsets, voc

ROOT = pathlib.Path(__file__).resolve().parents[1]
PICKLE_REFUSED = "Pickled contents are never loaded"


class Payload:
  """Unpickling it creates `marker`: the proof that a loader ran a file's code."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return open, (self.marker, "w")


def tree(folder):
  """Every entry under `folder`, links listed but never followed."""
  return sorted(os.path.relpath(os.path.join(parent, name), folder)
                for parent, folders, files in os.walk(folder) for name in folders + files)


# ---------------------------------------------------------------- weights
def test_npz_with_object_array_is_refused_naming_the_file(tmp_path):
  marker, path = tmp_path / "ran", tmp_path / "weights.npz"
  np.savez(path, conv1=np.array([Payload(marker)], dtype=object))
  with pytest.raises(ValueError, match=re.escape(str(path))) as error:
    convert.read_weights(str(path), None)
  assert PICKLE_REFUSED in str(error.value) and "'conv1'" in str(error.value)
  assert not marker.exists()


def test_a_pickle_named_npz_is_refused_and_never_run(tmp_path):
  marker, path = tmp_path / "ran", tmp_path / "weights.npz"
  path.write_bytes(pickle.dumps({"conv1/kernel": Payload(marker)}))
  with pytest.raises(ValueError, match=PICKLE_REFUSED):
    convert.read_weights(str(path), None)
  assert not marker.exists()


def test_npz_of_strings_or_a_bare_npy_is_refused(tmp_path):
  np.savez(tmp_path / "text.npz", name=np.array(["a", "b"]))
  with pytest.raises(ValueError, match="not numbers"):
    convert.read_npz(str(tmp_path / "text.npz"))
  with open(tmp_path / "bare.npz", "wb") as f:
    np.save(f, np.zeros(3))
  with pytest.raises(ValueError, match="single .npy array"):
    convert.read_npz(str(tmp_path / "bare.npz"))


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_pth_whose_pickle_runs_code_is_refused_and_never_run(tmp_path, layout):
  """Needs no torch: torch.save's zip layout (or a bare pickle, the legacy path) whose pickle
  would call open() when unpickled."""
  marker, path = tmp_path / "ran", tmp_path / "weights.pth"
  pickled = pickle.dumps({"state_dict": {"evil": Payload(marker)}}, protocol=2)
  if layout == "zip":
    with zipfile.ZipFile(path, "w") as archive:
      archive.writestr("archive/data.pkl", pickled)
  else:
    path.write_bytes(pickled)
  refused = f"Refusing {path}: it names the global '{open.__module__}.open'"
  with pytest.raises(ValueError, match=re.escape(refused)):
    convert.read_weights(str(path), types.SimpleNamespace(backbone="resnet50"))
  assert not marker.exists()


def h5_with_foreign_data(path, secret, how):
  """A Keras weights file whose one tensor is read from elsewhere, as HDF5 allows."""
  with h5py.File(path, "w") as h5:
    if how == "legacy layout, external storage":
      h5.attrs["layer_names"] = [b"conv1_conv"]
      layer = h5.create_group("conv1_conv")
      layer.attrs["weight_names"] = [b"conv1_conv/kernel:0"]
      layer.create_dataset("conv1_conv/kernel:0", shape=(8,), dtype="<f8",
                           external=[(str(secret), 0, 64)])
      return
    variables = h5.create_group("layers/conv2d/vars")
    variables.attrs["name"] = "conv1_conv"
    if how == "external storage":
      variables.create_dataset("0", shape=(8,), dtype="<f8", external=[(str(secret), 0, 64)])
    elif how == "external link":
      with h5py.File(path.with_suffix(".other.h5"), "w") as other:
        other["kernel"] = np.ones(8)
      variables["0"] = h5py.ExternalLink(str(path.with_suffix(".other.h5")), "/kernel")
    else:
      variables.create_dataset("0", data=np.array([b"not", b"numbers"]))


@pytest.mark.parametrize("how", ["external storage", "external link", "strings",
                                 "legacy layout, external storage"])
def test_keras_files_may_not_pull_data_from_other_files(tmp_path, how):
  secret = tmp_path / "secret.bin"
  secret.write_bytes(b"password" * 8)
  path = tmp_path / "weights.weights.h5"
  h5_with_foreign_data(path, secret, how)
  with pytest.raises(ValueError, match="Refusing .*weights.weights.h5"):
    keras_resnet.read_keras_layers(str(path))


def test_keras_archive_is_read_in_memory_never_extracted(tmp_path):
  inner = io.BytesIO()
  with h5py.File(inner, "w") as h5:
    variables = h5.create_group("layers/conv2d/vars")
    variables.attrs["name"] = "conv1_conv"
    variables["0"] = np.ones((7, 7, 3, 64), np.float32)
  archive = tmp_path / "sub" / "model.keras"
  archive.parent.mkdir()
  with zipfile.ZipFile(archive, "w") as zipped:
    zipped.writestr("model.weights.h5", inner.getvalue())
    zipped.writestr("../escaped.txt", "zip slip")
    zipped.writestr("/tmp/absolute.txt", "zip slip")
  before = tree(tmp_path)
  assert keras_resnet.read_keras_layers(str(archive))["conv1_conv"]["kernel"].shape == (7, 7, 3, 64)
  assert tree(tmp_path) == before


def test_the_package_never_loads_unsafely():
  """A cheap guard over every source file: no unpickling, shell, eval or model-code loading."""
  forbidden = re.compile(r"pickle\.load|allow_pickle\s*=\s*True|weights_only\s*=\s*False|"
                         r"yaml\.(unsafe_)?load\(|shell\s*=\s*True|marshal\.loads?\(|shelve\.|"
                         r"\bdill\b|cloudpickle|load_model\(|extractall\(|os\.system\(|"
                         r"(?<![\w.])(eval|exec)\(")
  sources = [path for folder in ("pseudoseg_jax", "scripts", "configs")
             for path in sorted((ROOT / folder).rglob("*.py"))]
  assert len(sources) > 20
  found = []
  for path in sources:
    text = path.read_text()
    found += [f"{path.relative_to(ROOT)}: {match[0]}" for match in forbidden.finditer(text)]
    found += [f"{path.relative_to(ROOT)}: torch.load({args})"
              for args in re.findall(r"torch\.load\(([^)]*)\)", text)
              if "weights_only=True" not in args]
    found += [f"{path.relative_to(ROOT)}: np.load({args})"
              for args in re.findall(r"np\.load\(([^)]*)\)", text)
              if "allow_pickle=False" not in args]
  assert not found


# ---------------------------------------------------------------- datasets
def add_member(archive, name, data=b"x", **fields):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  for key, value in fields.items():
    setattr(info, key, value)
  archive.addfile(info, io.BytesIO(data) if info.isfile() else None)


def test_archive_extraction_stays_inside_its_folder(tmp_path):
  """The VOC and SBD archives go through TFDS's extractor: it must skip '..', absolute paths and
  links. Pins the installed tensorflow_datasets to that behaviour."""
  from tensorflow_datasets.core.download import extractor, resource
  outside = tmp_path / "outside.txt"
  outside.write_text("keep me")
  with tarfile.open(tmp_path / "benchmark.tgz", "w:gz") as archive:
    add_member(archive, "ok/file.txt")
    add_member(archive, "../escape.txt")
    add_member(archive, "ok/../../escape2.txt")
    add_member(archive, str(tmp_path / "absolute.txt"))
    add_member(archive, "ok/link", type=tarfile.SYMTYPE, linkname=str(outside), size=0)
    add_member(archive, "ok/up", type=tarfile.SYMTYPE, linkname="../..", size=0)
    add_member(archive, "ok/up/through.txt")
    add_member(archive, "ok/outside.txt", b"overwritten")
    add_member(archive, "ok/hard", type=tarfile.LNKTYPE, linkname=str(outside), size=0)
  with zipfile.ZipFile(tmp_path / "SegmentationClassAug.zip", "w") as zipped:
    zipped.writestr("ok/zipped.txt", "x")
    zipped.writestr("../zip_escape.txt", "x")
    zipped.writestr(str(tmp_path / "zip_absolute.txt"), "x")
  unpack = extractor.get_extractor()
  with unpack.tqdm():
    for name, method in (("benchmark.tgz", resource.ExtractMethod.TAR_GZ),
                         ("SegmentationClassAug.zip", resource.ExtractMethod.ZIP)):
      unpack.extract(tmp_path / name, method, tmp_path / "extracted" / name).get()
  outside_entries = [name for name in tree(tmp_path) if not name.startswith("extracted")]
  assert outside_entries == ["SegmentationClassAug.zip", "benchmark.tgz", "outside.txt"]
  assert outside.read_text() == "keep me"
  extracted = [tmp_path / "extracted" / name for name in tree(tmp_path / "extracted")]
  assert not any(path.is_symlink() for path in extracted)
  assert all(path.resolve().is_relative_to(tmp_path / "extracted") for path in extracted)


def test_split_list_lines_cannot_point_outside_the_dataset(tmp_path):
  (tmp_path / "train.txt").write_text("../../etc/passwd\n/abs/JPEGImages/x.jpg y.png\n")
  ids = subsets.read_id_list(str(tmp_path / "train.txt"))
  assert ids == ["passwd", "x"]
  files = voc.VocFiles(voc_root=str(tmp_path / "VOC2012"), aug_mask_dir=str(tmp_path / "aug"))
  with pytest.raises(label_files.BadExampleError) as error:
    voc.example_files(ids[0], files)
  assert str(tmp_path / "VOC2012" / "JPEGImages" / "passwd.jpg") in str(error.value)


def test_sbd_mat_without_plain_class_indices_is_refused(tmp_path):
  path = tmp_path / "cell.mat"
  cells = np.empty((2,), dtype=object)
  cells[0], cells[1] = np.zeros((2, 2)), "text"
  scipy.io.savemat(path, {"GTcls": {"Segmentation": cells}})
  with pytest.raises(label_files.BadExampleError, match="cell.mat"):
    voc.read_sbd_mask(str(path))
  scipy.io.savemat(path, {"GTcls": {"Segmentation": np.full((2, 2), 300, np.int32)}})
  with pytest.raises(label_files.BadExampleError, match="outside 0-255"):
    voc.read_sbd_mask(str(path))


def test_decompression_bombs_are_bad_examples_naming_the_file(tmp_path, monkeypatch):
  """A few bytes of PNG can declare billions of pixels; PIL refuses them with an error that is no
  OSError, which must still become a BadExampleError (skippable, naming the file)."""
  (tmp_path / "bomb.png").write_bytes(png_bytes(np.zeros((10, 10, 3), np.uint8)))
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # 100 pixels: over twice the limit.
  for read in (label_files.read_image_size, label_files.read_index_mask):
    with pytest.raises(label_files.BadExampleError, match="bomb.png"):
      read(str(tmp_path / "bomb.png"))


# ---------------------------------------------------------------- outputs
@pytest.mark.parametrize("split", ["../../etc/x", "/tmp/x", "..", ".hidden", "a/b", "val\n", ""])
def test_evaluate_refuses_a_path_as_split_before_any_work(tmp_path, split):
  if not split:  # Empty: the config's eval split. Not refused; the missing workdir is.
    with pytest.raises(FileNotFoundError):
      evaluate.run(str(tmp_path / "missing"), split=split)
    return
  with pytest.raises(ValueError, match=re.escape(f"--split={split!r} is not a split name")):
    evaluate.run(str(tmp_path / "missing"), split=split)
  with pytest.raises(ValueError, match="not a split name"):
    evaluate.results_path(str(tmp_path), split)
  assert evaluate.results_path("W", "train_aug") == os.path.join("W", "eval_train_aug.json")


def fake_model(num_classes=3, crop=33):
  config = ml_collections.ConfigDict({"data": {"num_classes": num_classes},
                                      "eval_crop_size": crop})
  return types.SimpleNamespace(config=config, class_names=("a", "b", "c"), step=7,
                               checkpoint="ckpt")


def fake_scores(windows):
  """Class 1 where the red channel is bright, else 0: a mask without a model."""
  return np.eye(3, dtype=np.float32)[(windows[..., 0] > 0).astype(int)]


fake_scores.batch_size = 4


def png_bytes(pixels):
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="PNG")
  return buffer.getvalue()


def test_predict_writes_only_inside_the_output_folder(tmp_path):
  inputs, output, outside = tmp_path / "in", tmp_path / "out", tmp_path / "outside"
  inputs.mkdir(), output.mkdir(), outside.mkdir()
  hostile = ["..\\..\\evil.png", "a\nb.png", "-rf *.png", "..png", "x" * 250 + ".png",
             "ünï.png", "same.png"]
  pixels = np.zeros((9, 11, 3), np.uint8)
  pixels[:4] = 255
  for name in hostile:
    with open(inputs / name, "wb") as f:
      f.write(png_bytes(pixels))
  (outside / "file.txt").write_text("keep me")
  os.symlink(outside / "file.txt", output / "same.png")  # Traps: writing through any would
  os.symlink(outside, output / "same.json")  # leave the folder.
  os.symlink(outside / "created.jpg", output / "same_overlay.jpg")
  before = tree(tmp_path)

  # A folder skips dot files: name those explicitly.
  paths = predict.expand_inputs([str(inputs)] + [str(inputs / name) for name in hostile
                                                 if name.startswith(".")])
  report = predict.predict_files(fake_model(), fake_scores, paths, str(output))

  assert len(report.written) == len(hostile) and not report.failed
  assert all(len(stem) <= predict.MAX_STEM_LENGTH and "/" not in stem
             for _, stem in report.written)
  created = sorted(set(tree(tmp_path)) - set(before))
  assert created and all(name.startswith("out" + os.sep) for name in created)
  assert tree(outside) == ["file.txt"] and (outside / "file.txt").read_text() == "keep me"
  assert not any(os.path.islink(output / name) for name in os.listdir(output))
  assert not any(name.startswith(".tmp-") for name in os.listdir(output))
  for name in ("../x.png", str(outside / "x.png"), "sub/x.png"):
    with pytest.raises(ValueError, match="outside"):
      predict.write_atomically(str(output), name, lambda f: f.write(b"x"))
  assert tree(outside) == ["file.txt"]


def test_converted_weights_never_overwrite_or_write_through_links(tmp_path):
  weights = {"conv1/kernel": np.ones((3, 3), np.float32)}
  target = tmp_path / "target.txt"
  target.write_text("keep me")
  existing = tmp_path / "existing.npz"
  existing.write_bytes(b"old")
  with pytest.raises(FileExistsError):
    convert.save_npz(str(existing), weights, overwrite=False)
  assert existing.read_bytes() == b"old"
  dangling = tmp_path / "dangling.npz"
  os.symlink(tmp_path / "created.txt", dangling)
  with pytest.raises(ValueError, match="exists; pass --overwrite"):
    convert_cli.convert_file(None, "unused.npz", str(dangling))  # Checked before any reading.
  with pytest.raises(FileExistsError):
    convert.save_npz(str(dangling), weights, overwrite=False)
  assert not (tmp_path / "created.txt").exists()
  # The old fixed temporary name, and the destination, as links: replaced, never written through.
  linked = tmp_path / "linked.npz"
  os.symlink(target, str(linked) + ".tmp.npz")
  os.symlink(target, linked)
  convert.save_npz(str(linked), weights, overwrite=True)
  assert target.read_text() == "keep me" and not linked.is_symlink()
  assert convert.read_npz(str(linked))["conv1/kernel"].shape == (3, 3)
  assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]
  (tmp_path / "folder.npz").mkdir()
  with pytest.raises(ValueError, match="is a folder"):
    convert_cli.convert_file(None, "unused.npz", str(tmp_path / "folder.npz"), overwrite=True)
