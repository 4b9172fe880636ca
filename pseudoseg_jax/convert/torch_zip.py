"""PyTorch checkpoints (.pth / .pt / .bin) -> {name: numpy array}, without torch and without running
anything the file names.

A torch checkpoint is a pickle, and unpickling calls whatever the pickle names. Here find_class
hands out only what a state dict is made of (OrderedDict, the tensor and parameter rebuilders, the
typed storage classes), the torch ones as stand-ins that record where a tensor lies and build
nothing; any other global ('os.system', 'builtins.eval', a model class) stops the read before it is
called. The stand-ins, and what they return, are frozen and refuse __setstate__: a pickle's BUILD
can rewrite neither a shared stand-in nor a tensor's layout once checked. Tensors are cut out of
their storages with numpy, bounds checked first (as_strided would read past a storage on a crafted
size, stride or offset), and copied into contiguous, native-endian arrays. Each storage is read
once, however many tensors view it, and only if a kept tensor views it.

Both of torch.save's layouts are read:
  zip (torch >= 1.6)   ARCHIVE/data.pkl, one ARCHIVE/data/<key> per storage, ARCHIVE/byteorder
  legacy (< 1.6, or _use_new_zipfile_serialization=False)  five pickles in a row (magic number,
                       protocol, system info, the object, storage keys), then every storage as an
                       int64 element count and its bytes, little-endian as torch reads them.
                       Model-zoo files from before 2020 are often legacy (EfficientNet-Lite0's).

What comes back: the tensors of the (nested) dicts, names joined with '.' ({'a': {'b': t}} ->
'a.b'), after unwrapping a checkpoint that keeps its state dict under 'state_dict' or 'model'.
Everything else (epochs, numbers, strings, lists, optimizer settings) is dropped: only tensors are
weights. bfloat16 becomes float32 (exact; numpy has no bfloat16). A tensor pickled once under two
names (tied weights) comes back as one array under both.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import math
import mmap
import os
import pickle
import pickletools
import zipfile

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
ZIP_MAGIC = b"PK\x03\x04"  # A zip's first local file header.
WRAPPER_KEYS = ("state_dict", "model")
MAX_DEPTH = 32  # State dicts nest 1 to 3 dicts deep; deeper is a crafted file, not weights.
# The tensors on one storage may hold at most this many times its elements: tied and transposed
# copies pass, a few stored bytes expanded into gigabytes (stride 0) do not.
MAX_VIEW_RATIO = 2
MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
BFLOAT16 = "BFloat16Storage"
STORAGE_ELEMENTS = {  # torch's typed storage -> its element, little-endian.
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2", BFLOAT16: "<u2",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "<i1",
    "ByteStorage": "<u1", "BoolStorage": "<b1"}


class CheckpointError(ValueError):
  """A file this module will not read, with the reason in words."""


def refuse_state(stand_in, state):
  """BUILD calls __setstate__ on the object below it; a frozen slotted dataclass would otherwise
  get dataclasses' own, which sets its fields: a pickle could rewrite a shared stand-in, or a
  tensor's size and stride after they were checked."""
  raise ValueError(f"the pickle sets the state of a {type(stand_in).__name__}; torch never does")


@dataclasses.dataclass(frozen=True, slots=True)
class StorageType:
  """Stand-in for torch.FloatStorage and the other typed storages."""
  name: str
  __setstate__ = refuse_state


@dataclasses.dataclass(frozen=True, slots=True)
class StorageRef:
  key: str
  kind: StorageType
  numel: int
  __setstate__ = refuse_state


@dataclasses.dataclass(frozen=True, slots=True, eq=False)  # Identity: tied weights are one tensor.
class TensorRef:
  storage: StorageRef
  offset: int
  size: tuple
  stride: tuple
  __setstate__ = refuse_state


