"""Segmentation metrics: the confusion matrix and the scores read from it.

The definitions are those of torchvision's segmentation reference script (``references/
segmentation``), which the published mIoU and pixel accuracies of the segmentation checkpoints
come from: pixels whose target is outside ``[0, num_classes)`` (``ignore_index``, 255 in VOC and
in the COCO-with-VOC-labels subset) are not counted; rows of the matrix are the true classes,
columns the predicted ones; a class's IoU is ``TP / (TP + FP + FN)``, its accuracy ``TP / (TP + FN)``;
pixel accuracy is the trace over the total.

Confusion matrices of batches add up (``a + b``), so a data set's matrix is the sum of its
batches' (and, across processes, an ``all_reduce`` of it)::

    mat = sum(confusion_matrix(logits["out"].argmax(1), y, 21) for logits, y in batches)
    print(segmentation_scores(mat)["mean_iou"])
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["confusion_matrix", "segmentation_scores"]


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, *, ignore_index: int | None = 255) -> Tensor:
    """``[num_classes, num_classes]`` int64 counts of (true class, predicted class) over the pixels
    of ``pred`` and ``target`` (integer label maps of one shape, e.g. ``[N, H, W]``; pass
    ``logits.argmax(1)`` as ``pred``). Target pixels equal to ``ignore_index`` or outside
    ``[0, num_classes)`` are skipped; a predicted label outside that range is an error."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    for what, t in (("pred", pred), ("target", target)):
        if not isinstance(t, Tensor) or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            got = t.dtype if isinstance(t, Tensor) else type(t).__name__
            raise TypeError(f"{what} must be an integer tensor of class labels (argmax the logits), got {got}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    t, p = target.reshape(-1).long(), pred.reshape(-1).long()
    keep = (t >= 0) & (t < num_classes)
    if ignore_index is not None:
        keep &= t != ignore_index
    t, p = t[keep], p[keep]
    if p.numel() and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"predicted labels must lie in [0, {num_classes}), got {int(p.min())}..{int(p.max())}")
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).reshape(num_classes, num_classes)


def segmentation_scores(matrix: Tensor) -> dict[str, Tensor | float]:
    """The scores of a confusion matrix (:func:`confusion_matrix`, summed over a data set):

    * ``pixel_accuracy``: correct pixels over counted pixels (the reference's "global correct");
    * ``class_accuracy`` ``[C]``: per true class, ``TP / (TP + FN)``;
    * ``iou`` ``[C]``: per class, ``TP / (TP + FP + FN)``; NaN for a class that occurs in neither
      the targets nor the predictions;
    * ``mean_iou``: the mean of ``iou`` over the classes that occur. Where every class occurs this is
      the reference script's mean IoU; where one does not, the reference's mean is NaN.

    Scores are fractions (multiply by 100 for the published percentages)."""
    if not isinstance(matrix, Tensor) or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        raise ValueError(f"matrix must be a square [C, C] tensor of counts, got {shape}")
    h = matrix.double()
    tp = torch.diag(h)
    iou = tp / (h.sum(1) + h.sum(0) - tp)
    return {
        "pixel_accuracy": float(tp.sum() / h.sum()),
        "class_accuracy": tp / h.sum(1),
        "iou": iou,
        "mean_iou": float(iou.nanmean()),
    }
