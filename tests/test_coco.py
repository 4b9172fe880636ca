"""COCO 2017 semantic masks from panoptic annotations, the COCO -> VOC mapping, and the loaders.

Known answers come from the genuine panoptic sample in tests/data/coco_panoptic_sample (two
val2017 images): its PNGs, segments_info, categories and the same annotations as RLE masks.
"""

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from pseudoseg_jax import config as config_lib
from pseudoseg_jax.data import datasets
from pseudoseg_jax.data.datasets import coco, subsets, voc

# Class pixel counts per image, hand-summed from the 'area' of the sample's thing segments
# (person 1, truck 8, horse 18, sports ball 33); background is the rest of the image.
KNOWN_CLASS_PIXELS = {
    "000000142238": {1: 56_327, 33: 175, 0: 427 * 640 - 56_327 - 175},
    "000000439180": {1: 28_784, 8: 7_471, 18: 31_728, 0: 360 * 640 - 28_784 - 7_471 - 31_728},
}
# (row, column) -> class, found by hand in the PNGs: the sports ball, the crowd of people, a truck,
# a horse and the crowd of horses.
KNOWN_PIXELS = {
    "000000142238": {(126, 362): 33, (274, 342): 1},
    "000000439180": {(158, 216): 8, (265, 205): 18, (204, 614): 18},
}


@pytest.fixture(scope="module")
def sample_dir(sample_data_dir):
  return sample_data_dir / "coco_panoptic_sample"


@pytest.fixture(scope="module")
def panoptic(sample_dir):
  with open(sample_dir / "panoptic_examples.json") as f:
    return json.load(f)


def _image_id(annotation) -> str:
  return annotation["file_name"].rsplit(".", 1)[0]


def _read_rgb(path) -> np.ndarray:
  with Image.open(path) as image:
    return np.asarray(image.convert("RGB"))


def _thing_of_category(categories) -> dict:
  """category id -> 1..80 for things, counted by hand from the categories' isthing flags."""
  things = sorted(c["id"] for c in categories if c["isthing"])
  return {category_id: index + 1 for index, category_id in enumerate(things)}


def reference_mask(panoptic_rgb, segments_info, class_of_category) -> np.ndarray:
  """Numpy reference, one segment at a time: uint8 [H, W]."""
  rgb = panoptic_rgb.astype(np.int64)
  ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
  mask = np.zeros(ids.shape, np.uint8)
  for segment in segments_info:
    mask[ids == segment["id"]] = class_of_category.get(segment["category_id"], 0)
  return mask


def tf_mask(panoptic_rgb, segments_info, class_of_category) -> np.ndarray:
  classes = [class_of_category.get(s["category_id"], 0) for s in segments_info]
  return coco.semantic_mask(tf.constant(panoptic_rgb), tf.constant([s["id"] for s in segments_info],
                                                                   tf.int64),
                            tf.constant(classes, tf.int32)).numpy()


def decode_coco_rle(counts: str, height: int, width: int) -> np.ndarray:
  """A COCO compressed RLE string -> bool [H, W] (runs alternate 0/1, column-major)."""
  runs, position = [], 0
  while position < len(counts):
    value, shift, more = 0, 0, True
    while more:  # 5 bits per character, offset 48; bit 0x20 = more follow, 0x10 = sign.
      chunk = ord(counts[position]) - 48
      value |= (chunk & 0x1F) << (5 * shift)
      more = bool(chunk & 0x20)
      position += 1
      shift += 1
      if not more and chunk & 0x10:
        value |= -1 << (5 * shift)
    if len(runs) > 2:  # From the fourth run on, a run is stored as a difference.
      value += runs[-2]
    runs.append(value)
  flat = np.zeros(height * width, bool)
  starts = np.concatenate([[0], np.cumsum(runs)])
  for begin, end in zip(starts[1::2], starts[2::2]):
    flat[begin:end] = True
  return flat.reshape(width, height).T


