"""A tiny job for the cluster tests: reports what it received, exits with a chosen status.

    python tests/cluster/probe_job.py --out FILE [--exit N] [ARGS...]

Writes JSON {argv, cwd, files, ray_address, has_numpy} to FILE (an absolute path on this
machine), so a test can check which arguments arrived unchanged and which files were
uploaded with the working dir.
"""
import argparse
import json
import os
import pathlib
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="where to write the JSON report")
    p.add_argument("--exit", type=int, default=0, help="exit status to return")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="anything; echoed back")
    a = p.parse_args(argv)
    try:
        import numpy  # noqa: F401  (the job runs with the project's environment)
        has_numpy = True
    except ImportError:
        has_numpy = False
    cwd = pathlib.Path.cwd()
    files = sorted(str(f.relative_to(cwd)) for f in cwd.rglob("*") if f.is_file())
    report = {"argv": sys.argv[1:], "rest": a.rest, "cwd": str(cwd), "files": files,
              "ray_address": os.environ.get("RAY_ADDRESS"), "has_numpy": has_numpy}
    pathlib.Path(a.out).write_text(json.dumps(report))
    print(f"probe: {len(files)} files, exit {a.exit}")
    return a.exit


if __name__ == "__main__":
    sys.exit(main())
