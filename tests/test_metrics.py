from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion

from alges_dist.metrics import confusion_matrix, paper_dice, scores_from_confusion


def _numpy_paper_dice(pred, target, n_classes, classes, ignore):
    out = []
    for p, t in zip(pred, target):
        valid = t != ignore
        per_class = []
        for k in classes:
            pk, tk = (p == k) & valid, (t == k) & valid
            per_class.append((2 * (pk & tk).sum() + 1) / (pk.sum() + tk.sum() + 1))
        out.append(np.mean(per_class))
    return np.array(out)


def test_paper_dice_on_hand_made_masks():
    target = torch.tensor([[[0, 0], [1, 1]]])
    pred = torch.tensor([[[0, 1], [1, 1]]])
    # class 0: P=1, T=2, inter=1 -> 3/4; class 1: P=3, T=2, inter=2 -> 5/6; class 2 absent -> 1
    got = paper_dice(pred, target, n_classes=3)
    assert got.item() == pytest.approx((3 / 4 + 5 / 6 + 1) / 3)
    only = paper_dice(pred, target, n_classes=3, classes=[1])
    assert only.item() == pytest.approx(5 / 6)


def test_paper_dice_matches_numpy_with_ignore_and_subset(seed):
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, 13, size=(4, 17, 23))
    target = rng.integers(0, 13, size=(4, 17, 23))
    target[:, 0, :] = 255
    classes = [0, 1, 2, 3, 4, 5, 9, 10]
    got = paper_dice(torch.from_numpy(pred), torch.from_numpy(target), n_classes=13, classes=classes)
    np.testing.assert_allclose(got.numpy(), _numpy_paper_dice(pred, target, 13, classes, 255), rtol=1e-6)


def test_confusion_and_scores_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, 5, size=(3, 31, 29))
    target = rng.integers(0, 5, size=(3, 31, 29))
    target[rng.random(target.shape) < 0.05] = 255
    cm = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), n_classes=5)
    valid = target != 255
    ref = sk_confusion(target[valid], pred[valid], labels=range(5))
    np.testing.assert_array_equal(cm.numpy(), ref)
    scores = scores_from_confusion(cm)
    tp = np.diag(ref)
    iou = tp / (ref.sum(0) + ref.sum(1) - tp)
    np.testing.assert_allclose(scores.iou.numpy(), iou, rtol=1e-6)
    np.testing.assert_allclose(scores.dice.numpy(), 2 * tp / (ref.sum(0) + ref.sum(1)), rtol=1e-6)
    assert scores.miou == pytest.approx(iou.mean(), rel=1e-6)


def test_absent_class_is_nan_not_zero():
    cm = confusion_matrix(torch.tensor([[0, 0]]), torch.tensor([[0, 0]]), n_classes=2)
    scores = scores_from_confusion(cm)
    assert scores.iou[0] == 1.0 and torch.isnan(scores.iou[1])
    assert scores.miou == 1.0


def test_label_errors_are_explained():
    with pytest.raises(ValueError, match="shape"):
        paper_dice(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long), n_classes=2)
    with pytest.raises(ValueError, match="outside 0..1"):
        paper_dice(torch.full((1, 2, 2), 4), torch.zeros(1, 2, 2, dtype=torch.long), n_classes=2)
    with pytest.raises(ValueError, match="argmax"):
        confusion_matrix(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), n_classes=2)


class _PredictsChannelZero(torch.nn.Module):
    """A 'model' whose prediction is written in the image: channel 0 holds the label map."""

    def __init__(self, n_classes: int):
        super().__init__()
        self.n_classes = n_classes

    def forward(self, images):
        return torch.nn.functional.one_hot(images[:, 0].long(), self.n_classes).permute(0, 3, 1, 2).float()


def test_evaluate_per_class_dice_matches_numpy_and_averages_to_the_paper_dice(seed):
    from alges_dist.evaluation import evaluate

    rng = np.random.default_rng(seed)
    pred = rng.integers(0, 4, size=(5, 9, 11))
    target = rng.integers(0, 4, size=(5, 9, 11))
    target[:, 0] = 255
    pred[pred == 3], target[target == 3] = 2, 2  # class 3 absent from both: paper Dice 1, dataset Dice None
    images = torch.from_numpy(np.repeat(pred[:, None], 3, axis=1)).float()
    batches = [(images[:3], torch.from_numpy(target[:3])), (images[3:], torch.from_numpy(target[3:]))]
    got = evaluate(_PredictsChannelZero(4), batches, n_classes=4, dice_classes=[0, 2, 3])
    per_class = np.array([_numpy_paper_dice(pred, target, 4, [k], 255).mean() for k in range(4)])
    np.testing.assert_allclose(got["dice_per_class"], per_class, rtol=1e-6)
    assert got["dice_per_class"][3] == 1.0
    assert got["dice"] == pytest.approx(np.mean(per_class[[0, 2, 3]]), rel=1e-6)
    valid = target != 255
    ref = sk_confusion(target[valid], pred[valid], labels=range(4))
    tp = np.diag(ref)
    np.testing.assert_allclose(got["dataset_dice_per_class"][:3], 2 * tp[:3] / (ref.sum(0) + ref.sum(1))[:3], rtol=1e-6)
    assert got["dataset_dice_per_class"][3] is None
    with pytest.raises(ValueError, match="dice_classes \\[7\\]"):
        evaluate(_PredictsChannelZero(4), batches, n_classes=4, dice_classes=[7])
