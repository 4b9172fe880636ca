"""ImageNet weights by name: `model.init_from=resnet101_torchvision` and the like.

A named file is downloaded once into the cache ($PSEUDOSEG_CACHE, else ~/.cache/pseudoseg_jax),
verified against its publisher's hash where one is published (torchvision's sha256 prefix in the
file name, Keras's md5) and against the size the server announced otherwise, and only then moved
into place, so the cache never holds a partial or unverified file. A cached file that no longer
verifies is removed and fetched again. Archives (DeepLab's Xception-65) are unpacked beside it.

Offline, the error names the URL and the path where a file downloaded by hand must go. A mirror
(a firewall's proxy, a bucket copy, a test server) is set with $PSEUDOSEG_WEIGHTS_MIRROR: the
URL's directory is replaced by it, the file name kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.client
import os
import pathlib
import sys
import tarfile
import urllib.error
import urllib.request

CACHE_ENV = "PSEUDOSEG_CACHE"
MIRROR_ENV = "PSEUDOSEG_WEIGHTS_MIRROR"
CHUNK_BYTES = 1 << 20
TIMEOUT_SECONDS = 60


@dataclasses.dataclass(frozen=True)
class NamedWeights:
  url: str
  backbone: str  # The model.backbone the weights fit.
  # (algorithm, hex digest or its leading digits), or None where the publisher gives no hash.
  digest: tuple[str, str] | None = None
  # model.* fields the weights need besides the backbone, e.g. Keras's layout.
  model_fields: tuple[tuple[str, object], ...] = ()

  @property
  def file_name(self) -> str:
    return self.url.rsplit("/", 1)[-1]

  @property
  def is_archive(self) -> bool:
    return self.file_name.endswith((".tar.gz", ".tgz"))


_KERAS = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
_KERAS_LAYOUT = (("resnet_variant", "keras"), ("bn_epsilon", 1.001e-5))
# Hashes as their publishers give them: torchvision's file names carry the first 8 hex digits of
# the sha256 (torch.hub checks that prefix); keras.applications.resnet's WEIGHTS_HASHES are md5s.
NAMED = {
    "resnet50_torchvision": NamedWeights(
        "https://download.pytorch.org/models/resnet50-0676ba61.pth", "resnet50",
        ("sha256", "0676ba61")),
    "resnet101_torchvision": NamedWeights(
        "https://download.pytorch.org/models/resnet101-63fe2227.pth", "resnet101",
        ("sha256", "63fe2227")),
    "resnet50_keras": NamedWeights(
        _KERAS + "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "resnet50",
        ("md5", "4d473c1dd8becc155b73f8504c6f6626"), _KERAS_LAYOUT),
    "resnet101_keras": NamedWeights(
        _KERAS + "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5", "resnet101",
        ("md5", "88cf7a10940856eca736dc7b7e228a21"), _KERAS_LAYOUT),
    # DeepLab's model zoo entry "xception_65_imagenet" (447 MB); it publishes no hash, and the TF
    # checkpoint's own CRCs are checked when it is read.
    "xception65_imagenet": NamedWeights(
        "http://download.tensorflow.org/models/deeplabv3_xception_2018_01_04.tar.gz",
        "xception65"),
}


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get(CACHE_ENV) or
                      pathlib.Path.home() / ".cache" / "pseudoseg_jax")


def source_url(entry: NamedWeights) -> str:
  mirror = os.environ.get(MIRROR_ENV)
  return f"{mirror.rstrip('/')}/{entry.file_name}" if mirror else entry.url


def config_errors(name: str, entry: NamedWeights, model_config) -> list[str]:
  errors = []
  if model_config.backbone != entry.backbone:
    errors.append(f"model.backbone={entry.backbone} (not {model_config.backbone})")
  for field, value in entry.model_fields:
    if model_config.get(field) != value:
      errors.append(f"model.{field}={value} (not {model_config.get(field)})")
  return [f"model.init_from={name} needs " + ", ".join(errors)] if errors else []


def file_hexdigest(path, algorithm: str) -> str:
  hasher = hashlib.new(algorithm)
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
      hasher.update(chunk)
  return hasher.hexdigest()


def digest_error(path: pathlib.Path, entry: NamedWeights) -> str | None:
  """Why the file is not the published one; None when it is (or nothing is published)."""
  if entry.digest is None:
    return None
  algorithm, expected = entry.digest
  got = file_hexdigest(path, algorithm)
  if got.startswith(expected):
    return None
  return f"its {algorithm} is {got}, the publisher's {'starts with ' * (len(expected) < len(got))}{expected}"


def _report_progress(done: int, total: int | None, name: str) -> None:
  if total:
    sys.stderr.write(f"\rDownloading {name}: {done / 2**20:.1f} / {total / 2**20:.1f} MiB "
                     f"({100 * done / total:.0f}%)")
  else:
    sys.stderr.write(f"\rDownloading {name}: {done / 2**20:.1f} MiB")
  sys.stderr.flush()


def download(url: str, destination: pathlib.Path, entry: NamedWeights) -> None:
  """url -> destination, whole and verified, or nothing: DESTINATION.partial is renamed into place
  only after the size and hash checks. A download killed midway leaves that .partial, which the
  next one truncates: it starts again from the first byte."""
  destination.parent.mkdir(parents=True, exist_ok=True)
  partial = destination.with_name(destination.name + ".partial")
  try:
    with open(partial, "wb") as out, \
        urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:
      announced = response.headers.get("Content-Length")
      total = int(announced) if announced else None
      done = 0
      try:
        for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
          out.write(chunk)
          done += len(chunk)
          _report_progress(done, total, entry.file_name)
      except (http.client.HTTPException, ConnectionError, TimeoutError):
        pass  # Reported below as a short file.
      sys.stderr.write("\n")
    if total is not None and done != total:
      raise ValueError(f"{url} ended after {done} of the {total} bytes it announced; nothing was "
                       f"kept. Run again to restart the download.")
    error = digest_error(partial, entry)
    if error:
      raise ValueError(f"{url} is not the published file: {error}. It was removed; nothing "
                       f"was loaded.")
    os.replace(partial, destination)
  finally:
    partial.unlink(missing_ok=True)


def unpacked(archive: pathlib.Path) -> pathlib.Path:
  """The archive's folder beside it, unpacked once. Only regular files are written, each to a path
  checked to stay inside that folder; links and devices are refused by name."""
  folder = archive.with_name(archive.name.split(".")[0])
  done_marker = folder / ".unpacked"
  if done_marker.exists():
    return folder
  root = folder.resolve()
  with tarfile.open(archive) as tar:
    members = tar.getmembers()
    for member in members:  # All checked before anything is written.
      target = (folder / member.name).resolve()
      if not (target == root or root in target.parents) or not (member.isfile() or member.isdir()):
        raise ValueError(f"{archive}: refusing the archive member {member.name!r} (a link or "
                         f"outside the archive's folder).")
    for member in filter(tarfile.TarInfo.isfile, members):
      target = folder / member.name
      target.parent.mkdir(parents=True, exist_ok=True)
      with tar.extractfile(member) as source, open(target, "wb") as out:
        for chunk in iter(lambda: source.read(CHUNK_BYTES), b""):
          out.write(chunk)
  done_marker.touch()
  return folder


def checkpoint_prefix(folder: pathlib.Path, archive: pathlib.Path) -> str:
  indexes = sorted(folder.rglob("*.index"))
  if len(indexes) != 1:
    raise ValueError(f"{archive} should hold one TF checkpoint; found {len(indexes)} .index "
                     f"files in {folder}.")
  return str(indexes[0])[:-len(".index")]


def fetch(name: str) -> str:
  """The local path of the named weights (a TF checkpoint prefix for archives), downloading and
  verifying them on first use."""
  entry = NAMED[name]
  path = cache_dir() / name / entry.file_name
  if path.exists():
    error = digest_error(path, entry)
    if error:
      sys.stderr.write(f"{path} is damaged ({error}): removed, fetching it again.\n")
      path.unlink()
  if not path.exists():
    url = source_url(entry)
    try:
      download(url, path, entry)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
      raise ValueError(
          f"model.init_from={name}: could not download {url} ({error}). Offline, download it by "
          f"hand and put it at {path} (or set ${MIRROR_ENV} to a folder URL that serves "
          f"{entry.file_name}).") from error
  if entry.is_archive:
    return checkpoint_prefix(unpacked(path), path)
  return str(path)


def resolve(name: str, model_config) -> str:
  """fetch(name) after checking that config.model fits the weights (before any download)."""
  errors = config_errors(name, NAMED[name], model_config)
  if errors:
    raise ValueError("; ".join(errors) + ".")
  return fetch(name)
