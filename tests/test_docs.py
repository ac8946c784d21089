"""docs/jobs.md stays the reference of every job: each job and each of its options is listed."""
import contextlib
import importlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted(p.stem for p in (ROOT / "pipelines").glob("[a-z]*.py"))
SUBCOMMANDS = {"index_versions": ["list", "rollback", "prune", "verify"]}


def _help(job: str, argv: list[str]) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as e:
        importlib.import_module(f"pipelines.{job}").main([*argv, "--help"])
    assert e.value.code == 0
    text = buf.getvalue()
    return text[text.index("options:"):]  # the options, not the description's examples


@pytest.mark.parametrize("job", JOBS)
def test_every_job_and_option_is_in_docs_jobs(job):
    doc = (ROOT / "docs" / "jobs.md").read_text(encoding="utf-8")
    section = doc.split(f"\n## {job}.py\n", 1)
    assert len(section) == 2, f"docs/jobs.md has no section '## {job}.py'"
    section = section[1].split("\n## ", 1)[0]
    for argv in [[sub] for sub in SUBCOMMANDS.get(job, [])] or [[]]:
        options = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", _help(job, argv)))
        missing = sorted(o for o in options if not re.search(rf"{re.escape(o)}(?![\w-])", section))
        assert not missing, f"docs/jobs.md, {job}.py {' '.join(argv)}: not listed {missing}"