# ---------------------------------------------------------------- classes
def test_thing_names_are_the_panoptic_things_in_category_id_order(panoptic):
  categories = sorted(panoptic["categories"], key=lambda c: c["id"])
  assert coco.THING_NAMES == tuple(c["name"] for c in categories if c["isthing"])
  assert coco.NUM_CLASSES == 81 and coco.CLASS_NAMES[0] == "background"
  assert coco.thing_ids_by_name()["person"] == 1
  assert coco.thing_ids_by_name()["sports ball"] == 33
  assert coco.thing_ids_by_name()["toothbrush"] == 80


def test_label_names_are_mapped_by_name_whatever_their_order(panoptic):
  names = [c["name"] for c in panoptic["categories"]]
  coco.check_label_names(names, "the sample")
  things = coco.thing_of_label(names)
  assert things.shape == (133,) and np.count_nonzero(things) == 80
  assert things[names.index("horse")] == 18 and things[names.index("tree-merged")] == 0
  reversed_things = coco.thing_of_label(names[::-1])
  np.testing.assert_array_equal(reversed_things, things[::-1])


def test_label_names_without_a_thing_are_refused(panoptic):
  names = [c["name"] for c in panoptic["categories"] if c["name"] != "couch"]
  with pytest.raises(ValueError, match="couch"):
    coco.check_label_names(names, "the sample")


def test_coco_to_voc_known_classes():
  voc_of_thing = coco.voc_class_of_thing(voc.CLASS_NAMES)
  thing = coco.thing_ids_by_name()
  assert voc_of_thing[thing["couch"]] == 18  # sofa
  assert voc_of_thing[thing["airplane"]] == 1  # aeroplane
  assert voc_of_thing[thing["person"]] == 15
  assert voc_of_thing[thing["dining table"]] == 11  # diningtable
  assert voc_of_thing[thing["tv"]] == 20  # tvmonitor
  assert voc_of_thing[thing["giraffe"]] == 0 and voc_of_thing[thing["truck"]] == 0
  assert voc_of_thing[0] == 0
  # Every VOC class comes from exactly one COCO thing.
  assert sorted(voc_of_thing[voc_of_thing > 0].tolist()) == list(range(1, 21))


def test_parse_unlabeled_split():
  assert coco.parse_unlabeled_split("", "train") == ("train", None)
  assert coco.parse_unlabeled_split("train", "train") == ("train", None)
  assert coco.parse_unlabeled_split("train+voc_train_aug", "train") == ("train", "train_aug")
  assert coco.parse_unlabeled_split("voc_train_aug", "train") == (None, "train_aug")
  with pytest.raises(ValueError, match="config.data.unlabeled_split"):
    coco.parse_unlabeled_split("train+validation", "train")


# ---------------------------------------------------------------- masks on the genuine sample
def test_semantic_mask_matches_the_numpy_reference_and_known_counts(panoptic, sample_dir):
  class_of_category = _thing_of_category(panoptic["categories"])
  for annotation in panoptic["annotations"]:
    rgb = _read_rgb(sample_dir / "panoptic_examples" / annotation["file_name"])
    mask = tf_mask(rgb, annotation["segments_info"], class_of_category)
    assert mask.shape == rgb.shape[:2] + (1,) and mask.dtype == np.uint8
    np.testing.assert_array_equal(
        mask[..., 0], reference_mask(rgb, annotation["segments_info"], class_of_category))
    image_id = _image_id(annotation)
    classes, counts = np.unique(mask, return_counts=True)
    assert dict(zip(classes.tolist(), counts.tolist())) == KNOWN_CLASS_PIXELS[image_id]
    for (row, column), expected in KNOWN_PIXELS[image_id].items():
      assert mask[row, column, 0] == expected


def test_semantic_mask_agrees_with_the_rle_instance_masks(panoptic, sample_dir):
  """The same annotations in detection format (RLE per segment) paint the same mask."""
  with open(sample_dir / "panoptic_coco_detection_format.json") as f:
    detection = json.load(f)
  class_of_category = _thing_of_category(panoptic["categories"])
  for annotation in panoptic["annotations"]:
    rgb = _read_rgb(sample_dir / "panoptic_examples" / annotation["file_name"])
    from_rle = np.zeros(rgb.shape[:2], np.uint8)
    for segment in detection["annotations"]:
      if segment["image_id"] == annotation["image_id"]:
        height, width = segment["segmentation"]["size"]
        painted = decode_coco_rle(segment["segmentation"]["counts"], height, width)
        assert painted.sum() == segment["area"]
        from_rle[painted] = class_of_category.get(segment["category_id"], 0)
    mask = tf_mask(rgb, annotation["segments_info"], class_of_category)
    np.testing.assert_array_equal(mask[..., 0], from_rle)


