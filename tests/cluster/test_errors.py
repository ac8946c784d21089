"""One line out of Ray's reports: the job's own error, found in tracebacks of two processes."""
import pytest

from cluster.errors import actor_init_error, is_lost_on_ray, last_error_line

REPORT = """Training failed due to worker errors:
[Rank 0 Error Snippet]:
Traceback (most recent call last):
  File "/work/main/pipelines/train.py", line 204, in train_loop_per_worker
    raise RuntimeError("no CUDA device")
RuntimeError: train: no CUDA device on node vm, which Ray gave a GPU

During handling of the above exception, another exception occurred:
ray.exceptions.RayTaskError(RuntimeError): ray::RayTrainWorker.run() (pid=1)
  File "x.py", line 1, in f
ValueError: shard train-000001.tar: bad JSON at line 3
"""


def test_the_innermost_error_line_is_found():
    assert last_error_line(REPORT) == "shard train-000001.tar: bad JSON at line 3"
    assert last_error_line(REPORT.split("During")[0]) == "train: no CUDA device on node vm, which Ray gave a GPU"
    assert last_error_line("\n  something odd happened\n") == "something odd happened"
    assert last_error_line("") == "unknown error"


def test_actor_init_failure_is_the_jobs_error_not_a_lost_node():
    pytest.importorskip("ray")
    from ray.exceptions import ActorDiedError, RayTaskError

    init = ActorDiedError(RayTaskError("EmbedBatch.__init__", REPORT, RuntimeError("x")))
    assert init.actor_init_failed
    assert not is_lost_on_ray(init)
    assert actor_init_error(init) == "shard train-000001.tar: bad JSON at line 3"
    lost = ActorDiedError()  # died without a creation-task error: its node went away
    assert is_lost_on_ray(lost) and actor_init_error(lost) is None
    assert actor_init_error(ValueError("x")) is None and not is_lost_on_ray(ValueError("x"))
