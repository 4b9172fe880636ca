"""Labeled/unlabeled selection: the published list files work as they are; seeded draws are stable."""

import os

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from pseudoseg_jax import recipes
from pseudoseg_jax import splits
from pseudoseg_jax.data.datasets import subsets


@pytest.mark.parametrize("pool, fraction, size", [
    (1464, 1 / 16, 92), (1464, 1 / 8, 183), (1464, 1 / 4, 366), (1464, 1 / 2, 732),
    (10582, 1 / 16, 662), (10582, 1 / 8, 1323), (10582, 1 / 4, 2646), (10582, 1 / 2, 5291),
    (118287, 1 / 512, 232), (118287, 1 / 256, 463), (118287, 1 / 128, 925),
    (118287, 1 / 64, 1849), (118287, 1 / 32, 3697)])
def test_fraction_sizes_match_the_published_splits(pool, fraction, size):
  assert subsets.fraction_size(pool, fraction) == size


def read_shipped(file: str) -> list[str]:
  return subsets.read_id_list(splits.path_of(file))


@pytest.mark.parametrize("key", sorted(splits.PUBLISHED))
def test_every_shipped_list_holds_its_published_count_of_distinct_ids(key):
  file, count = splits.PUBLISHED[key]
  ids = subsets.read_id_list(splits.published_list(*key))
  assert len(ids) == len(set(ids)) == count, file


def test_shipped_lists_parse_as_they_are_and_lie_in_their_pools():
  train_aug = read_shipped(splits.VOC_TRAIN_AUG[0])
  assert len(train_aug) == splits.VOC_TRAIN_AUG[1]
  assert len(read_shipped(splits.VOC_VAL[0])) == splits.VOC_VAL[1]
  clean = read_shipped("pascal_voc/classic/1464.txt")
  assert all(len(i) == 11 and i[4] == "_" for i in clean)
  subsets.check_ids_exist(clean, train_aug, what="1464.txt", where="train_aug")
  for (dataset, split), (file, _) in splits.PUBLISHED.items():
    ids = read_shipped(file)
    if dataset == "coco":
      assert all(i.isdigit() and len(i) == 12 for i in ids), file
    elif split.isdigit():  # Classic: inside the 1,464 finely labeled images.
      subsets.check_ids_exist(ids, clean, what=file, where="1464.txt")
    else:
      subsets.check_ids_exist(ids, train_aug, what=file, where="train_aug")
  # The paper's lists are the classic ones (SOURCES.md says so).
  for paper, classic in (("16_clean_3", "92"), ("8_clean", "183"), ("4_clean", "366")):
    assert sorted(read_shipped(f"pascal_voc/pseudoseg/{paper}.txt")) == sorted(
        read_shipped(f"pascal_voc/classic/{classic}.txt"))


def test_an_unknown_published_split_is_refused_naming_the_known_ones():
  with pytest.raises(ValueError, match="No published voc list named '1_3'; known: 92, 183"):
    splits.published_list("voc", "1_3")


def test_id_from_line_formats():
  assert subsets.id_from_line("2007_000032") == "2007_000032"
  assert subsets.id_from_line("train2017/000000177254") == "000000177254"
  assert subsets.id_from_line(
      "JPEGImages/2007_000032.jpg SegmentationClassAug/2007_000032.png\n") == "2007_000032"


def test_bad_list_files_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    subsets.read_id_list(str(tmp_path / "nope.txt"))
  (tmp_path / "empty.txt").write_text("\n\n")
  with pytest.raises(ValueError, match="empty.txt is empty"):
    subsets.read_id_list(str(tmp_path / "empty.txt"))
  (tmp_path / "twice.txt").write_text("a\nb\na\n")
  with pytest.raises(ValueError, match="twice.txt lists 1 id"):
    subsets.read_id_list(str(tmp_path / "twice.txt"))
  (tmp_path / "ok.txt").write_text("a\nzz\n")
  with pytest.raises(ValueError, match="1 id\\(s\\) of split list .*ok.txt are not in pool: zz"):
    subsets.select_labeled_ids(["a", "b"], labeled_list=str(tmp_path / "ok.txt"),
                               pool_name="pool")


