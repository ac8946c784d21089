"""PCA-whitening and dimension reduction of embeddings, learned on a gallery.

    x  ->  diag(s) U_d^T (x - mu)  ->  L2-normalise,    s_i = lambda'_i ^ (-power / 2)

mu is the gallery mean, U_d the top-d eigenvectors of the gallery covariance and lambda' its
eigenvalues after optional shrinkage towards their mean (lambda' = (1 - a) lambda + a
mean(lambda), i.e. Ledoit-Wolf-style shrinkage of the covariance towards a scaled identity).
power = 1 is full whitening, power = 0 plain PCA projection, 0.5 the softer "power-law"
whitening. Jegou & Chum (ECCV 2012) and Radenovic et al. (TPAMI 2018) show that whitening then
re-normalising improves retrieval, and the leading components carry most of it, so the same step
also shrinks the index (Wieczorek et al. 2021, Table 3).

Fitting streams: `CovarianceAccumulator` keeps only n, sum(x) and sum(x x^T) (D x D float64,
32 MiB at D = 2048), so the gallery is never held in memory; accumulators of different workers
merge. faiss.PCAMatrix does the same maths but its train() wants every vector in one array, so
it is used neither for fitting nor for applying; `PCAWhitening.wrap_faiss_index` exports the
fitted transform as a faiss pre-transform when an index should whiten raw queries itself.

The fitted transform is stored as a .npz of plain arrays (loaded with allow_pickle=False) so it
can sit in an index version beside the FAISS shards.
"""
from __future__ import annotations

import io
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from contracts.storage import resolve, write_bytes_atomic
from contracts.vectors import l2_normalize

FORMAT = "centroid_retrieval/pca_whitening/1"
EIG_FLOOR = 1e-10  # eigenvalues below this fraction of the largest are treated as zero


class WhiteningError(ValueError):
    """Bad whitening input: wrong dimension, too few samples, unreadable or corrupt file."""


