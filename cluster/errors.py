"""Ray's errors for work lost with a node, told apart from the job's own errors.

A job (pipelines/embed.py, query.py) turns these into one line, `error: ...`, instead of Ray's
traceback: the output is not published, and the same command can be re-run.
"""
from __future__ import annotations

import sys

__all__ = ["is_lost_on_ray"]


def is_lost_on_ray(e: BaseException) -> bool:
    """True for Ray's errors of a lost actor, object or node (its node died, its retries ran out)."""
    if "ray" not in sys.modules:  # Ray never started: cannot be one of its errors
        return False
    from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError

    return isinstance(e, (RayActorError, ObjectLostError, NodeDiedError))
