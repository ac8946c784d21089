"""The shared job parser: bad arguments are one line on stderr and exit status 2."""
import importlib

import pytest

from pipelines._cli import Parser, make_parser, run_main

# every job of pipelines/ built on make_parser; each must stay importable without Ray or torch
JOBS = ["train", "make_shards", "make_synthetic", "whiten", "index_versions", "demo", "embed", "centroids",
        "build_index", "query", "evaluate", "reindex", "search", "serve", "export"]


def test_parser_raises_value_error_instead_of_exiting():
    p = make_parser("doc")
    p.add_argument("--n", type=int, required=True)
    with pytest.raises(ValueError, match="--n"):
        p.parse_args([])
    with pytest.raises(ValueError, match="invalid int value"):
        p.parse_args(["--n", "x"])
    assert p.parse_args(["--n", "3"]).n == 3


def test_subcommand_parsers_share_the_one_line_errors():
    p = make_parser("doc")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list").add_argument("--k", type=int)
    assert isinstance(sub.choices["list"], Parser)
    with pytest.raises(ValueError, match="invalid int value"):
        p.parse_args(["list", "--k", "x"])


@pytest.mark.parametrize("job", JOBS)
def test_unknown_option_is_a_one_line_error(job, capsys):
    module = importlib.import_module(f"pipelines.{job}")
    with pytest.raises(SystemExit) as e:
        run_main(module.main, ["--no-such-option"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert "--no-such-option" in err or "required" in err or "invalid choice" in err, err


@pytest.mark.slow
def test_embedded_ray_workers_keep_the_jobs_priority(monkeypatch):
    """Ray renices workers by +15 by default; the embedded Ray of a job must not."""
    import os

    import ray

    from pipelines._cli import init_ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    init_ray(None, 1)
    try:
        assert ray.get(ray.remote(lambda: os.nice(0)).remote()) == os.nice(0)
    finally:
        ray.shutdown()
