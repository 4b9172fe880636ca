"""The generated synthetic-shapes dataset: determinism, mask properties, colour as a cue or not, TFDS build."""

import colorsys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from pseudoseg_jax.data.datasets import synthetic_shapes as shapes

NUM_SCENES = 200


@pytest.fixture(scope="module")
def scenes():
  return [shapes.render_scene(shapes.example_rng("train", i)) for i in range(NUM_SCENES)]


def _neighbour_pairs(mask):
  """(a, b) label pairs of all horizontally and vertically adjacent pixels."""
  return (np.concatenate([mask[:, :-1].ravel(), mask[:-1, :].ravel()]),
          np.concatenate([mask[:, 1:].ravel(), mask[1:, :].ravel()]))


# ---------------------------------------------------------------- determinism
def test_same_split_and_index_give_identical_pixels():
  image_a, mask_a = shapes.render_example(shapes.example_rng("train", 17))
  image_b, mask_b = shapes.render_example(shapes.example_rng("train", 17))
  np.testing.assert_array_equal(image_a, image_b)
  np.testing.assert_array_equal(mask_a, mask_b)


def test_seed_sequence_is_accepted_like_a_generator():
  seed = np.random.SeedSequence([shapes.BASE_SEED, shapes.SPLIT_SEED_INDEX["train"], 17])
  image_a, mask_a = shapes.render_example(seed)
  image_b, mask_b = shapes.render_example(shapes.example_rng("train", 17))
  np.testing.assert_array_equal(image_a, image_b)
  np.testing.assert_array_equal(mask_a, mask_b)


def test_different_indices_and_splits_differ():
  images = [shapes.render_example(shapes.example_rng(split, i))[0]
            for split in ("train", "validation") for i in range(5)]
  for a in range(len(images)):
    for b in range(a + 1, len(images)):
      assert np.mean(images[a] != images[b]) > 0.5


# ---------------------------------------------------------------- image and mask properties
def test_image_and_mask_shapes_and_dtypes(scenes):
  for scene in scenes[:10]:
    assert scene.image.shape == (96, 96, 3) and scene.image.dtype == np.uint8
    assert scene.mask.shape == (96, 96) and scene.mask.dtype == np.uint8


def test_mask_values_are_classes_or_ignore(scenes):
  values = np.unique(np.stack([scene.mask for scene in scenes]))
  assert set(values.tolist()) <= set(range(shapes.NUM_CLASSES)) | {shapes.IGNORE_LABEL}
  # Every class and the band show up somewhere in 200 images.
  assert set(values.tolist()) == set(range(shapes.NUM_CLASSES)) | {shapes.IGNORE_LABEL}


def test_one_to_four_objects_each_visible_in_the_mask(scenes):
  counts = [len(scene.object_classes) for scene in scenes]
  assert min(counts) >= 1 and max(counts) <= shapes.MAX_OBJECTS == 4
  assert set(counts) == {1, 2, 3, 4}
  for scene in scenes:
    present = set(np.unique(scene.mask).tolist()) - {0, shapes.IGNORE_LABEL}
    assert present == set(scene.object_classes)
    for class_id in scene.object_classes:
      # Every object keeps MIN_CORE_PIXELS outside the band (same-class objects may share a class).
      assert np.sum(scene.mask == class_id) >= shapes.MIN_CORE_PIXELS


def test_image_labels_are_the_classes_present(scenes):
  for scene in scenes:
    expected = np.zeros(shapes.NUM_CLASSES - 1, np.uint8)
    expected[np.array(scene.object_classes) - 1] = 1
    labels = shapes.image_labels_from_mask(scene.mask)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, expected)


def test_no_two_adjacent_labelled_pixels_change_class(scenes):
  for scene in scenes:
    a, b = _neighbour_pairs(scene.mask)
    both_labelled = (a != shapes.IGNORE_LABEL) & (b != shapes.IGNORE_LABEL)
    assert np.all(a[both_labelled] == b[both_labelled])


def test_ignore_band_is_thin_and_around_every_object(scenes):
  for scene in scenes:
    ignore = scene.mask == shapes.IGNORE_LABEL
    assert ignore.any()
    # Band, not blobs: ignored pixels lie within 2 px (Chebyshev) of a labelled one, except in rare
    # slivers (a thin spike or an almost hidden overlap is all band).
    labelled = np.pad(~ignore, 2)
    near_labelled = np.zeros_like(ignore)
    for dy in range(5):
      for dx in range(5):
        near_labelled |= labelled[dy:dy + 96, dx:dx + 96]
    assert np.sum(ignore & ~near_labelled) <= 10
    # Each foreground class region touches the band (it surrounds objects, frame edges aside).
    a, b = _neighbour_pairs(scene.mask)
    for class_id in scene.object_classes:
      assert np.any((a == class_id) & (b == shapes.IGNORE_LABEL) |
                    (b == class_id) & (a == shapes.IGNORE_LABEL))


def _void_runs_between_classes(line):
  """Lengths of runs of IGNORE_LABEL in a 1-D label line bounded by two different labels."""
  labelled = np.flatnonzero(line != shapes.IGNORE_LABEL)
  gaps = np.diff(labelled) - 1
  changes = line[labelled[:-1]] != line[labelled[1:]]
  return gaps[changes]


def test_ignore_band_spans_at_least_two_pixels_across_every_class_change(scenes):
  # The anti-aliased ramp is 1 px wide, centred on the true edge; a band of >= 2 px across the
  # change covers it whichever pixel the edge falls in.
  runs = np.concatenate([_void_runs_between_classes(line) for scene in scenes[:50]
                         for line in (*scene.mask, *scene.mask.T)])
  assert runs.size > 1000
  assert runs.min() >= 2
  assert np.median(runs) <= 3  # "a few pixels", not a blanket


