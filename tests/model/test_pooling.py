import math

import pytest
import torch
import torch.nn.functional as F

from model.pooling import RMAC, GeM, build_pooling, rmac_regions


def reference_rmac(x: torch.Tensor, L: int = 3, eps: float = 1e-6) -> torch.Tensor:
    """Literal transcription of cirtorch's `rmac` (Radenovic; after Tolias' rmac_regions.m):
    one slice and one max per region, whole map included. (B, C, H, W) -> (B, C) un-normalised."""
    ovr = 0.4
    steps = torch.tensor([2, 3, 4, 5, 6, 7], dtype=torch.float64)
    W, H = x.size(3), x.size(2)
    w = min(W, H)
    b = (max(H, W) - w) / (steps - 1)
    _, idx = torch.min(torch.abs(((w ** 2 - w * b) / w ** 2) - ovr), 0)
    Wd = Hd = 0
    if H < W:
        Wd = idx.item() + 1
    elif H > W:
        Hd = idx.item() + 1
    v = F.max_pool2d(x, (x.size(-2), x.size(-1)))
    v = v / (torch.norm(v, p=2, dim=1, keepdim=True) + eps)
    for l in range(1, L + 1):
        wl = math.floor(2 * w / (l + 1))
        wl2 = math.floor(wl / 2 - 1)
        b = 0 if l + Wd == 1 else (W - wl) / (l + Wd - 1)
        cenW = [math.floor(wl2 + i * b) - wl2 for i in range(l - 1 + Wd + 1)]
        b = 0 if l + Hd == 1 else (H - wl) / (l + Hd - 1)
        cenH = [math.floor(wl2 + i * b) - wl2 for i in range(l - 1 + Hd + 1)]
        for i_ in cenH:
            for j_ in cenW:
                if wl == 0:
                    continue
                R = x[:, :, i_:i_ + wl, j_:j_ + wl]
                vt = F.max_pool2d(R, (R.size(-2), R.size(-1)))
                vt = vt / (torch.norm(vt, p=2, dim=1, keepdim=True) + eps)
                v = v + vt
    return v.flatten(1)


@pytest.mark.parametrize("cls", [GeM, RMAC])
@pytest.mark.parametrize("hw", [(16, 8), (8, 4), (7, 7), (1, 1), (24, 40)])
def test_shapes_and_dtype(cls, hw):
    x = torch.rand(3, 32, *hw)
    out = cls()(x)
    assert out.shape == (3, 32)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_build_pooling_names_and_bad_input():
    x = torch.rand(2, 8, 6, 4)
    for name in ("avg", "max", "gem", "rmac"):
        assert build_pooling(name)(x).shape == (2, 8)
    with pytest.raises(ValueError, match="unknown pooling"):
        build_pooling("sum")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        RMAC()(torch.rand(2, 8))
    assert isinstance(build_pooling("gem", gem_p=4.0), GeM)


def test_gem_limits_match_avg_and_max():
    x = torch.rand(2, 5, 6, 4) + 0.1
    assert torch.allclose(GeM(p=1.0)(x), x.mean(dim=(2, 3)), atol=1e-6)
    # large p approaches the max
    assert torch.allclose(GeM(p=200.0)(x), x.amax(dim=(2, 3)), rtol=2e-2)


def test_gem_p_gets_gradient_and_moves():
    torch.manual_seed(0)
    pool = GeM(p=3.0)
    x = torch.rand(4, 16, 8, 4)
    opt = torch.optim.SGD(pool.parameters(), lr=0.5)
    # a target only reachable by changing p: the max-pooled descriptor wants p to grow
    target = x.amax(dim=(2, 3))
    before = pool.p.item()
    loss = ((pool(x) - target) ** 2).sum()
    loss.backward()
    assert pool.p.grad is not None and float(pool.p.grad) < 0
    opt.step()
    assert pool.p.item() > before
    with torch.no_grad():
        assert ((pool(x) - target) ** 2).sum() < loss


def test_gem_state_dict_layout_is_a_scalar_p():
    sd = GeM(p=4.0).state_dict()
    assert list(sd) == ["p"] and sd["p"].shape == () and float(sd["p"]) == 4.0


@pytest.mark.parametrize("hw", [(16, 8), (8, 16), (12, 12), (32, 16), (9, 5), (24, 40), (3, 2)])
def test_rmac_matches_slow_reference(hw):
    torch.manual_seed(1)
    x = torch.randn(2, 12, *hw)
    ref = reference_rmac(x)
    got = RMAC(normalize=False)(x)
    assert torch.allclose(got, ref, atol=1e-5)
    got_n = RMAC()(x)
    assert torch.allclose(got_n, ref / ref.norm(dim=1, keepdim=True), atol=1e-5)
    assert torch.allclose(got_n.norm(dim=1), torch.ones(2), atol=1e-5)


def test_rmac_region_grid_market_map():
    # 256x128 input with last stride 1 -> a 16x8 map: square side 8, 4 and 5 (levels 1..3),
    # 3 regions down the long side at level 1 (50% overlap is the closest to the 40% target)
    regions = rmac_regions(16, 8, 3)
    assert [r for r in regions if r[2] == 8] == [(0, 0, 8), (4, 0, 8), (8, 0, 8)]
    sides = sorted({r[2] for r in regions}, reverse=True)
    assert sides == [8, 5, 4]
    assert sum(r[2] == 5 for r in regions) == 2 * 4   # level 2: 2 across x (2 + 2) down
    assert sum(r[2] == 4 for r in regions) == 3 * 5
    for top, left, side in regions:       # every region inside the map
        assert 0 <= top and top + side <= 16 and 0 <= left and left + side <= 8
    # regions of a level cover the map's both ends
    for side in sides:
        lv = [r for r in regions if r[2] == side]
        assert min(r[0] for r in lv) == 0 and max(r[0] + side for r in lv) == 16
        assert min(r[1] for r in lv) == 0 and max(r[1] + side for r in lv) == 8


def test_rmac_is_differentiable_and_keeps_a_single_cell_peak():
    x = torch.rand(2, 6, 10, 6, requires_grad=True)
    out = RMAC()(x)
    out[:, 0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # a feature present only inside one cell still shows up (max pooling keeps it)
    y = torch.zeros(1, 3, 10, 6)
    y[0, 2, 9, 5] = 1.0
    d = RMAC()(y)
    assert d[0, 2] == pytest.approx(1.0, abs=1e-5) and d[0, :2].abs().max() < 1e-6