class CovarianceAccumulator:
    """Streaming first and second moments of (n, D) batches, in float64.

    Moments are taken about a shift c (the first batch's mean) so that the covariance
    sum((x - c)(x - c)^T)/n - m m^T does not cancel catastrophically when the embeddings share
    a large common component (L2-normalised embeddings often have a mean of norm ~0.5-0.9).
    Products are float64: float32 ones lose the smallest eigenvalues (relative error ~1e-3 at a
    condition number of 1e6), and those set the largest whitening scales.
    """

    def __init__(self, dim: int):
        if dim < 1:
            raise WhiteningError(f"dimension must be >= 1, got {dim}")
        self.dim = int(dim)
        self.n = 0
        self.shift: np.ndarray | None = None
        self.sum = np.zeros(self.dim, np.float64)
        self.outer = np.zeros((self.dim, self.dim), np.float64)

    def update(self, x: np.ndarray) -> CovarianceAccumulator:
        """Add a batch x: (n, D) float. Returns self."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise WhiteningError(f"batch of shape {x.shape} does not match dimension {self.dim}")
        if not len(x):
            return self
        if not np.isfinite(x).all():
            raise WhiteningError("batch contains NaN or inf")
        if self.shift is None:
            self.shift = x.mean(axis=0, dtype=np.float64)
        xc = x.astype(np.float64) - self.shift
        self.n += len(x)
        self.sum += xc.sum(axis=0)
        self.outer += xc.T @ xc
        return self

    def merge(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """Fold another accumulator (e.g. from another worker) into this one. Returns self."""
        if other.dim != self.dim:
            raise WhiteningError(f"cannot merge dimension {other.dim} into {self.dim}")
        if other.n == 0:
            return self
        if self.n == 0:
            self.n, self.shift = other.n, other.shift.copy()
            self.sum, self.outer = other.sum.copy(), other.outer.copy()
            return self
        # re-express other's moments about our shift: y = x - c_self = (x - c_other) + d
        d = other.shift - self.shift
        self.outer += (other.outer + np.outer(other.sum, d) + np.outer(d, other.sum)
                       + other.n * np.outer(d, d))
        self.sum += other.sum + other.n * d
        self.n += other.n
        return self

    def mean(self) -> np.ndarray:
        """(D,) float64 mean of everything seen."""
        self._need(1)
        return self.shift + self.sum / self.n

    def covariance(self) -> np.ndarray:
        """(D, D) float64 population covariance (divided by n)."""
        self._need(2)
        m = self.sum / self.n
        cov = self.outer / self.n - np.outer(m, m)
        return (cov + cov.T) / 2  # exact symmetry for eigh

    def _need(self, k: int) -> None:
        if self.n < k:
            raise WhiteningError(f"need at least {k} vectors to fit whitening, got {self.n}")


@dataclass(frozen=True)
class PCAWhitening:
    """A fitted PCA-whitening: input (N, D) -> output (N, dim).

    mean: (D,) float64; components: (dim, D) float64, orthonormal rows, eigenvalues descending;
    eigenvalues: (dim,) float64 raw covariance eigenvalues; scale: (dim,) float64 per-component
    multiplier lambda'^(-power/2); power, shrinkage: the fit options; n_samples: training size;
    model: id of the model whose embeddings it was fitted on ("" if unknown).
    """

    mean: np.ndarray
    components: np.ndarray
    eigenvalues: np.ndarray
    scale: np.ndarray
    power: float
    shrinkage: float
    n_samples: int
    model: str = ""

    @property
    def input_dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def matrix(self) -> tuple[np.ndarray, np.ndarray]:
        """(A (dim, D) float32, b (dim,) float32) with output = A x + b (before normalising)."""
        a = self.components * self.scale[:, None]
        return a.astype(np.float32), (-(a @ self.mean)).astype(np.float32)

    def apply(self, x: np.ndarray, normalize: bool = True) -> np.ndarray:
        """x: (N, D) float -> (N, dim) float32, re-L2-normalised unless normalize=False."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise WhiteningError(f"vectors of shape {x.shape} do not match the whitening's "
                                 f"input dimension {self.input_dim}")
        # centre in float64 then project in float32: the mean can dominate x (see accumulator)
        xc = (x - self.mean).astype(np.float32)
        a = (self.components * self.scale[:, None]).astype(np.float32)
        y = xc @ a.T
        return l2_normalize(y) if normalize else y

    def truncate(self, dim: int) -> PCAWhitening:
        """The same whitening keeping only the leading `dim` components."""
        _check_dim(dim, self.dim)
        return PCAWhitening(self.mean, self.components[:dim], self.eigenvalues[:dim],
                            self.scale[:dim], self.power, self.shrinkage, self.n_samples,
                            self.model)

    def save(self, path: str) -> None:
        """Write a .npz of plain arrays (temp name, then rename); local path or pyarrow URI."""
        buf = io.BytesIO()
        np.savez(buf, format=np.str_(FORMAT), mean=self.mean, components=self.components,
                 eigenvalues=self.eigenvalues, scale=self.scale,
                 power=np.float64(self.power), shrinkage=np.float64(self.shrinkage),
                 n_samples=np.int64(self.n_samples), model=np.str_(self.model))
        write_bytes_atomic(path, buf.getvalue())

    def wrap_faiss_index(self, index):
        """faiss.IndexPreTransform that whitens and re-normalises raw (N, D) vectors, then
        passes them to `index` (built on whitened vectors of dimension `dim`)."""
        import faiss  # heavy: only when asked for

        if index.d != self.dim:
            raise WhiteningError(f"index dimension {index.d} != whitening output {self.dim}")
        a, b = self.matrix()
        lt = faiss.LinearTransform(self.input_dim, self.dim, True)
        faiss.copy_array_to_vector(a.ravel(), lt.A)
        faiss.copy_array_to_vector(b, lt.b)
        lt.is_trained = True
        norm = faiss.NormalizationTransform(self.dim, 2.0)
        pre = faiss.IndexPreTransform(norm, index)
        pre.prepend_transform(lt)
        return pre


def load_whitening(path: str) -> PCAWhitening:
    """Read a .npz written by `PCAWhitening.save` (no pickle); raises WhiteningError if bad."""
    fs, p = resolve(path)
    try:
        with fs.open_input_file(p) as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such whitening file: {path}") from None
    try:
        z = np.load(io.BytesIO(raw), allow_pickle=False)
        arrays = {}
        if isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy array is not ours either
            with z:
                arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as e:  # not our file
        raise WhiteningError(f"{path}: not a whitening .npz ({type(e).__name__}: {e})") from None
    need = ("format", "mean", "components", "eigenvalues", "scale", "power", "shrinkage",
            "n_samples", "model")
    missing = [k for k in need if k not in arrays]
    if missing or str(arrays.get("format", "")) != FORMAT:
        raise WhiteningError(f"{path}: not a whitening file (format {FORMAT!r}), "
                             f"missing {missing or 'format tag'}")
    w = PCAWhitening(
        mean=arrays["mean"].astype(np.float64), components=arrays["components"].astype(np.float64),
        eigenvalues=arrays["eigenvalues"].astype(np.float64),
        scale=arrays["scale"].astype(np.float64), power=float(arrays["power"]),
        shrinkage=float(arrays["shrinkage"]), n_samples=int(arrays["n_samples"]),
        model=str(arrays["model"]))
    d, dim = w.input_dim, w.dim
    if (w.mean.ndim != 1 or w.components.shape != (dim, d) or w.eigenvalues.shape != (dim,)
            or w.scale.shape != (dim,)):
        raise WhiteningError(f"{path}: inconsistent array shapes in whitening file")
    if not all(np.isfinite(a).all() for a in (w.mean, w.components, w.eigenvalues, w.scale)):
        raise WhiteningError(f"{path}: whitening file contains NaN or inf")
    return w