def test_colour_does_not_identify_the_class(scenes):
  """Nearest-class-mean on each object's mean colour, fit on half the scenes, scores near chance."""
  colours, classes = [], []
  for scene in scenes:
    for class_id in sorted(set(scene.object_classes)):
      colours.append(scene.image[scene.mask == class_id].mean(axis=0))
      classes.append(class_id)
  colours, classes = np.array(colours), np.array(classes)
  half = len(classes) // 2
  class_means = np.stack([colours[:half][classes[:half] == c].mean(axis=0)
                          for c in range(1, shapes.NUM_CLASSES)])
  distances = np.linalg.norm(colours[half:, None, :] - class_means[None], axis=-1)
  accuracy = np.mean(np.argmin(distances, axis=1) + 1 == classes[half:])
  chance = 1 / (shapes.NUM_CLASSES - 1)
  assert len(classes) > 300
  assert accuracy < chance + 0.1, accuracy
  # And no class's mean colour sits far from the overall mean (uniform colours: std ~74 per channel).
  assert np.all(np.abs(class_means - colours[:half].mean(axis=0)) < 40)


def hsv_of(rgb):
  """float [n, 3] RGB in [0, 255] -> (hue in turns, saturation) arrays, as colorsys.rgb_to_hsv."""
  return np.array([colorsys.rgb_to_hsv(*(colour / 255))[:2] for colour in rgb]).T


@pytest.fixture(scope="module")
def colour_cue_scenes():
  return [shapes.render_scene(shapes.example_rng("train", i), class_colours=True)
          for i in range(NUM_SCENES)]


def test_colour_cue_hue_names_the_class_often_but_not_always(colour_cue_scenes):
  """The nearest class hue (class k's is (k - 1) / 7 of a turn) names an object's class about 70%
  of the time (hue sd 25 degrees, classes 51 apart): a cue well above chance, not the answer."""
  colours, classes = [], []
  for scene in colour_cue_scenes:
    for class_id in sorted(set(scene.object_classes)):
      colours.append(scene.image[scene.mask == class_id].mean(axis=0))
      classes.append(class_id)
  hues, saturations = hsv_of(np.array(colours))
  class_hues = np.arange(shapes.NUM_CLASSES - 1) / (shapes.NUM_CLASSES - 1)
  turns = np.abs(hues[:, None] - class_hues[None])
  nearest = np.argmin(np.minimum(turns, 1 - turns), axis=1) + 1
  accuracy = np.mean(nearest == np.array(classes))
  assert len(classes) > 300
  assert 0.55 < accuracy < 0.85, accuracy
  assert np.median(saturations) > 0.4


def test_colour_cue_backgrounds_are_greyish_and_the_default_ones_are_not(scenes, colour_cue_scenes):
  def background_saturation(scene_list):
    background = np.concatenate([scene.image[scene.mask == 0][::50] for scene in scene_list[:20]])
    return np.median(hsv_of(background.astype(np.float64))[1])
  assert background_saturation(colour_cue_scenes) < 0.15
  assert background_saturation(scenes) > 0.25


# ---------------------------------------------------------------- TFDS builder
@pytest.fixture(scope="module")
def tiny_builder(tmp_path_factory):
  builder = shapes.SyntheticShapes(config="tiny", data_dir=str(tmp_path_factory.mktemp("tfds")))
  builder.download_and_prepare()
  return builder


def test_tiny_build_has_the_configured_split_sizes(tiny_builder):
  assert tiny_builder.info.splits["train"].num_examples == 40
  assert tiny_builder.info.splits["validation"].num_examples == 20
  assert str(tiny_builder.info.version) == "1.1.0"


def test_tiny_build_reads_back_the_rendered_examples(tiny_builder):
  dataset = tfds.as_numpy(tiny_builder.as_dataset(split="validation"))
  for index, example in enumerate(dataset):
    assert example["id"].decode() == f"validation_{index:06d}"
    assert example["image"].shape == (96, 96, 3) and example["image"].dtype == np.uint8
    assert example["mask"].shape == (96, 96, 1) and example["mask"].dtype == np.uint8
    assert example["image_labels"].shape == (shapes.NUM_CLASSES - 1,)
    assert example["image_labels"].dtype == np.uint8
    image, mask = shapes.render_example(shapes.example_rng("validation", index))
    np.testing.assert_array_equal(example["image"], image)  # PNG is lossless
    np.testing.assert_array_equal(example["mask"][..., 0], mask)
    np.testing.assert_array_equal(example["image_labels"], shapes.image_labels_from_mask(mask))
  assert index == 19


def test_split_slices_are_stable_and_in_index_order(tiny_builder):
  def ids(split):
    return [example["id"].decode() for example in tfds.as_numpy(tiny_builder.as_dataset(split=split))]

  assert ids("train[:10]") == [f"train_{i:06d}" for i in range(10)]
  assert ids("train[:10]") == ids("train[:10]")
  assert ids("train[10:]") == [f"train_{i:06d}" for i in range(10, 40)]


def test_default_config_sizes():
  config = shapes.SyntheticShapes.BUILDER_CONFIGS[0]
  assert config.name == "default" and config.num_train >= 2000 and config.num_validation >= 300
  assert shapes.CLASS_NAMES[0] == "background" and len(shapes.CLASS_NAMES) == shapes.NUM_CLASSES >= 7
