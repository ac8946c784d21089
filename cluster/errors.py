"""Ray's errors told apart from the job's own, each made one line.

Work lost with a node (an actor, object or node gone): a job (pipelines/embed.py, query.py)
says so in one line instead of Ray's traceback; the output is not published and the same
command can be re-run. The job's own error raised inside a Ray actor's __init__ or a Ray Train
worker arrives wrapped in Ray's report (tracebacks of both processes): `last_error_line` finds
the job's line in it.
"""
from __future__ import annotations

import sys

__all__ = ["actor_init_error", "is_lost_on_ray", "last_error_line"]


def _ray_actor_error():
    if "ray" not in sys.modules:  # Ray never started: cannot be one of its errors
        return None
    from ray.exceptions import RayActorError

    return RayActorError


def actor_init_error(e: BaseException) -> str | None:
    """The job's own error line when `e` is Ray's error for an actor whose __init__ raised
    (a model that cannot load, a GPU actor without CUDA); None otherwise."""
    cls = _ray_actor_error()
    if cls is None or not isinstance(e, cls) or not e.actor_init_failed:
        return None
    return last_error_line(str(e))


def is_lost_on_ray(e: BaseException) -> bool:
    """True for Ray's errors of a lost actor, object or node (its node died, its retries ran
    out); False for an actor that failed in its own __init__ (see actor_init_error)."""
    if _ray_actor_error() is None:
        return False
    from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError

    if isinstance(e, RayActorError) and e.actor_init_failed:
        return False
    return isinstance(e, (RayActorError, ObjectLostError, NodeDiedError))


def last_error_line(text: str) -> str:
    """The last `SomeError: message` line of a report with tracebacks (the innermost error),
    else its first non-empty line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0].rsplit(".", 1)[-1]
        if ":" in ln and head.isidentifier() and head.endswith(("Error", "Exception")):
            return ln.split(":", 1)[1].strip() or ln
    return lines[0] if lines else "unknown error"