def test_seeded_draw_is_stable_and_ignores_pool_order():
  pool = [f"{i:04d}" for i in range(1000)]
  first = subsets.select_labeled_ids(pool, labeled_fraction=1 / 16, seed=3, pool_name="p")
  again = subsets.select_labeled_ids(pool[::-1], labeled_fraction=1 / 16, seed=3, pool_name="p")
  other = subsets.select_labeled_ids(pool, labeled_fraction=1 / 16, seed=4, pool_name="p")
  assert first == again and len(first) == 63 and first != other
  assert len(set(first)) == 63 and set(first) <= set(pool)
  assert subsets.select_labeled_ids(pool, pool_name="p") == pool
  with pytest.raises(ValueError, match="num_labeled=1001 exceeds the 1000"):
    subsets.select_labeled_ids(pool, num_labeled=1001, pool_name="p")
  with pytest.raises(ValueError, match="choose one"):
    subsets.select_labeled_ids(pool, num_labeled=5, labeled_fraction=0.5, pool_name="p")


def test_unlabeled_pool_excludes_labeled_unless_asked():
  pool, labeled = ["a", "b", "c", "d"], ["b", "d"]
  assert subsets.unlabeled_ids(pool, labeled, include_labeled=False) == ["a", "c"]
  assert subsets.unlabeled_ids(pool, labeled, include_labeled=True) == pool


def test_keep_ids_filters_a_dataset_in_order():
  dataset = tf.data.Dataset.from_tensor_slices(
      {"id": ["a", "b", "c", "d"], "value": np.arange(4)})
  kept = list(subsets.keep_ids(dataset, ["d", "b"]).as_numpy_iterator())
  assert [(e["id"], e["value"]) for e in kept] == [(b"b", 1), (b"d", 3)]


def voc_selection(split: str, labeled_list: str = "", split_seed=None):
  from pseudoseg_jax import config as config_lib
  data = config_lib.base_config().data
  data.split_seed = 0
  recipes.voc_data(ml_collections.ConfigDict({"data": data}), split, labeled_list, split_seed)
  return (data.train_split, os.path.basename(data.labeled_list), data.num_labeled,
          data.labeled_fraction, data.split_seed, data.unlabeled_includes_labeled)


def test_voc_split_names_choose_the_protocol_and_the_published_list():
  # Classic splits label the paper's own list and keep it in the unlabeled pool.
  assert voc_selection("92") == ("train", "16_clean_3.txt", 0, 0.0, 0, True)
  assert voc_selection("183") == ("train", "8_clean.txt", 0, 0.0, 0, True)
  assert voc_selection("1464") == ("train", "", 0, 0.0, 0, True)  # All of train.
  # Blended splits label the peers' list of train_aug and leave it out of the pool.
  assert voc_selection("1_8") == ("train_aug", "1_8.txt", 0, 0.0, 0, False)
  # split_seed opts into a draw of the same size; a list given by path wins over both.
  assert voc_selection("183", split_seed=3) == ("train", "", 183, 0.0, 3, True)
  assert voc_selection("1_8", split_seed=4) == ("train_aug", "", 0, 0.125, 4, False)
  assert voc_selection("92", "/lists/mine.txt", 5) == ("train", "mine.txt", 0, 0.0, 0, True)
  with pytest.raises(ValueError, match="Unknown VOC split '1_3'"):
    voc_selection("1_3")


def test_the_voc_configs_take_split_seed_as_an_argument():
  from configs import voc_pseudoseg, voc_supervised
  for module in (voc_pseudoseg, voc_supervised):
    assert os.path.basename(module.get_config("split=366").data.labeled_list) == "4_clean.txt"
    drawn = module.get_config("split=366,split_seed=7").data
    assert (drawn.labeled_list, drawn.num_labeled, drawn.split_seed) == ("", 366, 7)


def test_the_paper_configs_default_to_xception_with_its_weights_and_take_the_peers_resnets():
  from configs import coco_pseudoseg, coco_voc_pseudoseg, voc_pseudoseg, voc_supervised
  for module in (voc_pseudoseg, voc_supervised, coco_pseudoseg, coco_voc_pseudoseg):
    model = module.get_config("").model
    assert (model.backbone, model.init_from, model.separable_heads) == (
        "xception65", "xception65_imagenet", True)
    peers = module.get_config("backbone=resnet101")
    assert (peers.model.backbone, peers.model.init_from, peers.model.separable_heads,
            peers.optimizer.bias_lr_multiplier) == ("resnet101", "resnet101_torchvision", False, 1.0)
    with pytest.raises(ValueError, match="backbone='vgg16': one of xception65, resnet101"):
      module.get_config("backbone=vgg16")
