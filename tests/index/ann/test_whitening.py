import numpy as np
import pytest

from contracts.vectors import l2_normalize
from index.ann.whitening import (
    CovarianceAccumulator,
    WhiteningError,
    fit_whitening,
    load_whitening,
)


def correlated(n: int, d: int, seed: int = 0, offset: float = 1.0) -> np.ndarray:
    """(n, d) float32 with a non-zero mean and a strongly non-isotropic covariance."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) * np.logspace(0, -2, d)[None, :]
    return (rng.normal(size=(n, d)) @ mix.T + offset * rng.normal(size=d)).astype(np.float32)


def test_round_trip_whitened_covariance_is_identity_and_dims(tmp_path):
    x = correlated(3000, 24)
    w = fit_whitening(x, dim=16)
    assert (w.input_dim, w.dim) == (24, 16)
    y = w.apply(x, normalize=False)
    assert y.shape == (3000, 16) and y.dtype == np.float32
    assert np.allclose(y.mean(axis=0), 0, atol=1e-3)
    assert np.allclose(np.cov(y.T, bias=True), np.eye(16), atol=2e-3)
    z = w.apply(x)                                  # default: re-L2-normalised
    assert np.allclose(np.linalg.norm(z, axis=1), 1, atol=1e-5)
    # save / load gives identical outputs, and the file needs no pickle
    path = tmp_path / "w.npz"
    w.save(str(path))
    w2 = load_whitening(str(path))
    assert np.array_equal(w2.apply(x), z)
    assert (w2.dim, w2.power, w2.shrinkage, w2.n_samples) == (16, 1.0, 0.0, 3000)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_eigen_decomposition_matches_numpy_reference():
    x = correlated(500, 12, seed=1)
    w = fit_whitening(x, dim=12)
    ref_vals, ref_vecs = np.linalg.eigh(np.cov(x.T.astype(np.float64), bias=True))
    ref_vals, ref_vecs = ref_vals[::-1], ref_vecs[:, ::-1]
    assert np.allclose(w.eigenvalues, ref_vals, rtol=1e-4, atol=1e-9)
    assert np.all(np.diff(w.eigenvalues) <= 0)
    assert np.allclose(w.components @ w.components.T, np.eye(12), atol=1e-9)
    # same subspace, component by component (up to sign)
    assert np.allclose(np.abs(np.sum(w.components * ref_vecs.T, axis=1)), 1, atol=1e-4)
    assert np.allclose(w.mean, x.mean(axis=0, dtype=np.float64), atol=1e-6)


def test_streaming_and_merged_fits_equal_the_one_shot_fit():
    x = correlated(1000, 10, seed=2)
    whole = fit_whitening(x, dim=6)
    streamed = fit_whitening((x[i:i + 97] for i in range(0, 1000, 97)), dim=6)
    a = CovarianceAccumulator(10).update(x[:300])
    b = CovarianceAccumulator(10).update(x[300:650]).update(x[650:])
    merged = a.merge(b)
    assert merged.n == 1000
    ref = np.cov(x.T.astype(np.float64), bias=True)
    assert np.allclose(merged.covariance(), ref, atol=1e-6)
    assert np.allclose(CovarianceAccumulator(10).merge(a).covariance(), a.covariance())
    assert np.allclose(streamed.apply(x), whole.apply(x), atol=1e-4)


def test_large_common_mean_does_not_cancel():
    # L2-normalised embeddings concentrated around one direction: tiny spread, big mean
    rng = np.random.default_rng(3)
    x = l2_normalize(np.ones(32) + 0.01 * rng.normal(size=(4000, 32)))
    w = fit_whitening((x[i:i + 512] for i in range(0, 4000, 512)), dim=16)
    y = w.apply(x, normalize=False)
    assert np.allclose(np.cov(y.T, bias=True), np.eye(16), atol=5e-3)


def test_truncate_power_and_shrinkage():
    x = correlated(800, 16, seed=4)
    full = fit_whitening(x, dim=16)
    assert np.allclose(full.truncate(8).apply(x), fit_whitening(x, dim=8).apply(x), atol=1e-5)
    # power 0 is a rotation (PCA): pairwise distances are kept at full dimension
    pca = fit_whitening(x, dim=16, power=0.0)
    y = pca.apply(x[:50], normalize=False)
    dx = np.linalg.norm(x[:50, None] - x[None, :50], axis=2)
    dy = np.linalg.norm(y[:, None] - y[None], axis=2)
    assert np.allclose(dx, dy, atol=1e-4)
    # shrinkage 1 turns whitening into a uniform scaling of the PCA projection
    shrunk = fit_whitening(x, dim=16, shrinkage=1.0)
    assert np.allclose(shrunk.scale, shrunk.scale[0])
    assert np.allclose(shrunk.apply(x), pca.apply(x), atol=1e-5)


def test_bad_inputs_raise_clear_errors(tmp_path):
    x = correlated(20, 8, seed=5)
    with pytest.raises(WhiteningError, match="output dimension must be in 1..8"):
        fit_whitening(x, dim=9)
    small = x[:5]
    with pytest.raises(WhiteningError, match="exceeds the rank"):
        fit_whitening(small, dim=6)
    assert fit_whitening(small, dim=6, shrinkage=0.1).dim == 6   # shrinkage regularises
    with pytest.raises(WhiteningError, match="NaN"):
        fit_whitening(np.full((4, 8), np.nan, np.float32), dim=2)
    with pytest.raises(WhiteningError, match="no vectors"):
        fit_whitening(iter([]), dim=2)
    w = fit_whitening(x, dim=4)
    with pytest.raises(WhiteningError, match="input dimension 8"):
        w.apply(np.zeros((3, 7), np.float32))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip")
    with pytest.raises(WhiteningError, match="not a whitening"):
        load_whitening(str(junk))
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, format=np.array(["x", None], dtype=object))
    with pytest.raises(WhiteningError, match="not a whitening"):
        load_whitening(str(pickled))
    with pytest.raises(FileNotFoundError):
        load_whitening(str(tmp_path / "missing.npz"))


def test_faiss_pretransform_whitens_raw_queries():
    faiss = pytest.importorskip("faiss")
    x = l2_normalize(correlated(400, 16, seed=6))
    w = fit_whitening(x, dim=8)
    base = faiss.IndexFlatIP(8)
    base.add(w.apply(x))
    wrapped = w.wrap_faiss_index(faiss.IndexFlatIP(8))
    wrapped.add(x)                                  # raw vectors go in, whitened inside
    d1, i1 = base.search(w.apply(x[:20]), 5)
    d2, i2 = wrapped.search(x[:20], 5)
    assert np.array_equal(i1, i2) and np.allclose(d1, d2, atol=1e-5)
