import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from contracts.vectors import embeddings_schema, embeddings_to_arrow, write_table_atomic
from index.ann.versions import IndexHome
from pipelines import build_index, index_versions
from pipelines._cli import run_main
from tests.index.index_data import clustered, write_vectors

REPO = Path(__file__).resolve().parents[2]


def run_cli(mod, argv, capsys):
    with pytest.raises(SystemExit) as e:
        run_main(mod.main, argv)
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_build_publish_list_rollback_prune(tmp_path, capsys):
    write_vectors(tmp_path / "v.parquet", clustered(500, 16))
    args = ["--vectors", str(tmp_path / "v.parquet"), "--root", str(tmp_path / "idx"), "--name", "g",
            "--shards", "2", "--index-type", "flat"]
    code, out, _ = run_cli(build_index, args, capsys)
    assert code == 0
    first = json.loads(out.strip().splitlines()[-1])
    assert first["published"] and first["num_vectors"] == 500 and first["index_type"] == "Flat"
    code, out, _ = run_cli(build_index, args + ["--version", "v2"], capsys)
    home = IndexHome.of(tmp_path / "idx", "g")
    assert code == 0 and home.current() == "v2"
    code, out, _ = run_cli(build_index, args + ["--version", "v3", "--no-publish"], capsys)
    assert home.current() == "v2" and home.list_versions() == [first["version"], "v2", "v3"]

    index = str(tmp_path / "idx" / "g")
    code, out, _ = run_cli(index_versions, ["list", "--index", index], capsys)
    assert code == 0 and "* v2" in out and first["version"] in out
    code, out, _ = run_cli(index_versions, ["rollback", "--index", index], capsys)
    assert code == 0 and home.current() == first["version"]
    code, out, _ = run_cli(index_versions, ["verify", "--index", index], capsys)
    assert code == 0 and out.startswith("ok")
    code, out, _ = run_cli(index_versions, ["prune", "--index", index, "--keep", "1"], capsys)
    assert code == 0 and home.list_versions() == [first["version"], "v3"]  # CURRENT survives
    code, _, err = run_cli(index_versions, ["rollback", "--index", index, "--to", "v2"], capsys)
    assert code == 2 and err.startswith("error: ") and "unknown version" in err and err.count("\n") == 1


def test_bad_inputs_one_line_error_exit_2(tmp_path, capsys):
    x = clustered(20, 8)
    x[0, 0] = np.nan
    t = pa.table([pa.array([f"i{i}" for i in range(20)]), pa.array(["a"] * 20), pa.array([1] * 20, pa.int32()),
                  pa.array(["g"] * 20), embeddings_to_arrow(x)], schema=embeddings_schema(8, "m"))
    write_table_atomic(t, str(tmp_path / "nan.parquet"))
    for vectors, expect in [(tmp_path / "nan.parquet", "NaN"), (tmp_path / "missing", "no such file")]:
        code, _, err = run_cli(build_index, ["--vectors", str(vectors), "--root", str(tmp_path / "r"),
                                               "--name", "n"], capsys)
        assert code == 2 and err.startswith("error: ") and expect in err and err.count("\n") == 1
    assert not (tmp_path / "r" / "n").exists() or not any((tmp_path / "r" / "n").iterdir())


def test_help_documents_options():
    out = subprocess.run([sys.executable, str(REPO / "pipelines" / "build_index.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    for opt in ("--vectors", "--root", "--name", "--shards", "--index-type", "--max-memory",
                "--target-recall", "--no-publish"):
        assert opt in out