def test_semantic_mask_of_an_image_without_segments():
  rgb = tf.constant([[[1, 0, 0], [0, 0, 0]]], tf.uint8)
  mask = coco.semantic_mask(rgb, tf.zeros([0], tf.int64), tf.zeros([0], tf.int32))
  np.testing.assert_array_equal(mask.numpy(), np.zeros([1, 2, 1], np.uint8))


# ---------------------------------------------------------------- the tf.data transformation
def decoded_tfds_example(annotation, categories, names, sample_dir) -> dict:
  """One example shaped as coco/2017_panoptic yields it, decoded, labels indexed into `names`."""
  id_to_name = {c["id"]: c["name"] for c in categories}
  segments = annotation["segments_info"]
  image_name = annotation["file_name"].replace(".png", ".jpg")
  return {
      "image": _read_rgb(sample_dir / "input_images" / image_name),
      "image/filename": image_name,
      "image/id": np.int64(annotation["image_id"]),
      "panoptic_image": _read_rgb(sample_dir / "panoptic_examples" / annotation["file_name"]),
      "panoptic_image/filename": annotation["file_name"],
      "panoptic_objects": {
          "id": np.array([s["id"] for s in segments], np.int64),
          "area": np.array([s["area"] for s in segments], np.int64),
          "bbox": np.zeros([len(segments), 4], np.float32),
          "label": np.array([names.index(id_to_name[s["category_id"]]) for s in segments],
                            np.int64),
          "is_crowd": np.array([bool(s["iscrowd"]) for s in segments]),
      },
  }


@pytest.mark.parametrize("name_order", ["json", "reversed"])
def test_to_semantic_example_on_the_builders_structure(panoptic, sample_dir, name_order):
  names = [c["name"] for c in panoptic["categories"]]
  names = names if name_order == "json" else names[::-1]
  class_of_category = _thing_of_category(panoptic["categories"])
  for annotation in panoptic["annotations"]:
    example = decoded_tfds_example(annotation, panoptic["categories"], names, sample_dir)
    dataset = tf.data.Dataset.from_tensors(example).map(
        lambda e: coco.to_semantic_example(e, coco.thing_of_label(names)))
    (result,) = list(dataset.as_numpy_iterator())
    assert set(result) == {"id", "image", "mask"}
    assert result["id"].decode() == _image_id(annotation)
    np.testing.assert_array_equal(result["image"], example["image"])
    rgb = example["panoptic_image"]
    np.testing.assert_array_equal(
        result["mask"][..., 0], reference_mask(rgb, annotation["segments_info"], class_of_category))


# ---------------------------------------------------------------- errors
def _config(tmp_path, **data):
  config = config_lib.base_config()
  config.data.name = "coco"
  config.data.num_classes = 81
  config.data.data_dir = str(tmp_path)
  config.data.eval_split = "validation"
  config.method = "pseudoseg"
  config.data.update(data)
  return config


