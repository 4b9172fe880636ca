"""ImageNet weights by name (convert/named_weights.py), against a local HTTP server on 127.0.0.1."""

import hashlib
import http.server
import io
import pathlib
import socket
import tarfile
import threading

import numpy as np
import pytest
import tensorflow as tf

from flax import nnx

from pseudoseg_jax import convert
from pseudoseg_jax.config import base_config
from pseudoseg_jax.convert import named_weights
from pseudoseg_jax.models import build_model

from test_xception import NON_BACKBONE_SHAPES, deeplab_backbone_shapes, random_tensor

PAYLOAD = b"weights " * 40_000  # 320 KB: several reads of the server's stream.


class Server:
  """Serves `files` (name -> bytes) from 127.0.0.1; `truncate` names files cut short after
  announcing their full length; `requests` counts the GETs."""

  def __init__(self):
    self.files, self.truncate, self.requests = {}, set(), 0
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):  # noqa: N802 (http.server's name)
        server.requests += 1
        name = self.path.rsplit("/", 1)[-1]
        if name not in server.files:
          self.send_error(404)
          return
        body = server.files[name]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[:len(body) // 3] if name in server.truncate else body)

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.url = f"http://127.0.0.1:{self.httpd.server_port}/models"
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture()
def server(monkeypatch, tmp_path):
  running = Server()
  monkeypatch.setenv(named_weights.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.setenv(named_weights.MIRROR_ENV, running.url)
  yield running
  running.close()


def entry_for(payload: bytes, name: str = "resnet50-abcdef12.pth", **fields):
  return named_weights.NamedWeights(f"https://example.invalid/models/{name}", "resnet50",
                                    ("md5", hashlib.md5(payload).hexdigest()), **fields)


def register(monkeypatch, name: str, entry) -> pathlib.Path:
  monkeypatch.setitem(named_weights.NAMED, name, entry)
  return named_weights.cache_dir() / name / entry.file_name


def leftovers(folder: pathlib.Path) -> list[str]:
  return sorted(p.name for p in folder.glob("*")) if folder.exists() else []


def test_a_good_file_is_downloaded_once_verified_and_cached(server, monkeypatch):
  entry = entry_for(PAYLOAD)
  server.files[entry.file_name] = PAYLOAD
  cached = register(monkeypatch, "good", entry)
  assert named_weights.fetch("good") == str(cached)
  assert cached.read_bytes() == PAYLOAD and server.requests == 1
  assert named_weights.fetch("good") == str(cached) and server.requests == 1  # From the cache.
  assert leftovers(cached.parent) == [entry.file_name]


def test_the_torchvision_sha256_prefix_is_checked(server, monkeypatch):
  prefix = hashlib.sha256(PAYLOAD).hexdigest()[:8]
  entry = named_weights.NamedWeights(f"https://x.invalid/resnet50-{prefix}.pth", "resnet50",
                                     ("sha256", prefix))
  server.files[entry.file_name] = PAYLOAD
  register(monkeypatch, "tv", entry)
  assert pathlib.Path(named_weights.fetch("tv")).read_bytes() == PAYLOAD
  server.files[entry.file_name] = PAYLOAD + b"!"
  register(monkeypatch, "tv_other", entry)
  with pytest.raises(ValueError, match=f"its sha256 is [0-9a-f]{{64}}, the publisher's starts "
                                       f"with {prefix}"):
    named_weights.fetch("tv_other")


def test_a_corrupted_download_is_refused_and_removed(server, monkeypatch):
  entry = entry_for(PAYLOAD)
  server.files[entry.file_name] = PAYLOAD[:-1] + b"X"
  cached = register(monkeypatch, "corrupt", entry)
  with pytest.raises(ValueError, match=r"not the published file: its md5 is [0-9a-f]{32}"):
    named_weights.fetch("corrupt")
  assert leftovers(cached.parent) == []


def test_a_damaged_cached_file_is_removed_and_fetched_again(server, monkeypatch):
  entry = entry_for(PAYLOAD)
  server.files[entry.file_name] = PAYLOAD
  cached = register(monkeypatch, "damaged", entry)
  cached.parent.mkdir(parents=True)
  cached.write_bytes(PAYLOAD[:1000])
  assert pathlib.Path(named_weights.fetch("damaged")).read_bytes() == PAYLOAD
  assert server.requests == 1


def test_an_interrupted_download_keeps_nothing_and_the_next_restarts(server, monkeypatch):
  entry = entry_for(PAYLOAD)
  server.files[entry.file_name] = PAYLOAD
  server.truncate.add(entry.file_name)
  cached = register(monkeypatch, "cut", entry)
  with pytest.raises(ValueError, match=r"ended after \d+ of the 320000 bytes"):
    named_weights.fetch("cut")
  assert leftovers(cached.parent) == []
  # A download killed midway leaves its .partial: the next one starts again from byte 0.
  cached.with_name(cached.name + ".partial").write_bytes(b"stale bytes")
  server.truncate.clear()
  assert pathlib.Path(named_weights.fetch("cut")).read_bytes() == PAYLOAD
  assert leftovers(cached.parent) == [entry.file_name]


def test_no_server_names_the_url_and_where_to_put_the_file(monkeypatch, tmp_path):
  with socket.socket() as probe:  # A port nothing listens on.
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  monkeypatch.setenv(named_weights.CACHE_ENV, str(tmp_path))
  monkeypatch.setenv(named_weights.MIRROR_ENV, f"http://127.0.0.1:{port}/m")
  entry = entry_for(PAYLOAD)
  cached = register(monkeypatch, "offline", entry)
  with pytest.raises(ValueError) as error:
    named_weights.fetch("offline")
  message = str(error.value)
  assert f"http://127.0.0.1:{port}/m/{entry.file_name}" in message and str(cached) in message


def test_a_config_that_does_not_fit_is_refused_before_any_download(server, monkeypatch):
  entry = entry_for(PAYLOAD, model_fields=(("resnet_variant", "keras"),))
  server.files[entry.file_name] = PAYLOAD
  register(monkeypatch, "keras_like", entry)
  model = base_config().model
  model.backbone = "resnet101"
  with pytest.raises(ValueError, match="needs model.backbone=resnet50 .not resnet101., "
                                       "model.resnet_variant=keras"):
    named_weights.resolve("keras_like", model)
  assert server.requests == 0


def test_the_published_names_fit_their_configs():
  for name, entry in named_weights.NAMED.items():
    model = base_config().model
    model.backbone = entry.backbone
    model.update(dict(entry.model_fields))
    assert named_weights.config_errors(name, entry, model) == []
    assert entry.url.startswith(("https://", "http://download.tensorflow.org/"))
  assert named_weights.NAMED["resnet101_torchvision"].file_name == "resnet101-63fe2227.pth"


def tar_gz(members: dict) -> bytes:
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buffer.getvalue()


def test_an_archive_member_outside_its_folder_is_refused(server, monkeypatch):
  archive = tar_gz({"../escaped.index": b"x"})
  entry = entry_for(archive, name="evil.tar.gz")
  server.files[entry.file_name] = archive
  cached = register(monkeypatch, "evil", entry)
  with pytest.raises(ValueError, match="refusing the archive member '../escaped.index'"):
    named_weights.fetch("evil")
  assert not (cached.parent.parent / "escaped.index").exists()


def make_xception_archive(folder: pathlib.Path) -> bytes:
  """DeepLab's xception_65 archive layout (a folder with model.ckpt.*), random weights: every
  backbone variable and some that are not the backbone's; written through `folder`."""
  rng = np.random.default_rng(0)
  shapes = {**deeplab_backbone_shapes(), **NON_BACKBONE_SHAPES}
  variables = {name: tf.Variable(random_tensor(rng, name, shape)) for name, shape in shapes.items()}
  (folder / "xception").mkdir(parents=True, exist_ok=True)
  prefix = tf.compat.v1.train.Saver(var_list=variables).save(
      None, str(folder / "xception" / "model.ckpt"), write_meta_graph=False)
  return tar_gz({f"xception/{path.name}": path.read_bytes()
                 for path in pathlib.Path(prefix).parent.glob("model.ckpt*")})


@pytest.fixture(scope="module")
def xception_archive(tmp_path_factory) -> bytes:
  return make_xception_archive(tmp_path_factory.mktemp("xception"))


def test_xception_by_name_loads_every_backbone_tensor_from_the_served_archive(
    server, xception_archive):
  server.files[named_weights.NAMED["xception65_imagenet"].file_name] = xception_archive
  model = base_config().model
  model.backbone = "xception65"
  weights = convert.read_weights("xception65_imagenet", model)
  assert len(weights) == len(deeplab_backbone_shapes())
  assert server.requests == 1
  convert.read_weights("xception65_imagenet", model)  # Unpacked once, then read from the cache.
  assert server.requests == 1


def test_the_paper_config_loads_xceptions_weights_by_name_and_labels_the_published_92(
    server, xception_archive):
  """configs/voc_pseudoseg.py:split=92 as it is: the paper's network, DeepLab's ImageNet weights
  fetched by name (here from 127.0.0.1) into every backbone tensor, the paper's 92 ids."""
  from configs import voc_pseudoseg
  from pseudoseg_jax.data.datasets import subsets
  config = voc_pseudoseg.get_config("split=92")
  config.model.update(aspp_channels=16, decoder_channels=16, low_level_channels=8,
                      sgc_attention_dim=8)  # Small heads: the backbone is what is checked.
  server.files[named_weights.NAMED["xception65_imagenet"].file_name] = xception_archive
  weights = convert.read_weights(config.model.init_from, config.model)
  model = nnx.eval_shape(lambda: build_model(config.model, config.data.num_classes,
                                             rngs=nnx.Rngs(0)))
  _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  shapes = convert.expected_shapes(nnx.to_pure_dict(params)["backbone"],
                                   nnx.to_pure_dict(stats)["backbone"])
  assert convert.mapping_errors(weights, shapes) == [] and len(weights) == 660
  ids = subsets.read_id_list(config.data.labeled_list)
  assert len(ids) == 92 and ids[:2] == ["2007_000733", "2010_004493"]  # 16_clean_3.txt's first.