def is_index(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclasses.dataclass(frozen=True, slots=True)
class TensorRebuilder:
  """Stand-in for torch._utils._rebuild_tensor(_v2) and _rebuild_parameter: a TensorRef."""
  is_parameter: bool
  __setstate__ = refuse_state

  def __call__(self, *args) -> TensorRef:
    if self.is_parameter:  # (tensor, requires_grad, backward_hooks)
      if not (args and isinstance(args[0], TensorRef)):
        raise ValueError("a parameter wraps something other than a tensor")
      return args[0]
    if len(args) < 4 or not isinstance(args[0], StorageRef):  # Then requires_grad, hooks, ...
      raise ValueError(f"a tensor is rebuilt from {len(args)} arguments, not from a storage")
    return TensorRef(*args[:4])


ALLOWED_GLOBALS = {
    "collections.OrderedDict": collections.OrderedDict,
    "torch._utils._rebuild_tensor_v2": TensorRebuilder(is_parameter=False),
    "torch._utils._rebuild_tensor": TensorRebuilder(is_parameter=False),
    "torch._utils._rebuild_parameter": TensorRebuilder(is_parameter=True),
    **{f"torch.{name}": StorageType(name) for name in STORAGE_ELEMENTS},
}


class StateDictUnpickler(pickle.Unpickler):
  """Resolves the globals in ALLOWED_GLOBALS and nothing else; collects the storages named."""

  def __init__(self, file, source: str, storages: dict):
    super().__init__(file)
    self.source, self.storages = source, storages

  def find_class(self, module, name):
    if f"{module}.{name}" not in ALLOWED_GLOBALS:
      raise CheckpointError(
          f"Refusing {self.source}: it names the global '{module}.{name}', which a weights file "
          f"never needs; only tensors, storages and ordered dicts are read.")
    return ALLOWED_GLOBALS[f"{module}.{name}"]

  def persistent_load(self, saved_id) -> StorageRef:
    """('storage', type, key, location, numel), plus a view (None) in legacy files."""
    if not (isinstance(saved_id, tuple) and len(saved_id) in (5, 6) and saved_id[0] == "storage"
            and isinstance(saved_id[1], StorageType) and isinstance(saved_id[2], str)
            and is_index(saved_id[4]) and saved_id[5:] in ((), (None,))):
      raise CheckpointError(f"Refusing {self.source}: it refers to {str(saved_id)[:80]}, not to "
                            f"a tensor storage.")
    ref = StorageRef(key=saved_id[2], kind=saved_id[1], numel=saved_id[4])
    if self.storages.setdefault(ref.key, ref) != ref:
      raise CheckpointError(f"{self.source}: storage {ref.key} is named with two types or sizes.")
    return ref


def load_pickle(file, source: str, storages: dict):
  """One pickle from `file` (seekable), through StateDictUnpickler. Memo indices are checked
  first: CPython's unpickler allocates memo slots up to the largest index, so a 10-byte pickle
  naming index 2**32 would take 64 GB."""
  try:
    start = file.tell()
    for opcode, argument, position in pickletools.genops(file):
      if opcode.name in MEMO_PUTS and argument > position - start:
        raise CheckpointError(f"{source}: its pickle stores memo entry {argument} at byte "
                              f"{position}; a real pickle numbers them in order.")
    file.seek(start)
    return StateDictUnpickler(file, source, storages).load()
  except CheckpointError:
    raise
  except Exception as error:  # Damaged, crafted or no pickle: say which file and what was expected.
    raise CheckpointError(f"Cannot read {source} as a PyTorch checkpoint (torch.save's zip or "
                          f"legacy format): {type(error).__name__}: {error}") from error


def unwrapped(checkpoint):
  """The state dict inside {'state_dict': ...} / {'model': ...} wrappers (any number of them)."""
  seen = set()
  while isinstance(checkpoint, dict) and id(checkpoint) not in seen:
    seen.add(id(checkpoint))
    inner = [checkpoint[key] for key in WRAPPER_KEYS if isinstance(checkpoint.get(key), dict)]
    if not inner:
      break
    checkpoint = inner[0]
  return checkpoint


def flat_tensors(tree, source: str) -> dict:
  """{'a': {'b': tensor}, 'epoch': 3} -> {'a.b': tensor}."""
  if not isinstance(tree, dict):
    raise CheckpointError(f"{source} holds a {type(tree).__name__}, not a dict of tensors.")
  flat = {}
  for name, ref in tensor_items(tree, "", 0, set(), source):
    if name in flat:
      raise CheckpointError(f"{source}: two tensors are named {name}.")
    flat[name] = ref
  return flat


def tensor_items(node: dict, prefix: str, depth: int, seen: set, source: str):
  """(name, TensorRef) under `node`, in file order. Each dict is visited once: a pickle can put
  one dict under many keys and nest that, a few bytes naming billions of paths."""
  if id(node) in seen or depth > MAX_DEPTH:
    raise CheckpointError(f"{source}: the dict at '{prefix}' is nested over {MAX_DEPTH} deep or "
                          f"appears twice; a state dict is a small tree.")
  seen.add(id(node))
  for key, value in node.items():
    if isinstance(value, dict):
      yield from tensor_items(value, f"{prefix}{key}.", depth + 1, seen, source)
    elif isinstance(value, TensorRef):
      yield f"{prefix}{key}", value


def storage_dtype(ref: StorageRef, big_endian: bool) -> np.dtype:
  dtype = np.dtype(STORAGE_ELEMENTS[ref.kind.name])
  return dtype.newbyteorder(">") if big_endian else dtype


def check_layout(ref: TensorRef, source: str) -> None:
  if not (is_index(ref.offset) and isinstance(ref.size, tuple) and isinstance(ref.stride, tuple)
          and len(ref.size) == len(ref.stride) and all(map(is_index, ref.size + ref.stride))):
    raise CheckpointError(f"{source}: a tensor on storage {ref.storage.key} has offset "
                          f"{ref.offset!r}, size {ref.size!r} and stride {ref.stride!r}, not "
                          f"non-negative integers.")


def cut_tensor(ref: TensorRef, storage: np.ndarray, source: str) -> np.ndarray:
  """The tensor's elements copied out of its storage (layout checked): C-contiguous, native byte
  order."""
  last = ref.offset + sum((length - 1) * step for length, step in zip(ref.size, ref.stride))
  if math.prod(ref.size) and last >= storage.size:
    raise CheckpointError(f"{source}: a tensor (offset {ref.offset}, size {ref.size}, stride "
                          f"{ref.stride}) reaches past its storage {ref.storage.key} "
                          f"({storage.size} elements).")
  is_bfloat16 = ref.storage.kind.name == BFLOAT16
  native = np.dtype(np.uint32 if is_bfloat16 else storage.dtype.newbyteorder("="))
  if not math.prod(ref.size):
    tensor = np.zeros(ref.size, native)
  else:
    view = np.lib.stride_tricks.as_strided(
        storage[ref.offset:], ref.size, [step * storage.itemsize for step in ref.stride],
        writeable=False)
    tensor = np.array(view, dtype=native, order="C")
  return (tensor << 16).view(np.float32) if is_bfloat16 else tensor  # bfloat16: float32's top.


def materialize(tensors: dict, storages, source: str) -> dict:
  """{name: array} from {name: TensorRef} and (key, 1-D storage array) pairs, one storage at a
  time, so that only one storage's bytes are held beside the finished arrays."""
  views = collections.defaultdict(dict)  # storage key -> {id: TensorRef}, tied names once.
  for ref in tensors.values():
    check_layout(ref, source)
    views[ref.storage.key][id(ref)] = ref
  arrays = {}
  for key, storage in storages:
    if sum(math.prod(ref.size) for ref in views[key].values()) > MAX_VIEW_RATIO * storage.size:
      raise CheckpointError(f"{source}: the tensors on storage {key} hold over {MAX_VIEW_RATIO} "
                            f"times its {storage.size} elements; save t.contiguous() copies.")
    arrays.update({id(ref): cut_tensor(ref, storage, source) for ref in views[key].values()})
  return {name: arrays[id(ref)] for name, ref in tensors.items()}


def archive_member(archive, name: str):
  try:
    return archive.getinfo(name)
  except KeyError:
    return None


def zip_storages(archive, prefix: str, refs, big_endian: bool, source: str):
  for ref in refs:
    name, dtype = f"{prefix}data/{ref.key}", storage_dtype(ref, big_endian)
    info = archive_member(archive, name)
    if info is None or info.compress_type != zipfile.ZIP_STORED:  # Bounds memory by file size.
      raise CheckpointError(f"{source}: its storage {name} is {'compressed' if info else 'missing'}"
                            f"; torch.save writes every storage, uncompressed.")
    if info.file_size != ref.numel * dtype.itemsize:
      raise CheckpointError(f"{source}: its storage {name} holds {info.file_size} bytes, not the "
                            f"{ref.numel} x {dtype.itemsize} its pickle says.")
    yield ref.key, np.frombuffer(archive.read(name), dtype)


def read_zip(path: str) -> dict:
  try:
    return read_zip_archive(path)
  except (zipfile.BadZipFile, EOFError) as error:  # Bad CRC, truncated member, no directory.
    raise CheckpointError(f"{path} is a damaged zip archive: {error}") from error


def read_zip_archive(path: str) -> dict:
  with zipfile.ZipFile(path) as archive:
    pickles = [name for name in archive.namelist()
               if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1 or archive.getinfo(pickles[0]).compress_type != zipfile.ZIP_STORED:
      raise CheckpointError(f"{path} is a zip archive but not torch.save's: it needs one "
                            f"uncompressed ARCHIVE/data.pkl; it has {pickles or 'none'}.")
    prefix = pickles[0].removesuffix("data.pkl")
    order = "little"  # No record (older torch): little, as nearly every machine that wrote one.
    if archive_member(archive, prefix + "byteorder"):
      with archive.open(prefix + "byteorder") as record:
        order = record.read(16).decode(errors="replace").strip()
    if order not in ("little", "big"):
      raise CheckpointError(f"{path}: its byteorder record says {order[:20]!r}, not little or big.")
    storages = {}
    pickled = io.BytesIO(archive.read(pickles[0]))  # Stored, so no larger than the file.
    tensors = flat_tensors(unwrapped(load_pickle(pickled, path, storages)), path)
    needed = [storages[key] for key in dict.fromkeys(ref.storage.key for ref in tensors.values())]
    return materialize(tensors, zip_storages(archive, prefix, needed, order == "big", path), path)


def legacy_storages(file, keys, storages: dict, source: str):
  """Every storage after the pickles, in `keys` order: an int64 element count, then the bytes."""
  if not (isinstance(keys, list) and all(isinstance(key, str) for key in keys)
          and sorted(keys) == sorted(storages)):
    raise CheckpointError(f"{source}: its list of storage keys does not match its tensors'.")
  for key in keys:
    dtype = storage_dtype(storages[key], big_endian=False)
    count = int.from_bytes(file.read(8), "little")
    if count != storages[key].numel or count * dtype.itemsize > len(file) - file.tell():
      raise CheckpointError(f"{source}: storage {key} is truncated or not the "
                            f"{storages[key].numel} elements its pickle says.")
    yield key, np.frombuffer(file.read(count * dtype.itemsize), dtype)


def read_legacy(path: str) -> dict:
  if os.path.getsize(path) == 0:
    raise CheckpointError(f"{path} is empty.")
  # Through mmap, a length field in a crafted pickle cannot make a read allocate beyond the file.
  with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as file:
    if load_pickle(file, path, {}) != LEGACY_MAGIC:
      raise CheckpointError(f"{path} is a pickle but no PyTorch checkpoint: neither torch.save's "
                            f"zip format nor its legacy one (no magic number).")
    if load_pickle(file, path, {}) != LEGACY_PROTOCOL:
      raise CheckpointError(f"{path}: legacy PyTorch protocol other than {LEGACY_PROTOCOL}.")
    load_pickle(file, path, {})  # System info: byte order and C type sizes of the writer.
    storages = {}
    tensors = flat_tensors(unwrapped(load_pickle(file, path, storages)), path)
    keys = load_pickle(file, path, {})
    return materialize(tensors, legacy_storages(file, keys, storages, path), path)


def read_torch_state_dict(path: str) -> dict:
  """{name: numpy array} of the tensors in a torch.save file (see the module docstring)."""
  with open(path, "rb") as file:
    starts_as_zip = file.read(4) == ZIP_MAGIC  # What torch.load tests, too.
  return read_zip(path) if starts_as_zip else read_legacy(path)