def test_unprepared_builder_error_names_the_data_dir_and_the_archives(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    coco.load_coco(_config(tmp_path / "empty"))
  message = str(error.value)
  assert str(tmp_path / "empty") in message and "config.data.data_dir" in message
  for archive in ("train2017.zip", "val2017.zip", "panoptic_annotations_trainval2017.zip",
                  "--manual_dir"):
    assert archive in message


def test_num_classes_mismatch_is_refused(tmp_path):
  with pytest.raises(ValueError, match="config.data.num_classes=21"):
    coco.load_coco(_config(tmp_path, num_classes=21))
  with pytest.raises(ValueError, match="config.data.num_classes=81"):
    coco.load_coco_voc(_config(tmp_path, name="coco_voc"))


# ---------------------------------------------------------------- the loaders on a prepared builder
# A tiny coco/2017_panoptic prepared by TFDS's own builder from files laid out like the extracted
# archives. train: the two sample images under ids 1 and 2, and image 3, the first again with its
# people relabeled giraffe (so it holds no VOC class); validation: the sample as it is.
GIRAFFE_CATEGORY = 25


def _fake_split_entries(panoptic) -> dict:
  """split -> [(image info, panoptic annotation, the sample annotation whose files it uses)]."""
  first, second = panoptic["annotations"]
  info_by_id = {image["id"]: image for image in panoptic["images"]}
  giraffes = [dict(s, category_id=GIRAFFE_CATEGORY if s["category_id"] == 1 else s["category_id"])
              for s in first["segments_info"]]
  train = []
  for new_id, source, segments in ((1, first, first["segments_info"]),
                                   (2, second, second["segments_info"]), (3, first, giraffes)):
    stem = f"{new_id:012d}"
    train.append((dict(info_by_id[source["image_id"]], id=new_id, file_name=f"{stem}.jpg"),
                  dict(source, image_id=new_id, file_name=f"{stem}.png", segments_info=segments),
                  source))
  validation = [(info_by_id[a["image_id"]], a, a) for a in panoptic["annotations"]]
  return {"train2017": train, "val2017": validation}


def _write_extracted_archives(root, panoptic, sample_dir) -> None:
  """root/images/{split}/*.jpg, root/annotations/annotations/panoptic_{split}.json and
  root/panoptic/{split}/*.png: what the builder reads once the archives are extracted."""
  (root / "annotations" / "annotations").mkdir(parents=True)
  for split, entries in _fake_split_entries(panoptic).items():
    content = dict(panoptic, images=[e[0] for e in entries], annotations=[e[1] for e in entries])
    (root / "annotations" / "annotations" / f"panoptic_{split}.json").write_text(
        json.dumps(content))
    for folder in ("images", "panoptic"):
      (root / folder / split).mkdir(parents=True)
    for image, annotation, source in entries:
      shutil.copy(sample_dir / "input_images" / source["file_name"].replace(".png", ".jpg"),
                  root / "images" / split / image["file_name"])
      shutil.copy(sample_dir / "panoptic_examples" / source["file_name"],
                  root / "panoptic" / split / annotation["file_name"])


@pytest.fixture(scope="module")
def prepared_data_dir(tmp_path_factory, panoptic, sample_dir):
  """A data_dir holding the tiny coco/2017_panoptic, built without any download."""
  root = tmp_path_factory.mktemp("coco_files")
  _write_extracted_archives(root, panoptic, sample_dir)
  data_dir = tmp_path_factory.mktemp("coco_data")

  def split_generators(builder, dl_manager):
    del dl_manager  # Nothing to download or extract.
    return [tfds.core.SplitGenerator(name=name, gen_kwargs=dict(
        image_dir=str(root / "images"), annotation_dir=str(root / "annotations"),
        split_name=split, annotation_type="panoptic", panoptic_dir=str(root / "panoptic" / split)))
            for name, split in (("train", "train2017"), ("validation", "val2017"))]

  builder = tfds.builder(coco.BUILDER_NAME, data_dir=str(data_dir))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(type(builder), "_split_generators", split_generators)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False))
  return data_dir


def _by_id(dataset) -> dict:
  return {e["id"].decode(): e for e in dataset.as_numpy_iterator()}


