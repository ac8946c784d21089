"""pipelines/embed.py with every model batch announced and slowed, for the node-loss tests.

    python tests/cluster/slow_embed_job.py PROGRESS_DIR DELAY_SECONDS EMBED_ARGS...

Each model call first touches PROGRESS_DIR/<node>-<pid>-<ns> (node: the cluster.local worker
node the actor runs on, from CR_LOCAL_RAY_NODE; "head" otherwise), then sleeps DELAY_SECONDS,
then embeds as usual. So a test sees which nodes hold working actors and can kill one of
them mid-batch. The subclass lives in __main__, so Ray ships it to the actors by value.
"""
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from model import embedding as E
from pipelines import embed
from pipelines._cli import run_main

PROGRESS_DIR, DELAY = sys.argv[1], float(sys.argv[2])


class SlowEmbedBatch(E.EmbedBatch):
    def __call__(self, batch):
        node = os.environ.get("CR_LOCAL_RAY_NODE", "head")
        pathlib.Path(PROGRESS_DIR, f"{node}-{os.getpid()}-{time.monotonic_ns()}").touch()
        time.sleep(DELAY)
        return super().__call__(batch)


E.EmbedBatch = SlowEmbedBatch  # embed.main looks it up at call time

if __name__ == "__main__":
    run_main(embed.main, sys.argv[3:])
