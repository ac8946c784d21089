"""whiten: a full disk while writing the fitted .npz or the whitened vectors keeps the previous
output; an .npz holding pickled objects is refused without unpickling anything.
(Bad input and a model mismatch: tests/pipelines/test_whiten.py.)"""
from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from contracts import storage
from index.ann.whitening import FORMAT, WhiteningError, load_whitening
from pipelines import whiten
from tests.faults.diskfull import FullParquetWriter, leftovers, tree
from tests.faults.test_disk_full import FullFS
from tests.index.index_data import clustered, write_vectors


@pytest.fixture
def fitted(tmp_path):
    write_vectors(tmp_path / "e.parquet", clustered(200, 16))
    npz = tmp_path / "w.npz"
    assert whiten.main(["--embeddings", str(tmp_path / "e.parquet"), "--dim", "8", "--out", str(npz)]) == 0
    return tmp_path, npz


def test_fit_disk_full_keeps_previous_npz(fitted, monkeypatch):
    tmp_path, npz = fitted
    before = npz.read_bytes()
    monkeypatch.setattr(storage, "resolve", lambda p: (FullFS(room=100), os.path.abspath(p)))
    with pytest.raises(OSError, match="No space left"):
        whiten.main(["--embeddings", str(tmp_path / "e.parquet"), "--dim", "4", "--out", str(npz)])
    monkeypatch.undo()
    assert npz.read_bytes() == before and leftovers(tmp_path) == []
    assert load_whitening(str(npz)).dim == 8


def test_apply_disk_full_keeps_previous_output(fitted, monkeypatch):
    tmp_path, npz = fitted
    out = tmp_path / "white"
    args = ["--apply", str(npz), "--embeddings", str(tmp_path / "e.parquet"), "--out", str(out)]
    assert whiten.main(args) == 0
    before = tree(out)
    monkeypatch.setattr(pq, "ParquetWriter", FullParquetWriter)
    with pytest.raises(OSError, match="No space left"):
        whiten.main(args)
    monkeypatch.undo()
    assert tree(out) == before and leftovers(tmp_path) == []


def test_npz_with_pickled_objects_is_refused_unopened(tmp_path):
    """An object array in the .npz would need unpickling: refused (allow_pickle=False), and
    the pickled payload never runs."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    arr = np.empty(1, dtype=object)
    arr[0] = Evil()
    np.savez(tmp_path / "evil.npz", format=np.str_(FORMAT), mean=arr)
    with pytest.raises(WhiteningError, match="not a whitening .npz.*pickle"):
        load_whitening(str(tmp_path / "evil.npz"))
    assert not marker.exists()