def test_load_coco_on_a_prepared_builder(prepared_data_dir, tmp_path, panoptic, sample_dir,
                                         monkeypatch):
  labeled_list = tmp_path / "1_of_3.txt"
  labeled_list.write_text("train2017/000000000002\n")
  source = coco.load_coco(_config(prepared_data_dir, labeled_list=str(labeled_list)))
  assert (source.num_labeled, source.num_unlabeled, source.num_eval) == (1, 2, 2)
  assert source.class_names == coco.CLASS_NAMES
  labeled = _by_id(source.labeled)
  assert list(labeled) == ["000000000002"]
  classes, counts = np.unique(labeled["000000000002"]["mask"], return_counts=True)
  assert dict(zip(classes.tolist(), counts.tolist())) == KNOWN_CLASS_PIXELS["000000439180"]
  assert sorted(_by_id(source.unlabeled)) == ["000000000001", "000000000003"]
  evaluated = _by_id(source.eval)
  assert sorted(evaluated) == ["000000142238", "000000439180"]
  class_of_category = _thing_of_category(panoptic["categories"])
  for annotation in panoptic["annotations"]:
    example = evaluated[_image_id(annotation)]
    assert example["image"].shape == example["mask"].shape[:2] + (3,)
    rgb = _read_rgb(sample_dir / "panoptic_examples" / annotation["file_name"])
    np.testing.assert_array_equal(
        example["mask"][..., 0],
        reference_mask(rgb, annotation["segments_info"], class_of_category))
  # The id list of train is cached next to the prepared data, and read back the second time.
  index_path = next(prepared_data_dir.glob("coco/2017_panoptic/*/pseudoseg_index_train.json"))
  cached = json.loads(index_path.read_text())
  assert sorted(cached["ids"]) == ["000000000001", "000000000002", "000000000003"]
  assert sorted(map(tuple, cached["things"])) == [(1, 8, 18), (1, 33), (24, 33)]
  monkeypatch.setattr(coco, "scan_split", lambda *args: pytest.fail("train was scanned again"))
  assert coco.load_coco(_config(prepared_data_dir, num_labeled=2)).num_unlabeled == 1


def test_split_scan_runs_without_autotuning(prepared_data_dir):
  # An autotuned iterator's release can wait out its model thread's sleep (pipeline.stream_options).
  builder = coco.prepared_builder(_config(prepared_data_dir))
  assert coco.ids_and_labels(builder, "validation").options().autotune.enabled is False
  index = coco.scan_split(builder, "validation", coco.thing_of_label(coco.label_names(builder)))
  assert sorted(index.ids) == ["000000142238", "000000439180"]


def test_load_coco_refuses_a_list_id_missing_from_train(prepared_data_dir, tmp_path):
  labeled_list = tmp_path / "bad.txt"
  labeled_list.write_text("train2017/000000000002\ntrain2017/000000999999\n")
  with pytest.raises(ValueError, match="000000999999"):
    coco.load_coco(_config(prepared_data_dir, labeled_list=str(labeled_list)))


def _fake_voc_split(config, split):
  """Stands in for voc.load_voc_split: one 4x4 image per split, its id naming the split."""
  del config
  example = {"id": tf.constant(f"voc_{split}"), "image": tf.zeros([4, 4, 3], tf.uint8),
             "mask": tf.fill([4, 4, 1], tf.constant(15, tf.uint8))}
  return tf.data.Dataset.from_tensors(example), 1


@pytest.mark.parametrize("unlabeled_split, expected_unlabeled",
                         [("", ["000000000003"]),
                          ("train+voc_train_aug", ["000000000003", "voc_train_aug"])])
def test_load_coco_voc_on_a_prepared_builder(prepared_data_dir, monkeypatch, unlabeled_split,
                                             expected_unlabeled):
  monkeypatch.setattr(voc, "load_voc_split", _fake_voc_split)
  config = _config(prepared_data_dir, name="coco_voc", num_classes=21, eval_split="val",
                   unlabeled_split=unlabeled_split)
  source = coco.load_coco_voc(config)
  assert source.class_names == voc.CLASS_NAMES
  # Images 1 and 2 hold people (and horses); image 3 only giraffes and a ball.
  assert (source.num_labeled, source.num_unlabeled, source.num_eval) == (
      2, len(expected_unlabeled), 1)
  labeled = _by_id(source.labeled)
  assert sorted(labeled) == ["000000000001", "000000000002"]
  classes, counts = np.unique(labeled["000000000002"]["mask"], return_counts=True)
  # person -> 15, horse -> 13, truck -> background.
  assert dict(zip(classes.tolist(), counts.tolist())) == {
      15: 28_784, 13: 31_728, 0: 360 * 640 - 28_784 - 31_728}
  assert sorted(_by_id(source.unlabeled)) == expected_unlabeled
  assert list(_by_id(source.eval)) == ["voc_val"]


