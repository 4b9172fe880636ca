"""The remedies for confirmation bias (config.pseudoseg: teacher, cutmix_probability,
class_balanced_fraction, distribution_alignment, claim_present_classes, batch_stats_from): known
answers for each piece, then one tiny step with all of them."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pseudoseg_jax import config as config_lib
from pseudoseg_jax import mixing, pseudo_labels, steps
from tests.test_pseudoseg_step import IGNORE as IGNORE_LABEL
from tests.test_pseudoseg_step import NUM_CLASSES, random_batch, tiny_config


def test_ema_update_known_answer():
  teacher = {"params": {"w": jnp.array([1.0, 2.0])}, "batch_stats": {"m": jnp.array([0.0])}}
  updated = steps.ema_update(teacher, {"w": jnp.array([3.0, 2.0])}, {"m": jnp.array([10.0])},
                             decay=0.75)
  np.testing.assert_allclose(updated["params"]["w"], [1.5, 2.0])
  np.testing.assert_allclose(updated["batch_stats"]["m"], [2.5])


def test_ema_decay_warms_up_as_the_running_average():
  np.testing.assert_allclose([steps.ema_decay_at(0.99, s) for s in (0, 1, 3, 99, 1000)],
                             [0.0, 0.5, 0.75, 0.99, 0.99], rtol=1e-6)


def test_recent_ema_warmup_is_tfs_num_updates_schedule():
  np.testing.assert_allclose([steps.ema_decay_at(0.99, s, "recent") for s in (0, 10, 90, 2000)],
                             [0.1, 0.55, 0.91, 0.99], rtol=1e-6)


def test_box_masks_cover_the_pixels_whose_centres_are_inside():
  boxes = mixing.box_masks(top=jnp.array([1.0, 0.0]), left=jnp.array([2.0, 0.0]),
                           box_height=jnp.array([2.0, 4.0]), box_width=jnp.array([1.5, 4.0]),
                           boxed=jnp.array([True, False]), height=4, width=5)
  expected = np.zeros((2, 4, 5), bool)
  expected[0, 1:3, 2:3] = True  # Columns 2.5 in [2, 3.5); 3.5 is not.
  np.testing.assert_array_equal(boxes, expected)


def test_mix_takes_the_box_from_the_next_image_cyclically():
  labels = jnp.stack([jnp.full((3, 3), i) for i in range(3)])
  boxes = jnp.zeros((3, 3, 3), bool).at[:, 0, 0].set(True)
  mixed = np.asarray(mixing.mix(labels, boxes))
  np.testing.assert_array_equal(mixed[:, 0, 0], [1, 2, 0])
  np.testing.assert_array_equal(mixed[:, 1:, :], np.asarray(labels)[:, 1:, :])
  one_hot = jax.nn.one_hot(labels, 3)
  np.testing.assert_array_equal(np.argmax(mixing.mix(one_hot, boxes), -1), mixed)


def test_random_boxes_respect_probability_and_area():
  boxes = np.asarray(mixing.random_boxes(jax.random.key(0), 400, 40, 40, probability=0.5))
  areas = boxes.mean(axis=(1, 2))
  boxed = areas > 0
  assert 0.4 < boxed.mean() < 0.6
  assert areas[boxed].min() >= 0.005 and areas[boxed].max() <= 0.45
  assert not np.asarray(mixing.random_boxes(jax.random.key(1), 8, 9, 9, probability=0.0)).any()


def test_class_balanced_confidence_keeps_the_top_fraction_of_each_class():
  # Class 0: confidences 0.99, 0.98, 0.97, 0.96; class 1: 0.6, 0.5, 0.4, 0.3.
  confidence = jnp.array([0.99, 0.98, 0.97, 0.96, 0.6, 0.5, 0.4, 0.3])
  labels = jnp.array([0, 0, 0, 0, 1, 1, 1, 1])
  other = jnp.zeros_like(confidence)  # Unnormalized is fine: only the max and argmax matter.
  probs = jnp.where(labels[:, None] == 0, jnp.stack([confidence, other], -1),
                    jnp.stack([other, confidence], -1)).reshape(1, 1, 8, 2)
  valid = jnp.ones((1, 1, 8))
  kept = np.asarray(pseudo_labels.class_balanced_confident(probs, valid, 0.95, 0.5))[0, 0]
  # Class 0 is above 0.95 everywhere; class 1 keeps its top half (quantile 0.5 = 0.45).
  np.testing.assert_array_equal(kept, [1, 1, 1, 1, 1, 1, 0, 0])
  # Invalid pixels do not set a class's quantile.
  valid = valid.at[0, 0, 4:6].set(0)
  kept = np.asarray(pseudo_labels.class_balanced_confident(probs, valid, 0.95, 0.5))[0, 0]
  np.testing.assert_array_equal(kept[6:], [1, 0])  # The quantile of {0.4, 0.3} is 0.35.


def test_per_class_quantiles_equal_numpys_nanquantile():
  rng = np.random.default_rng(0)
  values = rng.random((2, 5, 7)).astype(np.float32)
  labels = rng.integers(0, 4, (2, 5, 7))  # Class 4 of 5 never occurs: nan.
  is_valid = rng.random((2, 5, 7)) > 0.3
  labels[0, 0, :3], is_valid[0, 0, :3] = 3, True
  is_valid[labels == 3] = False
  is_valid[0, 0, 0] = True  # Class 3: a single valid value.
  for q in (0.0, 0.3, 0.5, 0.9, 1.0):
    got = np.asarray(pseudo_labels.per_class_quantiles(jnp.asarray(values), jnp.asarray(labels),
                                                       jnp.asarray(is_valid), 5, q))
    expected = [np.nanquantile(np.where(is_valid & (labels == c), values, np.nan), q)
                if (is_valid & (labels == c)).any() else np.nan for c in range(5)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # Bit for bit what one jnp.nanquantile per class (the former code) gives.
    one_per_class = [jnp.nanquantile(jnp.where(jnp.asarray(is_valid & (labels == c)),
                                               jnp.asarray(values), jnp.nan), q) for c in range(5)]
    np.testing.assert_array_equal(got, np.asarray(one_per_class))
    assert got[3] == values[0, 0, 0] and np.isnan(got[4])


def test_restricting_to_image_labels_moves_absent_classes_to_present_ones():
  probs = jnp.array([[[[0.1, 0.6, 0.3]]], [[[0.1, 0.6, 0.3]]]])  # [2, 1, 1, 3]
  labels = jnp.array([[0.0, 1.0], [1.0, 1.0]])  # Image 0 lacks class 1.
  restricted = np.asarray(pseudo_labels.restrict_to_present_classes(probs, labels))
  np.testing.assert_allclose(restricted[0, 0, 0], [0.25, 0.0, 0.75], rtol=1e-6)
  np.testing.assert_allclose(restricted[1, 0, 0], [0.1, 0.6, 0.3], rtol=1e-6)


def test_claiming_scales_each_named_class_the_argmax_misses_to_its_peak_over_valid_pixels():
  # One image, four pixels, classes 0-3; its labels name classes 2 and 3, not class 1. Class 3 is
  # already the argmax of a valid pixel; class 2 only of the padding pixel, whose 0.8 sets no peak.
  probs = jnp.array([[0.6, 0.2, 0.1, 0.1], [0.5, 0.3, 0.05, 0.15], [0.1, 0.05, 0.8, 0.05],
                     [0.1, 0.1, 0.1, 0.7]]).reshape(1, 1, 4, 4)
  valid = jnp.array([[[1.0, 1.0, 0.0, 1.0]]])
  claimed = np.asarray(pseudo_labels.claim_present_classes(probs, jnp.array([[0.0, 1.0, 1.0]]),
                                                           valid))
  # Scales: class 2 by 1 / 0.1; classes 0 (never named), 1 (not named) and 3 (present) by 1.
  expected = np.asarray(probs).reshape(4, 4) * [1.0, 1.0, 10.0, 1.0]
  np.testing.assert_allclose(claimed.reshape(4, 4), expected / expected.sum(-1, keepdims=True),
                             rtol=1e-5)
  assert np.argmax(claimed[0, 0, 0]) == 2  # Class 2 now claims its likeliest pixel.
  # Named classes that the argmax already holds leave the probabilities as they are.
  held = pseudo_labels.claim_present_classes(probs, jnp.array([[0.0, 0.0, 1.0]]), valid)
  np.testing.assert_allclose(held, probs, rtol=1e-6)


def test_pseudo_labels_claim_the_classes_the_image_labels_name():
  config = tiny_config(pseudo_label_source="decoder", weak_labels=True, soft_labels=False,
                       claim_present_classes=True)
  # The last class is unlikely everywhere (as a rare class is), and image 0's labels name it.
  logits = jax.random.normal(jax.random.key(1), (2, 3, 3, NUM_CLASSES)).at[..., -1].add(-3.0)
  labels = jnp.zeros((2, NUM_CLASSES - 1)).at[0, -1].set(1.0)
  unlabeled = {"valid": jnp.ones((2, 3, 3), jnp.int32), "image_labels": labels}
  pseudo = steps.make_pseudo_labels(None, logits, unlabeled, config=config)
  claimed = pseudo_labels.claim_present_classes(jax.nn.softmax(logits, -1), labels,
                                                jnp.ones((2, 3, 3)))
  np.testing.assert_array_equal(np.argmax(pseudo["targets"], -1), np.argmax(claimed, -1))
  # Not vacuous: the claim moved some pixel of image 0 to the class it names, and none of
  # image 1, which names none.
  plain = np.argmax(logits, -1)
  moved = np.argmax(pseudo["targets"], -1) != plain
  assert np.all(np.argmax(pseudo["targets"], -1)[moved] == NUM_CLASSES - 1)
  assert moved[0].any() and not moved[1].any()


def test_without_image_labels_the_classifier_names_what_to_claim():
  config = tiny_config(soft_labels=True, temperature=1.0)
  graphdef, params, batch_stats = steps.init_model(config, 0)
  model = nnx.merge(graphdef, params, batch_stats)
  unlabeled = random_batch(2)["unlabeled"]
  unlabeled = {key: unlabeled[key] for key in ("weak_image", "valid")}  # No image labels.
  weak_logits = model(unlabeled["weak_image"], train=False)["logits"]
  fused = steps.make_pseudo_labels(model, weak_logits, unlabeled, config=config)
  config.pseudoseg.claim_present_classes = True
  claimed = steps.make_pseudo_labels(model, weak_logits, unlabeled, config=config)
  features = model.backbone_features(unlabeled["weak_image"], train=False)
  guess = pseudo_labels.predicted_image_labels(model.cls_head(features["stage4"], train=False,
                                                              rngs=None))
  np.testing.assert_allclose(
      claimed["targets"],
      pseudo_labels.claim_present_classes(fused["targets"], guess, fused["valid"]), rtol=1e-5,
      atol=1e-7)
  assert np.max(np.abs(claimed["targets"] - fused["targets"])) > 0.01  # The guess claimed some.


def test_config_refuses_claiming_classes_it_cannot_know():
  with pytest.raises(ValueError, match="claim_present_classes"):
    tiny_config(pseudo_label_source="decoder", claim_present_classes=True)
  tiny_config(pseudo_label_source="decoder", weak_labels=True, claim_present_classes=True)
  tiny_config(claim_present_classes=True)  # The fusion has the classifier's guess.


def test_distribution_alignment_known_answer():
  probs = jnp.array([0.5, 0.3, 0.2]).reshape(1, 1, 1, 3)
  aligned = pseudo_labels.align_distribution(probs, jnp.array([0.2, 0.3, 0.5]),
                                             jnp.array([0.4, 0.3, 0.3]))
  # Ratios 1/2, 1, 5/3: 0.25, 0.3, 1/3, over their sum 53/60.
  np.testing.assert_allclose(aligned.ravel(), np.array([0.25, 0.3, 1 / 3]) * 60 / 53, rtol=1e-5)
  uniform = jnp.full((3,), 1 / 3)
  np.testing.assert_allclose(pseudo_labels.align_distribution(probs, uniform, uniform), probs,
                             rtol=1e-6)


def test_distribution_alignment_strength_is_an_exponent_of_the_ratio():
  probs = jnp.array([0.5, 0.3, 0.2]).reshape(1, 1, 1, 3)
  target, predicted = jnp.array([0.2, 0.3, 0.5]), jnp.array([0.4, 0.3, 0.3])
  half = pseudo_labels.align_distribution(probs, target, predicted, strength=0.5)
  expected = np.array([0.5, 0.3, 0.2]) * np.sqrt([0.5, 1.0, 5 / 3])
  np.testing.assert_allclose(half.ravel(), expected / expected.sum(), rtol=1e-5)
  np.testing.assert_allclose(pseudo_labels.align_distribution(probs, target, predicted, 0.0),
                             probs, rtol=1e-6)


def test_debiasing_divides_by_the_teachers_prior_whatever_the_labeled_frequencies():
  """target 'uniform' (DebiasPL): p / prior^strength, renormalized; the labeled images' class
  shares, which 'labeled' would align to, play no part."""
  config = tiny_config(pseudo_label_source="decoder", soft_labels=True, temperature=1.0,
                       distribution_alignment=True, distribution_alignment_target="uniform",
                       distribution_alignment_strength=1.0)
  logits = jax.random.normal(jax.random.key(0), (2, 3, 3, NUM_CLASSES))
  unlabeled = {"valid": jnp.ones((2, 3, 3), jnp.int32)}
  prior = jnp.linspace(1.0, 2.0, NUM_CLASSES) / jnp.sum(jnp.linspace(1.0, 2.0, NUM_CLASSES))
  labeled = jnp.zeros(NUM_CLASSES).at[0].set(1.0)  # All background: ignored by 'uniform'.
  pseudo = steps.make_pseudo_labels(None, logits, unlabeled, config=config,
                                    class_frequencies={"labeled": labeled, "predicted": prior})
  debiased = jax.nn.softmax(logits, axis=-1) / prior
  np.testing.assert_allclose(pseudo["targets"], debiased / debiased.sum(-1, keepdims=True),
                             rtol=1e-4, atol=1e-6)
  config.pseudoseg.distribution_alignment_target = "labeled"
  aligned = steps.make_pseudo_labels(None, logits, unlabeled, config=config,
                                     class_frequencies={"labeled": labeled, "predicted": prior})
  assert np.all(np.argmax(aligned["targets"], -1) == 0)


def test_config_rejects_unknown_alignment_target_and_negative_strength():
  config = tiny_config()
  config.pseudoseg.distribution_alignment_target = "balanced"
  with pytest.raises(ValueError, match="distribution_alignment_target"):
    config_lib.validate(config)
  config = tiny_config()
  config.pseudoseg.distribution_alignment_strength = -1.0
  with pytest.raises(ValueError, match="distribution_alignment_strength"):
    config_lib.validate(config)


def test_class_frequencies_of_masks_and_of_probabilities():
  mask = jnp.array([[[0, 1], [1, IGNORE_LABEL]]])
  np.testing.assert_allclose(pseudo_labels.labeled_class_frequencies(mask, IGNORE_LABEL, 3),
                             [1 / 3, 2 / 3, 0.0], rtol=1e-6)
  probs = jnp.array([[[[1.0, 0.0], [0.5, 0.5]], [[0.0, 1.0], [0.2, 0.8]]]])  # [1, 2, 2, 2]
  valid = jnp.array([[[1.0, 1.0], [1.0, 0.0]]])  # The last pixel is padding.
  np.testing.assert_allclose(pseudo_labels.predicted_class_frequencies(probs, valid),
                             [0.5, 0.5], rtol=1e-6)


def test_config_rejects_unknown_teacher():
  config = tiny_config()
  config.pseudoseg.teacher = "mean"
  with pytest.raises(ValueError, match="pseudoseg.teacher"):
    config_lib.validate(config)


@pytest.fixture(scope="module")
def remedies_step():
  config = tiny_config(teacher="ema", ema_decay=0.9, cutmix_probability=1.0, soft_labels=False,
                       confidence_threshold=0.5, class_balanced_fraction=0.5, weak_labels=True,
                       distribution_alignment=True, distribution_alignment_momentum=0.9,
                       claim_present_classes=True)
  graphdef, _, state = steps.create_train_state(config, 0)
  step = jax.jit(functools.partial(steps.train_step, graphdef=graphdef, config=config))
  return config, state, step


def test_teacher_starts_as_the_model_and_follows_it(remedies_step):
  config, state, step = remedies_step
  for ours, teachers in zip(jax.tree.leaves(state.params), jax.tree.leaves(state.teacher["params"])):
    np.testing.assert_array_equal(ours, teachers)
  new_state, metrics = step(state, random_batch(0))
  assert bool(metrics["train/all_finite"])
  # At step 0 the warm-up makes the teacher the new model itself (decay 0).
  expected = new_state.params
  for got, want in zip(jax.tree.leaves(new_state.teacher["params"]), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  moved = [float(jnp.max(jnp.abs(a - b))) for a, b in
           zip(jax.tree.leaves(new_state.params), jax.tree.leaves(state.params))]
  assert max(moved) > 0


def test_class_frequencies_start_uniform_and_follow_the_batches(remedies_step):
  config, state, step = remedies_step
  uniform = np.full(NUM_CLASSES, 1 / NUM_CLASSES)
  np.testing.assert_allclose(state.class_frequencies["labeled"], uniform, rtol=1e-6)
  batch = random_batch(0)
  new_state, metrics = step(state, batch)
  assert steps.PREDICTED_FREQUENCIES not in metrics
  # Step 0's warm-up (decay 0) makes the running frequencies the batch's own.
  np.testing.assert_allclose(
      new_state.class_frequencies["labeled"],
      pseudo_labels.labeled_class_frequencies(batch["labeled"]["mask"], IGNORE_LABEL,
                                              NUM_CLASSES), rtol=1e-6)
  predicted = np.asarray(new_state.class_frequencies["predicted"])
  assert np.all(predicted > 0) and abs(predicted.sum() - 1) < 1e-5
  # Step 1 averages (decay 1/2) its batch into them.
  second_batch = random_batch(1)
  newer_state, _ = step(new_state, second_batch)
  np.testing.assert_allclose(
      newer_state.class_frequencies["labeled"],
      (new_state.class_frequencies["labeled"] + pseudo_labels.labeled_class_frequencies(
          second_batch["labeled"]["mask"], IGNORE_LABEL, NUM_CLASSES)) / 2, rtol=1e-5)


def test_pseudo_labels_of_the_teacher_are_mixed_with_the_strong_view(remedies_step):
  config, state, _ = remedies_step
  graphdef = steps.init_model(config, 0)[0]
  batch = random_batch(1)["unlabeled"]
  key = jax.random.key(3)
  images = jax.jit(functools.partial(steps.pseudo_label_images, graphdef=graphdef,
                                     config=config))(state.params, state.batch_stats, batch, key,
                                                     teacher=state.teacher)
  # Redo the mixing by hand: the same key split as unlabeled_forward.
  mix_key = jax.random.fold_in(key, 2)
  boxes = mixing.random_boxes(mix_key, 8, 33, 33, probability=1.0)
  expected_strong = np.where(np.asarray(boxes)[..., None], np.roll(batch["strong_image"], -1, 0),
                             batch["strong_image"])
  np.testing.assert_array_equal(images["strong_image"], expected_strong)
  truth_boxes = np.asarray(pseudo_labels.resize_nearest(boxes.astype(jnp.int32), (9, 9))) > 0
  unmixed_truth = np.asarray(pseudo_labels.resize_nearest(batch["mask"], (9, 9)))
  np.testing.assert_array_equal(images["ground_truth"],
                                np.where(truth_boxes, np.roll(unmixed_truth, -1, 0), unmixed_truth))


def test_config_rejects_unknown_batch_stats_source():
  config = tiny_config()
  config.pseudoseg.batch_stats_from = "unlabeled"
  with pytest.raises(ValueError, match="batch_stats_from"):
    config_lib.validate(config)


@pytest.mark.parametrize("source", ["all", "labeled"])
def test_batch_stats_from_labeled_ignore_the_unlabeled_images(source):
  # The teacher labels in inference mode, so only the student's strong pass can move the stats
  # beyond the labeled pass.
  config = tiny_config(teacher="ema", batch_stats_from=source)
  graphdef, params, batch_stats = steps.init_model(config, 0)
  teacher = {"params": params, "batch_stats": batch_stats}
  loss = jax.jit(functools.partial(steps.pseudoseg_loss, graphdef=graphdef, config=config))
  first, second = random_batch(0), random_batch(1)
  second["labeled"] = first["labeled"]
  key = jax.random.key(0)
  stats = [loss(params, batch_stats, batch, key, teacher=teacher)[1][0]
           for batch in (first, second)]
  differences = [float(jnp.max(jnp.abs(a - b))) for a, b in
                 zip(jax.tree.leaves(stats[0]), jax.tree.leaves(stats[1]))]
  moved = [float(jnp.max(jnp.abs(a - b))) for a, b in
           zip(jax.tree.leaves(stats[0]), jax.tree.leaves(batch_stats))]
  assert max(moved) > 1e-3  # The labeled pass moves them in both cases.
  if source == "labeled":
    assert max(differences) == 0.0
  else:
    assert max(differences) > 1e-3