def whitening_from_moments(acc: CovarianceAccumulator, dim: int, power: float = 1.0,
                           shrinkage: float = 0.0, model: str = "") -> PCAWhitening:
    """Eigen-decompose the accumulated covariance and keep the top `dim` components.

    Without shrinkage, `dim` may not exceed n - 1 (the rank of the centred training set): the
    extra directions have zero variance and whitening would blow their noise up.
    """
    _check_dim(dim, acc.dim)
    if not 0.0 <= shrinkage <= 1.0:
        raise WhiteningError(f"shrinkage must be in [0, 1], got {shrinkage}")
    if not 0.0 <= power <= 2.0:
        raise WhiteningError(f"power must be in [0, 2], got {power}")
    cov = acc.covariance()
    if shrinkage == 0.0 and power > 0 and dim > acc.n - 1:
        raise WhiteningError(f"output dimension {dim} exceeds the rank of {acc.n} training "
                             f"vectors ({acc.n - 1}); lower the dimension or use shrinkage > 0")
    vals, vecs = np.linalg.eigh(cov)                       # ascending
    vals, vecs = vals[::-1], vecs[:, ::-1]
    vals = np.maximum(vals, 0.0)                           # tiny negative round-off
    reg = (1.0 - shrinkage) * vals + shrinkage * vals.mean()
    top = reg[0] if reg[0] > 0 else 1.0
    if power > 0 and reg[dim - 1] <= EIG_FLOOR * top:
        raise WhiteningError(f"the training vectors span fewer than {dim} directions "
                             f"(eigenvalue {dim} is ~0); lower the dimension or use shrinkage")
    scale = np.maximum(reg[:dim], EIG_FLOOR * top) ** (-power / 2.0)
    # sign convention: largest |entry| of each component positive, so refits are comparable
    comps = vecs[:, :dim].T.copy()
    flip = np.sign(comps[np.arange(dim), np.abs(comps).argmax(axis=1)])
    comps *= flip[:, None]
    return PCAWhitening(acc.mean(), comps, vals[:dim].copy(), scale, float(power),
                        float(shrinkage), int(acc.n), str(model))


def fit_whitening(batches: np.ndarray | Iterable[np.ndarray], dim: int, power: float = 1.0,
                  shrinkage: float = 0.0, model: str = "") -> PCAWhitening:
    """Fit on an (N, D) array or an iterable of (n, D) float batches (streamed, never stacked)."""
    if isinstance(batches, np.ndarray):
        batches = [batches]
    acc = None
    for x in batches:
        x = np.asarray(x)
        if x.ndim != 2:
            raise WhiteningError(f"expected (n, D) batches, got shape {x.shape}")
        acc = acc or CovarianceAccumulator(x.shape[1])
        acc.update(x)
    if acc is None:
        raise WhiteningError("no vectors to fit whitening on")
    return whitening_from_moments(acc, dim, power, shrinkage, model)


def _check_dim(dim: int, input_dim: int) -> None:
    if not 1 <= int(dim) <= input_dim:
        raise WhiteningError(f"output dimension must be in 1..{input_dim} (the input dimension), "
                             f"got {dim}")


# ------------------------------------------------------------------ embeddings / centroids files

def whitened_model_id(model: str, dim: int) -> str:
    """Model id of whitened vectors: '<model>+pcaw<dim>' (a different space from <model>)."""
    return f"{model}+pcaw{int(dim)}"


