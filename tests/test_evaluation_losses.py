"""Known answers for the confusion matrix, mIoU and the masked losses."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from pseudoseg_jax import evaluation, losses

IGNORE = 255


def test_confusion_matrix_and_miou_match_hand_computation():
  labels = jnp.array([[[0, 0, 1], [1, 2, IGNORE]]])
  predictions = jnp.array([[[0, 1, 1], [1, 2, 0]]])
  confusion = np.asarray(evaluation.confusion_matrix(predictions, labels, 3, IGNORE))
  # Rows are ground truth, columns predictions; the ignored pixel (predicted 0) is not counted.
  np.testing.assert_array_equal(confusion, [[1, 1, 0], [0, 2, 0], [0, 0, 1]])
  summary = evaluation.summarize(confusion)
  # IoU_0 = 1 / (2 + 1 - 1), IoU_1 = 2 / (2 + 3 - 2), IoU_2 = 1 / (1 + 1 - 1).
  np.testing.assert_allclose(summary["val/iou_per_class"], [1 / 2, 2 / 3, 1.0])
  assert summary["val/miou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
  assert summary["val/pixel_accuracy"] == pytest.approx(4 / 5)


def test_absent_class_is_left_out_of_the_mean_and_out_of_range_labels_are_dropped():
  labels = jnp.array([[0, 1, 7]])  # 7 is neither a class of 4 nor the ignore label.
  predictions = jnp.array([[0, 0, 3]])
  confusion = np.asarray(evaluation.confusion_matrix(predictions, labels, 4, IGNORE))
  assert confusion.sum() == 2
  ious = evaluation.iou_per_class(confusion)
  assert ious[0] == pytest.approx(0.5) and ious[1] == 0.0
  assert math.isnan(ious[2]) and math.isnan(ious[3])
  summary = evaluation.summarize(confusion)
  assert summary["val/miou"] == pytest.approx(0.25)
  assert summary["val/iou_per_class"][2] is None


def test_masked_cross_entropy_known_answer_and_ignore():
  # Uniform logits over 4 classes: the loss is ln 4 at every valid pixel.
  logits = jnp.zeros((1, 2, 2, 4))
  labels = jnp.array([[[0, 3], [IGNORE, 2]]])
  assert float(losses.masked_cross_entropy(logits, labels, IGNORE)) == pytest.approx(math.log(4))
  # A confidently wrong prediction on an ignored pixel changes nothing.
  wrong = logits.at[0, 1, 0, 1].set(50.0)
  assert float(losses.masked_cross_entropy(wrong, labels, IGNORE)) == pytest.approx(math.log(4))
  # -log softmax([ln 3, 0])[0] = log(4/3).
  two = jnp.array([[[[math.log(3.0), 0.0]]]])
  assert float(losses.masked_cross_entropy(two, jnp.array([[[0]]]), IGNORE)) == pytest.approx(
      math.log(4 / 3), rel=1e-6)


def test_masked_cross_entropy_of_an_all_ignored_batch_is_zero_not_nan():
  logits = jnp.ones((2, 3, 3, 5))
  labels = jnp.full((2, 3, 3), IGNORE)
  assert float(losses.masked_cross_entropy(logits, labels, IGNORE)) == 0.0


def test_pixel_accuracy_counts_only_valid_pixels():
  logits = jnp.array([[[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]]])
  labels = jnp.array([[[0, 0, IGNORE]]])
  assert float(losses.pixel_accuracy(logits, labels, IGNORE)) == pytest.approx(0.5)
