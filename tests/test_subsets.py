"""Labeled/unlabeled selection: the published list files work as they are; seeded draws are stable."""

import numpy as np
import pytest
import tensorflow as tf

from pseudoseg_jax import recipes
from pseudoseg_jax.data import split_lists
from pseudoseg_jax.data.datasets import subsets


@pytest.mark.parametrize("pool, fraction, size", [
    (1464, 1 / 16, 92), (1464, 1 / 8, 183), (1464, 1 / 4, 366), (1464, 1 / 2, 732),
    (10582, 1 / 16, 662), (10582, 1 / 8, 1323), (10582, 1 / 4, 2646), (10582, 1 / 2, 5291),
    (118287, 1 / 512, 232), (118287, 1 / 256, 463), (118287, 1 / 128, 925),
    (118287, 1 / 64, 1849), (118287, 1 / 32, 3697)])
def test_fraction_sizes_match_the_published_splits(pool, fraction, size):
  assert subsets.fraction_size(pool, fraction) == size


def read_shipped(file: str) -> list[str]:
  return subsets.read_id_list(split_lists.path_of(file))


@pytest.mark.parametrize("key", sorted(split_lists.PUBLISHED))
def test_every_shipped_list_holds_its_published_count_of_distinct_ids(key):
  file, count = split_lists.PUBLISHED[key]
  ids = subsets.read_id_list(split_lists.published_list(*key))
  assert len(ids) == len(set(ids)) == count, file


def test_shipped_lists_parse_as_they_are_and_lie_in_their_pools():
  train_aug = read_shipped(split_lists.VOC_TRAIN_AUG[0])
  assert len(train_aug) == split_lists.VOC_TRAIN_AUG[1]
  assert len(read_shipped(split_lists.VOC_VAL[0])) == split_lists.VOC_VAL[1]
  clean = read_shipped("pascal_voc/classic/1464.txt")
  assert all(len(i) == 11 and i[4] == "_" for i in clean)
  subsets.check_ids_exist(clean, train_aug, what="1464.txt", where="train_aug")
  for (dataset, split), (file, _) in split_lists.PUBLISHED.items():
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
    split_lists.published_list("voc", "1_3")


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


def test_voc_split_names_choose_the_protocol():
  from pseudoseg_jax import config as config_lib
  config = config_lib.base_config()
  recipes.voc_data(config, "183")
  assert (config.data.train_split, config.data.num_labeled,
          config.data.unlabeled_includes_labeled) == ("train", 183, True)
  recipes.voc_data(config, "1_8")
  assert (config.data.train_split, config.data.num_labeled, config.data.labeled_fraction,
          config.data.unlabeled_includes_labeled) == ("train_aug", 0, 0.125, False)
  with pytest.raises(ValueError, match="Unknown VOC split '1_3'"):
    recipes.voc_data(config, "1_3")
