"""The engine of the version CURRENT names, swapped for a newly published one once it verified.

`CurrentFollower.refresh()` reads CURRENT; when it names a new version, that version is opened
with every file's sha256 checked (`SearchEngine(verify=True)`) and only then replaces the
engine in one attribute assignment, so a request that already took the old engine finishes on
it and the next one gets the new. A version that fails to open or verify is remembered and never
tried again (CURRENT must move on). Old engines are closed after `grace_s` seconds, long after
any request that was using them has finished. The model is reused when the new version was
built with the same model id.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from serving.engine import SearchEngine

__all__ = ["CurrentFollower"]


class CurrentFollower:
    """Holds `engine` (a serving.engine.SearchEngine) for ROOT/NAME's CURRENT version."""

    def __init__(self, index_path: str, model_dir: str | None = None, threads: int | None = None,
                 grace_s: float = 30.0, say: Callable[[str], None] = print):
        from index.ann.versions import resolve_version

        self.index_path = str(index_path)
        self.home, _ = resolve_version(self.index_path)
        self.model_dir = model_dir
        self.threads = threads
        self.grace_s = float(grace_s)
        self.say = say
        self.engine = SearchEngine(self.index_path, model_dir, verify=True, threads=threads)
        self.refused: dict[str, str] = {}  # version -> why it was not loaded
        self._retired: list[tuple[float, SearchEngine]] = []
        self._lock = threading.Lock()  # one refresh at a time

    def refresh(self) -> bool:
        """Load and swap to the version CURRENT names now, if it is new and verifies. True if
        the engine changed."""
        from index.ann.versions import IndexVersionError

        with self._lock:
            self._close_retired()
            try:
                current = self.home.current()
            except IndexVersionError as e:  # a bad CURRENT file: keep serving what we have
                current, why = None, str(e)
                if why not in self.refused.values():
                    self.refused[f"CURRENT@{time.time():.0f}"] = why
                    self.say(f"serve: {why}; still serving {self.engine.version}")
            if current is None or current == self.engine.version or current in self.refused:
                return False
            old = self.engine
            try:
                recorded = self.home.manifest(current).get("model_dir")
                new = SearchEngine(self.index_path, None if recorded else self.model_dir, verify=True,
                                   version=current, threads=self.threads, runner=old.runner)
            except (OSError, ValueError, RuntimeError) as e:  # IndexVersionError is a ValueError
                why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                self.refused[current] = why
                self.say(f"serve: not loading version {current}: {why}; still serving {old.version}")
                return False
            self.engine = new  # the swap: one reference assignment
            self._retired.append((time.monotonic(), old))
            self.say(f"serve: now serving version {new.version} (was {old.version})")
            return True

    def _close_retired(self) -> None:
        now = time.monotonic()
        keep = []
        for since, eng in self._retired:
            if now - since >= self.grace_s:
                eng.close()
            else:
                keep.append((since, eng))
        self._retired = keep

    def close(self) -> None:
        with self._lock:
            for _, eng in self._retired:
                eng.close()
            self._retired = []
            self.engine.close()