def test_load_coco_voc_refuses_to_train_on_the_eval_split(prepared_data_dir):
  config = _config(prepared_data_dir, name="coco_voc", num_classes=21, eval_split="val",
                   unlabeled_split="train+voc_val")
  with pytest.raises(ValueError, match="config.data.eval_split"):
    coco.load_coco_voc(config)


# ---------------------------------------------------------------- the configs
def test_coco_config_splits_and_recipe():
  from configs import coco_pseudoseg
  config = coco_pseudoseg.get_config("split=1_512")
  config_lib.validate(config)
  assert (config.data.name, config.data.num_classes, config.method) == ("coco", 81, "pseudoseg")
  assert (config.crop_size, config.eval_crop_size, config.total_steps) == (513, 641, 200_000)
  assert (config.batch_size, config.pseudoseg.unlabeled_batch_size) == (64, 64)
  # The published split sizes of COCO train2017's 118,287 images.
  # By default the paper's published list; split_seed=N draws the same count instead.
  for split, size in (("1_512", 232), ("1_256", 463), ("1_128", 925), ("1_64", 1_849),
                      ("1_32", 3_697)):
    published = coco_pseudoseg.get_config(f"split={split}").data
    assert published.labeled_fraction == 0.0
    assert len(subsets.read_id_list(published.labeled_list)) == size
    drawn = coco_pseudoseg.get_config(f"split={split},split_seed=2").data
    assert (drawn.labeled_list, drawn.split_seed) == ("", 2)
    assert subsets.fraction_size(118_287, drawn.labeled_fraction) == size
  listed = coco_pseudoseg.get_config("labeled_list=512_all.txt,method=supervised")
  assert (listed.data.labeled_list, listed.data.labeled_fraction) == ("512_all.txt", 0.0)
  assert listed.method == "supervised"
  with pytest.raises(ValueError, match="1_16"):
    coco_pseudoseg.get_config("split=1_16")


def test_coco_config_loads_the_prepared_builder(prepared_data_dir):
  from configs import coco_pseudoseg
  config = coco_pseudoseg.get_config("split=1_512,split_seed=0")  # A draw: 3 images, not the list.
  config.data.data_dir = str(prepared_data_dir)
  source = datasets.load_source(config)
  # ceil(3 / 512) = 1 of the 3 train images labeled, the other 2 unlabeled.
  assert (source.num_labeled, source.num_unlabeled, source.num_eval) == (1, 2, 2)


def test_coco_voc_config_loads_the_prepared_builder(prepared_data_dir, monkeypatch):
  from configs import coco_voc_pseudoseg
  monkeypatch.setattr(voc, "load_voc_split", _fake_voc_split)
  config = coco_voc_pseudoseg.get_config("voc_extra=true,weak_labels=true")
  config_lib.validate(config)
  assert config.pseudoseg.weak_labels and config.data.unlabeled_split == "train+voc_train_aug"
  config.data.data_dir = str(prepared_data_dir)
  source = datasets.load_source(config)
  assert (source.num_labeled, source.num_unlabeled, source.num_eval) == (2, 2, 1)
  assert coco_voc_pseudoseg.get_config("").data.unlabeled_split == "train"


def test_the_pipeline_takes_the_coco_voc_source(prepared_data_dir, monkeypatch):
  """The mixed COCO + VOC unlabeled pool and the labeled COCO images feed the training streams."""
  from pseudoseg_jax.data import pipeline
  monkeypatch.setattr(voc, "load_voc_split", _fake_voc_split)
  config = _config(prepared_data_dir, name="coco_voc", num_classes=21, eval_split="val",
                   unlabeled_split="train+voc_train_aug")
  source = coco.load_coco_voc(config)
  stream_args = dict(batch_size=2, crop_size=33, ignore_label=255, num_classes=21, seed=0)
  labeled = next(iter(pipeline.labeled_stream(source.labeled, **stream_args)))
  assert labeled["mask"].shape == (2, 33, 33)
  assert set(np.unique(labeled["mask"]).tolist()) <= {0, 13, 15, 255}
  unlabeled = next(iter(pipeline.unlabeled_stream(source.unlabeled, **stream_args)))
  assert unlabeled["weak_image"].shape == (2, 33, 33, 3)
