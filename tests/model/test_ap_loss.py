import pytest
import torch
import torch.nn.functional as F

from model.ap_loss import APLoss, ap_loss, quantize, quantized_ap


def slow_kernel(s: float, m: int, bins: int) -> float:
    """Triangular kernel of bin m (0 = highest) at score s, open-ended at both ends."""
    delta = 2.0 / (bins - 1)
    centre = 1.0 - m * delta
    if m == 0 and s >= centre:
        return 1.0
    if m == bins - 1 and s <= centre:
        return 1.0
    return max(0.0, 1.0 - abs(s - centre) / delta)


def slow_batch_loss(emb: torch.Tensor, labels: list[int], bins: int) -> float:
    """Python loops over queries, bins and candidates: 1 - mean quantised AP (Revaud et al.)."""
    x = F.normalize(emb.double(), dim=1).tolist()
    n = len(labels)
    aps = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        n_pos = sum(labels[j] == labels[i] for j in others)
        if n_pos == 0:
            continue
        cum_hits = cum_count = ap = 0.0
        for m in range(bins):
            hits = count = 0.0
            for j in others:
                s = sum(a * b for a, b in zip(x[i], x[j]))
                k = slow_kernel(s, m, bins)
                count += k
                hits += k if labels[j] == labels[i] else 0.0
            cum_hits += hits
            cum_count += count
            if cum_count > 0:
                ap += (cum_hits / cum_count) * (hits / n_pos)
        aps.append(ap)
    return 1.0 - sum(aps) / len(aps)


@pytest.mark.parametrize("bins", [10, 20, 25])
def test_value_matches_slow_reference(bins):
    torch.manual_seed(0)
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 3, 4]   # item 4 has no positive: left out of the mean
    emb = torch.randn(len(labels), 6)
    emb[:3] += 1.5                              # some structure, so AP is far from trivial
    got = APLoss(bins)(emb, torch.tensor(labels))
    want = slow_batch_loss(emb, labels, bins)
    assert got.item() == pytest.approx(want, abs=1e-5)
    assert ap_loss(emb, torch.tensor(labels), bins).item() == got.item()
    assert 0.0 < got.item() < 1.0


def test_quantize_weights_sum_to_one_and_end_bins_open():
    s = torch.linspace(-1.0, 1.0, 101).view(1, -1)
    q = quantize(s, bins=20)
    assert q.shape == (1, 20, 101)
    assert torch.allclose(q.sum(dim=1), torch.ones(1, 101), atol=1e-6)
    q_out = quantize(torch.tensor([[1.5, -3.0]]), bins=20)
    assert q_out[0, 0, 0] == 1 and q_out[0, -1, 1] == 1
    assert q_out[0, :, 0].sum() == 1 and q_out[0, :, 1].sum() == 1


def test_raising_a_positive_similarity_lowers_the_loss():
    # one query, ranked list: pos 0.9, neg 0.15, pos 0.1, neg -0.3 (AP < 1); the negative
    # shares a bin with the low positive (a negative alone in a bin without positives has no
    # effect on quantised AP, hence no gradient)
    scores = torch.tensor([[0.9, 0.15, 0.1, -0.3]], requires_grad=True)
    positives = torch.tensor([[True, False, True, False]])
    loss = 1 - quantized_ap(scores, positives, bins=20).mean()
    loss.backward()
    assert scores.grad[0, 2] < 0          # pushing the low positive up helps
    assert scores.grad[0, 1] > 0          # pushing the negative beside it up hurts
    raised = torch.tensor([[0.9, 0.15, 0.3, -0.3]])
    assert 1 - quantized_ap(raised, positives, bins=20).mean() < loss.detach()
    assert 1 - quantized_ap(raised, positives, bins=20).mean() < 0.05  # now above the negative


def test_gradient_step_on_embeddings_lowers_loss_and_pulls_positives_together():
    torch.manual_seed(3)
    labels = torch.arange(8).repeat_interleave(4)
    emb = torch.randn(32, 16, requires_grad=True)
    fn = APLoss(20)
    opt = torch.optim.SGD([emb], lr=5.0)

    def pos_sim():
        x = F.normalize(emb.detach(), dim=1)
        same = (labels[:, None] == labels[None]) & ~torch.eye(32, dtype=torch.bool)
        return (x @ x.t())[same].mean().item()

    start_loss, start_sim = fn(emb, labels).item(), pos_sim()
    for _ in range(20):
        opt.zero_grad()
        loss = fn(emb, labels)
        loss.backward()
        opt.step()
    assert fn(emb, labels).item() < start_loss - 0.1
    assert pos_sim() > start_sim


def test_perfectly_separated_embeddings_give_ap_one():
    labels = torch.arange(5).repeat_interleave(3)
    emb = torch.eye(5)[labels] * 3.0     # same item identical, different items orthogonal
    loss = APLoss(20)(emb, labels)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_no_positive_pairs_gives_zero_loss_with_grad_and_bad_shapes_raise():
    emb = torch.randn(4, 3, requires_grad=True)
    loss = APLoss()(emb, torch.arange(4))
    assert loss.item() == 0.0
    loss.backward()
    assert emb.grad is not None
    with pytest.raises(ValueError, match="labels"):
        APLoss()(torch.randn(4, 3), torch.arange(3))
    with pytest.raises(ValueError, match="bins"):
        APLoss(bins=1)
