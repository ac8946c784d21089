"""Each loss against a slow, obviously correct loop on small random tensors."""
import math

import pytest
import torch

from model.losses import CenterLoss, batch_hard_triplet, centroid_triplet, label_smoothed_ce


def _batch(P=4, M=3, D=5, seed=0, uneven=False):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(P).repeat_interleave(M)
    if uneven:  # one item with 2 images, one with a single image
        labels = torch.cat([labels, torch.tensor([P, P, P + 1])])
    perm = torch.randperm(len(labels), generator=g)
    labels = labels[perm] * 7 + 3  # arbitrary, non-contiguous label values
    return torch.randn(len(labels), D, generator=g, dtype=torch.float64), labels


def _dist(a, b):
    return math.sqrt(sum((float(x) - float(y)) ** 2 for x, y in zip(a, b)))


def slow_triplet(feat, labels, margin):
    losses = []
    for i in range(len(labels)):
        pos = [_dist(feat[i], feat[j]) for j in range(len(labels)) if j != i and labels[j] == labels[i]]
        neg = [_dist(feat[i], feat[j]) for j in range(len(labels)) if labels[j] != labels[i]]
        if pos and neg:
            losses.append(max(0.0, max(pos) - min(neg) + margin))
    return sum(losses) / len(losses)


def slow_ctl(feat, labels, margin):
    items = sorted(set(labels.tolist()))
    members = {c: [j for j in range(len(labels)) if labels[j] == c] for c in items}

    def mean(idx):
        return [sum(float(feat[j][d]) for j in idx) / len(idx) for d in range(feat.shape[1])]

    losses = []
    for i in range(len(labels)):
        own = int(labels[i])
        others = [j for j in members[own] if j != i]
        if not others:
            continue
        d_pos = _dist(feat[i], mean(others))
        d_neg = min(_dist(feat[i], mean(members[c])) for c in items if c != own)
        losses.append(max(0.0, d_pos - d_neg + margin))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("uneven", [False, True])
def test_batch_hard_triplet_matches_loop(seed, uneven):
    feat, labels = _batch(seed=seed, uneven=uneven)
    got = batch_hard_triplet(feat, labels, margin=0.5)
    assert got.item() == pytest.approx(slow_triplet(feat, labels, 0.5), rel=1e-5)
    got_big = batch_hard_triplet(feat, labels, margin=10.0)
    assert got_big.item() == pytest.approx(slow_triplet(feat, labels, 10.0), rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("uneven", [False, True])
def test_ctl_matches_loop(seed, uneven):
    feat, labels = _batch(seed=seed, uneven=uneven)
    for margin in (0.5, 10.0):
        got = centroid_triplet(feat, labels, margin=margin)
        assert got.item() == pytest.approx(slow_ctl(feat, labels, margin), rel=1e-5)


def test_ctl_positive_excludes_the_anchor():
    # item 0: two images at distance 2; item 1 far away. Leave-one-out centroid of each image of
    # item 0 is the OTHER image (distance 2), not the item mean (distance 1).
    feat = torch.tensor([[0.0, 0.0], [2.0, 0.0], [100.0, 0.0], [100.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # anchors of item 0: d_pos = 2, nearest other centroid (100, .5) at ~100 / ~98 -> no loss
    assert centroid_triplet(feat, labels, margin=0.5).item() == 0.0
    assert centroid_triplet(feat, labels, margin=200.0).item() == pytest.approx(
        slow_ctl(feat, labels, 200.0), rel=1e-6)


def test_losses_with_no_valid_anchor_are_zero_and_differentiable():
    feat = torch.randn(3, 4, requires_grad=True)
    labels = torch.tensor([0, 1, 2])  # every item has a single image: no positive
    for fn in (batch_hard_triplet, centroid_triplet):
        loss = fn(feat, labels)
        assert loss.item() == 0.0
        loss.backward()
    same = torch.tensor([5, 5, 5])  # one item only: no negative
    assert batch_hard_triplet(feat, same).item() == 0.0
    assert centroid_triplet(feat, same).item() == 0.0


def test_gradients_finite_with_duplicate_features():
    feat = torch.ones(4, 3, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1])
    (batch_hard_triplet(feat, labels) + centroid_triplet(feat, labels)).backward()
    assert torch.isfinite(feat.grad).all()


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothed_ce_matches_loop(eps):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    expect = 0.0
    for i in range(6):
        z = [float(v) for v in logits[i]]
        lse = math.log(sum(math.exp(v) for v in z))
        logp = [v - lse for v in z]
        target = [(1 - eps) * (k == int(labels[i])) + eps / 5 for k in range(5)]
        expect += -sum(t * lp for t, lp in zip(target, logp))
    expect /= 6
    assert label_smoothed_ce(logits, labels, eps).item() == pytest.approx(expect, rel=1e-5)


def test_center_loss_matches_loop_and_moves_centers():
    torch.manual_seed(0)
    crit = CenterLoss(num_classes=4, dim=3)
    feat = torch.randn(5, 3)
    labels = torch.tensor([0, 3, 3, 1, 0])
    c = crit.centers.detach()
    expect = sum(sum((float(feat[i, d]) - float(c[labels[i], d])) ** 2 for d in range(3))
                 for i in range(5)) / 5
    loss = crit(feat, labels)
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    opt = torch.optim.SGD(crit.parameters(), lr=0.5)
    loss.backward()
    assert crit.centers.grad[2].abs().sum() == 0  # class 2 absent from the batch
    opt.step()
    assert crit(feat, labels).item() < loss.item()
