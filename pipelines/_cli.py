"""What every job shares: its argument parser, one-line errors with a non-zero exit, quiet logs,
and connecting to Ray.

A job's `main(argv)` raises on bad input; `run_main` turns that into `error: <reason>` on
stderr and exit status 2 (set CR_DEBUG=1 to see the traceback instead). `make_parser(__doc__)`
gives the job's parser: bad arguments raise ValueError, so they take the same one-line path.

Every job accepts --quiet (no progress bars, only the job's final lines and errors) and
--log-level (of the libraries' loggers, Ray's included; default warning): `run_main` takes them
off the command line before the job parses it. Ray's INFO lines and its workers' output stay in
Ray's own log files (/tmp/ray/session_latest/logs) unless --log-level info or debug.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

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


LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass
class LogOptions:
    quiet: bool = False
    level: str = "warning"

    def __post_init__(self):
        if self.level not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.level!r}")


_LOG = LogOptions()


def log_options() -> LogOptions:
    """The --quiet / --log-level the job was started with."""
    return _LOG


def add_log_arguments(parser) -> None:
    """Document --quiet / --log-level in a job's --help (run_main applies them)."""
    parser.add_argument("--quiet", action="store_true", help="no progress bars; only results and errors")
    parser.add_argument("--log-level", default="warning", choices=LOG_LEVELS,
                        help="level of library and Ray log lines shown (default warning)")


def split_log_arguments(argv: list[str]) -> tuple[LogOptions, list[str]]:
    """(LogOptions, the remaining arguments) from a command line."""
    import argparse

    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # never swallow a job's --q...
    add_log_arguments(p)
    known, rest = p.parse_known_args(argv)
    return LogOptions(known.quiet, known.log_level), rest


def setup_logging(options: LogOptions) -> None:
    """Python logging at the chosen level; Ray's loggers too; tqdm bars off with --quiet."""
    import logging

    global _LOG
    _LOG = options
    level = getattr(logging, options.level.upper())
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    for name in ("ray", "ray.data", "ray.train", "ray.serve", "ray.tune"):
        logging.getLogger(name).setLevel(level)
    if options.quiet:
        os.environ["TQDM_DISABLE"] = "1"  # tqdm >= 4.66 reads it: every bar, ours and Ray Data's
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")  # repeated worker lines once, with a count


def run_main(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> None:
    try:
        options, argv = split_log_arguments(sys.argv[1:] if argv is None else list(argv))
        setup_logging(options)
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


def init_ray(address: str | None = None, num_cpus: int | None = None, worker_output: bool = False):
    """Attach to `address` / $RAY_ADDRESS, or start Ray inside this process.

    worker_output: the job's own progress is printed by its Ray workers (training's epoch lines
    come from rank 0), so their output is forwarded to the terminal at every log level."""
    import logging

    import ray  # heavy: imported only by jobs that use it

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    # workers' output reaches the terminal only when asked for (--log-level info/debug); Ray's
    # session log files keep it either way
    verbose = _LOG.level in ("debug", "info")
    level = getattr(logging, _LOG.level.upper())
    kwargs = {"log_to_driver": verbose or worker_output, "logging_level": level}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Ray renices its workers by +15 (RAY_worker_niceness): on a machine shared with anything
        # else the job's real work then runs behind it (train.py's Ray Train worker trained at
        # 0.4x a plain loop beside one background process). The embedded Ray's workers keep
        # the priority the job was started with.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **kwargs)
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = not _LOG.quiet
        ctx.print_on_execution_start = verbose
    except (ImportError, AttributeError):  # Ray without Data: nothing to quiet
        pass
    return ray
