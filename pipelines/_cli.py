"""What every job shares: its argument parser, one-line errors with a non-zero exit, and Ray.

A job's `main(argv)` raises on bad input; `run_main` turns that into `error: <reason>` on
stderr and exit status 2 (set CR_DEBUG=1 to see the traceback instead). `make_parser(__doc__)`
gives the job's parser: bad arguments raise ValueError, so they take the same one-line path.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

# Errors that mean "bad input or environment", reported in one line.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, KeyError, OSError, RuntimeError)

__all__ = ["USER_ERRORS", "Parser", "add_ray_arguments", "init_ray", "make_parser", "run_main"]


class Parser(argparse.ArgumentParser):
    """Bad arguments become a one-line `error: ...` with exit 2 (via run_main)."""

    def error(self, message):
        # argparse would print its usage block and exit; a ValueError takes run_main's one line
        raise ValueError(message)


def make_parser(doc: str | None) -> Parser:
    """The job's parser: `doc` (its module docstring) as the --help text, kept as written."""
    return Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    try:
        rc = main(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:
        if os.environ.get("CR_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    sys.exit(rc or 0)


def add_ray_arguments(parser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: $RAY_ADDRESS, else an embedded local Ray)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="CPUs for an embedded local Ray (ignored when attaching to a cluster)")


def init_ray(address: str | None = None, num_cpus: int | None = None):
    """Attach to `address` / $RAY_ADDRESS, or start Ray inside this process."""
    import ray  # heavy: imported only by jobs that use it

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs = {"log_to_driver": True, "include_dashboard": False}
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(address="local", num_cpus=num_cpus, **kwargs)
    return ray