def fit_whitening_file(path: str, dim: int, power: float = 1.0, shrinkage: float = 0.0,
                       split: str | None = "gallery", batch_size: int = 65536) -> PCAWhitening:
    """Fit on an embeddings/centroids Parquet file or directory, streamed in batches.

    split: use only rows of this split when the file has a `split` column (default "gallery",
    so queries never leak into the transform); None uses every row.
    """
    import pyarrow.compute as pc

    from contracts.vectors import iter_vector_batches, open_dataset, read_metadata

    meta = read_metadata(open_dataset(path).schema, path)
    acc = CovarianceAccumulator(meta.dim)
    seen_split_column = False
    for labels, vecs in iter_vector_batches(path, batch_size):
        if split is not None and "split" in labels.schema.names:
            seen_split_column = True
            keep = pc.fill_null(pc.equal(labels.column("split"), split), False)
            vecs = vecs[np.asarray(keep.to_numpy(zero_copy_only=False), dtype=bool)]
        acc.update(vecs)
    if acc.n == 0:
        what = f" of split {split!r}" if split is not None and seen_split_column else ""
        raise WhiteningError(f"{path}: no vectors{what} to fit whitening on")
    return whitening_from_moments(acc, dim, power, shrinkage, meta.model)


def apply_whitening_file(src: str, dst: str, w: PCAWhitening, batch_size: int = 65536,
                         rows_per_file: int = 1_000_000) -> int:
    """Whiten every row of an embeddings/centroids Parquet file/dir into a new one; returns rows.

    The output keeps every other column, its `embedding` becomes fixed_size_list<float32>[dim]
    (re-L2-normalised) and its metadata names model '<model>+pcaw<dim>'. dst ending in
    '.parquet' is one file (any pyarrow filesystem); otherwise a local directory of
    part-NNNNN.parquet files. Written under a temporary name and renamed when complete.
    """
    import pyarrow as pa

    from contracts.storage import atomic_dir, atomic_path
    from contracts.vectors import (
        META_KEY,
        check_schema,
        detect_kind,
        embedding_type,
        embeddings_to_arrow,
        iter_vector_batches,
        open_dataset,
        vector_metadata,
    )

    if rows_per_file < 1:
        raise WhiteningError("rows_per_file must be >= 1")
    schema_in = open_dataset(src).schema
    meta = check_schema(schema_in, detect_kind(schema_in), src)
    if meta.dim != w.input_dim:
        raise WhiteningError(f"{src}: dimension {meta.dim} does not match the whitening's input "
                             f"dimension {w.input_dim}")
    if w.model and meta.model != w.model:
        raise WhiteningError(f"{src}: vectors of model {meta.model!r}, but the whitening was "
                             f"fitted on model {w.model!r}")
    metadata = dict(schema_in.metadata or {})
    metadata[META_KEY] = vector_metadata(whitened_model_id(meta.model, w.dim), w.dim)
    idx = schema_in.get_field_index("embedding")
    schema = schema_in.set(idx, pa.field("embedding", embedding_type(w.dim), nullable=False))
    schema = schema.with_metadata(metadata)

    def batches():
        for labels, vecs in iter_vector_batches(src, batch_size):
            cols = {name: labels.column(name) for name in labels.schema.names}
            cols["embedding"] = embeddings_to_arrow(w.apply(vecs))
            yield pa.RecordBatch.from_arrays([cols[f.name] for f in schema], schema=schema)

    if dst.rstrip("/").endswith(".parquet"):
        with atomic_path(dst) as (fs, tmp):
            return _write_parquet_parts([tmp], fs, schema, batches(), None)
    if "://" in dst:
        raise WhiteningError(f"{dst}: directory outputs must be local; name a .parquet file "
                             "to write to a remote filesystem")
    with atomic_dir(dst) as tmp_dir:
        import os

        names = (os.path.join(tmp_dir, f"part-{i:05d}.parquet") for i in range(10 ** 6))
        return _write_parquet_parts(names, None, schema, batches(), rows_per_file)


def _write_parquet_parts(paths, fs, schema, batches, rows_per_file: int | None) -> int:
    """Write record batches into the files `paths` yields, a new one every rows_per_file rows.
    An empty input still gives one valid, empty file (a reader then sees 0 rows, not an error)."""
    import pyarrow.parquet as pq

    paths = iter(paths)
    limit = rows_per_file or float("inf")
    writer, in_file, total = None, 0, 0
    try:
        for batch in batches:
            start = 0
            while start < batch.num_rows:
                if writer is None:
                    writer, in_file = pq.ParquetWriter(next(paths), schema, filesystem=fs), 0
                take = int(min(batch.num_rows - start, limit - in_file))
                writer.write_batch(batch.slice(start, take))
                start, in_file, total = start + take, in_file + take, total + take
                if in_file >= limit:
                    writer.close()
                    writer = None
        if total == 0:
            writer = pq.ParquetWriter(next(paths), schema, filesystem=fs)
    finally:
        if writer is not None:
            writer.close()
    return total
