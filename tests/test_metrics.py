"""vafunc.metrics against scikit-learn's confusion matrix and Jaccard scores, and against the
definitions of torchvision's segmentation reference script, on made-up label maps with ignored pixels."""

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion
from sklearn.metrics import jaccard_score, recall_score

import vafunc.metrics as M

C = 5


def label_maps(seed=0, shape=(3, 17, 23)):
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, C, shape, generator=g)
    pred = torch.where(torch.rand(shape, generator=g) < 0.6, target, torch.randint(0, C, shape, generator=g))
    target[torch.rand(shape, generator=g) < 0.1] = 255  # VOC's boundary pixels
    return pred, target


def test_confusion_matrix_equals_sklearn():
    pred, target = label_maps()
    keep = target != 255
    want = sk_confusion(target[keep].numpy(), pred[keep].numpy(), labels=list(range(C)))
    got = M.confusion_matrix(pred, target, C)
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), want)
    # batches add up
    a = M.confusion_matrix(pred[:1], target[:1], C) + M.confusion_matrix(pred[1:], target[1:], C)
    assert torch.equal(a, got)


def test_scores_equal_sklearn_and_the_reference_definitions():
    pred, target = label_maps(1)
    keep = target != 255
    t, p = target[keep].numpy(), pred[keep].numpy()
    s = M.segmentation_scores(M.confusion_matrix(pred, target, C))
    np.testing.assert_allclose(s["iou"].numpy(), jaccard_score(t, p, labels=list(range(C)), average=None))
    np.testing.assert_allclose(s["class_accuracy"].numpy(), recall_score(t, p, labels=list(range(C)), average=None))
    assert s["pixel_accuracy"] == pytest.approx((t == p).mean())
    # every class occurs: the mean is the reference script's plain mean of the IoUs
    assert s["mean_iou"] == pytest.approx(float(jaccard_score(t, p, average="macro")))


def test_absent_class_is_nan_and_left_out_of_the_mean():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 2, 3]])  # class 3 predicted only on an ignored pixel; class 4 nowhere
    s = M.segmentation_scores(M.confusion_matrix(pred, target, 5))
    assert torch.isnan(s["iou"][3]) and torch.isnan(s["iou"][4])
    assert s["mean_iou"] == pytest.approx((1 / 2 + 2 / 3 + 1) / 3)
    assert s["pixel_accuracy"] == pytest.approx(4 / 5)


def test_bad_input_is_named():
    pred, target = label_maps()
    with pytest.raises(TypeError, match="integer tensor"):
        M.confusion_matrix(pred.float(), target, C)
    with pytest.raises(ValueError, match="one shape"):
        M.confusion_matrix(pred[:1], target, C)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        M.confusion_matrix(pred, target.clamp(max=2), 3)
    with pytest.raises(ValueError, match="positive int"):
        M.confusion_matrix(pred, target, 0)
    with pytest.raises(ValueError, match="square"):
        M.segmentation_scores(torch.zeros(2, 3))
