"""embed's CPU requests on several nodes: after the model actors are spread over the nodes
(Ray Data's default SPREAD), some node still has room for a reading task. Before the fix, two
1-CPU nodes with 2 actors got 0.5-CPU actors and 1-CPU reads (0.5 free on each node: the job
waited forever, found by benchmarks/multinode.py), and two 8-CPU nodes with 4 actors got
3.75-CPU actors (0.5 free per node)."""
import pytest

from pipelines.embed import cpu_actor_share


def spread(nodes: list[float], actors: int, share: float) -> list[float]:
    """Free CPUs per node after placing `actors` of `share` CPUs, each on the node with the most
    free CPUs that fits it (spreading, as Ray does for Ray Data's actor pools)."""
    free = list(nodes)
    for _ in range(actors):
        fits = [i for i, f in enumerate(free) if f >= share - 1e-9]
        assert fits, "the actors themselves do not fit"
        i = max(fits, key=lambda j: free[j])
        free[i] -= share
    return free


@pytest.mark.parametrize("nodes,actors,threads", [
    ([1, 1], 2, 1), ([2], 2, 1), ([0, 1, 1], 2, 1), ([0, 2, 2], 2, 1), ([1, 1, 1], 2, 1),
    ([8, 8], 4, 4), ([8, 8], 2, 8), ([8, 8, 8], 6, 4), ([4, 4, 4, 4], 4, 4), ([1], 1, 1),
    ([16], 4, 4), ([1, 1], 1, 2),
])
def test_a_reading_task_always_fits_beside_the_actors(nodes, actors, threads):
    share = cpu_actor_share(sum(nodes), actors, threads)
    read = min(1.0, share)
    assert 0 < share <= threads
    assert max(spread(nodes, actors, share)) >= read - 1e-9, (share, spread(nodes, actors, share))


def test_the_share_keeps_threads_and_a_cpu_for_reading():
    assert cpu_actor_share(16, 4, 4) == 3.0   # not 3.75: whole CPUs stay free on each node
    assert cpu_actor_share(2, 2, 1) == 0.5    # reads ask 0.5 too
    assert cpu_actor_share(9, 1, 4) == 4.0    # at most the actor's threads
    assert cpu_actor_share(1, 1, 1) == 0.25   # a 1-CPU machine: reads of 0.25 fit beside
