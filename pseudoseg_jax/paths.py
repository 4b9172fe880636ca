"""The one path layer: every file the project itself reads or writes (JSON, metrics.jsonl, PNGs,
predict's inputs and outputs, images and masks it decodes, model.init_from) goes through here, so a
path may be local or any URL etils.epath understands (gs://, s3://, ...). Orbax, tf.summary,
tf.data and TFDS take such URLs themselves.

Local paths keep the plain os calls (and their atomic rename); a URL goes through epath, whose
gs:// backend is TensorFlow's GCS file system (or gcsfs where TensorFlow is absent).
"""

from __future__ import annotations

import builtins
import glob as glob_lib
import io
import os
import secrets
from typing import IO, Callable


def is_remote(path) -> bool:
  """True for a URL (gs://bucket/x, s3://...), False for a local path."""
  return "://" in os.fspath(path)


def _epath(path):
  from etils import epath  # Imported when a URL is used: local runs never need it.
  return epath.Path(os.fspath(path))


def absolute(path: str) -> str:
  """os.path.abspath for a local path; a URL is already absolute (abspath would mangle it)."""
  return path.rstrip("/") if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
  return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
  return _epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
  return _epath(path).is_file() if is_remote(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
  """Names (not paths) in the folder `path`, in no particular order."""
  if is_remote(path):
    return [child.name for child in _epath(path).iterdir()]
  return os.listdir(path)


def glob(pattern: str) -> list[str]:
  """The paths matching `pattern`; '**' crosses folders."""
  if is_remote(pattern):
    first_wildcard = min(pattern.find(c) % (len(pattern) + 1) for c in "*?[")
    folder = pattern[:first_wildcard].rpartition("/")[0]
    return [os.fspath(path) for path in _epath(folder).glob(pattern[len(folder) + 1:])]
  return glob_lib.glob(pattern, recursive=True)


def makedirs(path: str) -> None:
  """mkdir -p. On an object store this may create nothing: a 'folder' is a name prefix there."""
  if is_remote(path):
    _epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def open(path: str, mode: str = "r") -> IO:  # pylint: disable=redefined-builtin
  """builtins.open for a local path, epath's open for a URL ('r', 'w', 'rb', 'wb')."""
  return _epath(path).open(mode) if is_remote(path) else builtins.open(path, mode)


def read_text(path: str) -> str:
  with open(path) as f:
    return f.read()


def read_bytes(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def readable(path: str):
  """What PIL, scipy and numpy open: a local path as it is (read lazily, named in their errors),
  a URL's bytes in memory."""
  return io.BytesIO(read_bytes(path)) if is_remote(path) else path


def replace_file(path: str, write: Callable[[IO], None], *, binary: bool = False) -> None:
  """write(f), then the result appears at `path` whole: a reader never sees half a file, and a
  crash (or a full disk) leaves the old one whole.

  Local: written to a new file beside `path`, then renamed over it; a link at `path` or at a
  guessable temporary name is replaced, never written through. O_EXCL refuses anything already at
  the temporary name; the umask sets the mode.
  URL: object stores have no atomic rename (GCS 'rename' is copy + delete), but an object appears
  only when its upload completes. So the content is built in memory and sent in one upload."""
  if is_remote(path):
    buffer = io.BytesIO() if binary else io.StringIO()
    write(buffer)
    content = buffer.getvalue()
    with _epath(path).open("wb") as f:
      f.write(content if binary else content.encode("utf-8"))
    return
  folder = os.path.dirname(os.path.abspath(path))
  while True:
    temporary = os.path.join(folder, f".tmp-{secrets.token_hex(8)}-{os.path.basename(path)}")
    try:
      handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
      break
    except FileExistsError:
      continue
  try:
    with os.fdopen(handle, "wb" if binary else "w") as f:
      write(f)
    os.replace(temporary, path)
  finally:
    if os.path.lexists(temporary):
      os.remove(temporary)


def local_copy(url: str, folder: str) -> str:
  """Copies the object `url` and its siblings `url`.* (a TF checkpoint prefix's .index and
  .data-* files) into the local `folder`, for readers that need a local file (mmap, seek);
  returns the local path of `url`."""
  parent, name = url.rstrip("/").rsplit("/", 1)
  copied = [child for child in listdir(parent) if child == name or child.startswith(name + ".")]
  if not copied:
    raise FileNotFoundError(f"{url} does not exist.")
  for child in copied:
    content = read_bytes(f"{parent}/{child}")
    replace_file(os.path.join(folder, child), lambda f, content=content: f.write(content),
                 binary=True)
  return os.path.join(folder, name)


def append_text(path: str, text: str) -> None:
  """Appends `text` to the file (created if missing).

  Local: an O_APPEND write. URL: objects cannot be appended to, so the object is read and
  uploaded again whole with `text` added (replace_file): fine for a log of one line per eval or
  log interval (metrics.jsonl stays well under a megabyte), not for a large file."""
  if not is_remote(path):
    with builtins.open(path, "a") as f:
      f.write(text)
    return
  old = read_text(path) if exists(path) else ""
  replace_file(path, lambda f: f.write(old + text))
