"""A tampered or damaged index on disk, through the query job and `index_versions verify`.

Already covered elsewhere: tests/index/test_versions.py::test_verify_detects_tampering,
tests/index/test_search.py::test_tampered_shard_refused_with_verify (library level),
readers during a publish (tests/index/test_versions.py::
test_current_is_never_partial_under_concurrent_publish, tests/index/test_search.py::
test_readers_never_see_a_partial_version_while_publishing) and a pruned version under a reader.
"""
from __future__ import annotations

import os
import shutil

import pytest

from index.ann.build import BuildConfig, build_index
from index.ann.versions import IndexHome
from pipelines import index_versions
from pipelines import query as query_job
from pipelines._cli import run_main
from tests.index.index_data import clustered, write_vectors

DIM = 16


def cli(mod, argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(mod.main, [str(a) for a in argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tamper")
    write_vectors(tmp / "g.parquet", clustered(150, DIM, seed=1))
    build_index(str(tmp / "g.parquet"), str(tmp / "idx"), "g", BuildConfig(shards=2, index_type="flat"),
                version="v1")
    write_vectors(tmp / "q.parquet", clustered(4, DIM, seed=2), prefix="q")
    return tmp


def flip(path):
    b = bytearray(path.read_bytes())
    b[len(b) // 2] ^= 0xFF
    path.write_bytes(bytes(b))


def truncate(path):
    os.truncate(path, path.stat().st_size // 2)


DAMAGE = {
    "flipped byte in shard-001.faiss": ("shard-001.faiss", flip),
    "flipped byte in shard-000.ids.parquet": ("shard-000.ids.parquet", flip),
    "truncated shard-000.faiss": ("shard-000.faiss", truncate),
    "truncated shard-001.ids.parquet": ("shard-001.ids.parquet", truncate),
    "deleted shard-001.faiss": ("shard-001.faiss", os.remove),
    "shard-000.faiss replaced by another index's": ("shard-000.faiss", None),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_index_file_is_refused(pristine, tmp_path, capsys, case):
    shutil.copytree(pristine / "idx", tmp_path / "idx")
    vdir = tmp_path / "idx" / "g" / "v1"
    name, damage = DAMAGE[case]
    if damage is None:  # a well-formed FAISS file, just not this version's
        shutil.copy(vdir / "shard-001.faiss", vdir / name)
    else:
        damage(vdir / name)
    out = tmp_path / "res"
    code, _, err = cli(query_job, ["--index", tmp_path / "idx" / "g", "--queries", pristine / "q.parquet",
                                   "--k", 3, "--out", out, "--verify"], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert name in err and ("sha256 mismatch" in err or "missing file" in err), err
    assert not out.exists()
    code, _, err = cli(index_versions, ["verify", "--index", tmp_path / "idx" / "g"], capsys)
    assert code == 2 and name in err and err.count("\n") == 1


@pytest.mark.parametrize("case", ["truncated shard-000.faiss", "truncated shard-001.ids.parquet",
                                  "deleted shard-001.faiss"])
def test_broken_files_refused_even_without_verify(pristine, tmp_path, capsys, case):
    """Damage that makes a file unreadable is refused by loading alone (a one-line error); only
    --verify (sha256) catches a well-formed file whose bytes changed."""
    shutil.copytree(pristine / "idx", tmp_path / "idx")
    name, damage = DAMAGE[case]
    damage(tmp_path / "idx" / "g" / "v1" / name)
    code, _, err = cli(query_job, ["--index", tmp_path / "idx" / "g", "--queries", pristine / "q.parquet",
                                   "--k", 3, "--out", tmp_path / "res"], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "res").exists()


@pytest.mark.parametrize("current", ["../../etc", "v9\n", "", "v1/../v1", "/abs/v1"])
def test_current_naming_a_bad_or_missing_version_is_refused(pristine, tmp_path, capsys, current):
    shutil.copytree(pristine / "idx", tmp_path / "idx")
    (tmp_path / "idx" / "g" / "CURRENT").write_text(current)
    code, _, err = cli(query_job, ["--index", tmp_path / "idx" / "g", "--queries", pristine / "q.parquet",
                                   "--k", 3, "--out", tmp_path / "res"], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "res").exists()


def test_incomplete_version_dir_without_manifest_is_never_served(pristine, tmp_path, capsys):
    """A version directory without manifest.json (a copy that stopped half-way) cannot be
    published or rolled back to, and CURRENT naming it is refused."""
    shutil.copytree(pristine / "idx", tmp_path / "idx")
    g = tmp_path / "idx" / "g"
    shutil.copytree(g / "v1", g / "v2")
    os.remove(g / "v2" / "manifest.json")
    home = IndexHome.of(str(tmp_path / "idx"), "g")
    with pytest.raises(ValueError):
        home.publish("v2")
    assert home.current() == "v1"
    (g / "CURRENT").write_text("v2\n")
    code, _, err = cli(query_job, ["--index", g, "--queries", pristine / "q.parquet", "--k", 3,
                                   "--out", tmp_path / "res"], capsys)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
