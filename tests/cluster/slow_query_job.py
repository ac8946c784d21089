"""pipelines/query.py with every shard search announced and slowed, for the node-loss tests.

    python tests/cluster/slow_query_job.py PROGRESS_DIR DELAY_SECONDS QUERY_ARGS...

Each shard actor's search first touches PROGRESS_DIR/<node>-<pid>-<ns> (node from
CR_LOCAL_RAY_NODE, "head" otherwise), then sleeps DELAY_SECONDS, then searches as usual, so a
test can kill a node while its shard actor is answering. The subclass lives in __main__, so
Ray ships it to the actors by value.
"""
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from index.ann import search as S
from pipelines import query
from pipelines._cli import run_main

PROGRESS_DIR, DELAY = sys.argv[1], float(sys.argv[2])


class SlowShardActor(S.ShardActor):
    def search(self, queries, k):
        node = os.environ.get("CR_LOCAL_RAY_NODE", "head")
        pathlib.Path(PROGRESS_DIR, f"{node}-{os.getpid()}-{time.monotonic_ns()}").touch()
        time.sleep(DELAY)
        return super().search(queries, k)


S.ShardActor = SlowShardActor  # the Ray executor looks it up when it opens the index

if __name__ == "__main__":
    run_main(query.main, sys.argv[3:])
