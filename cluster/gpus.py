"""GPUs on a Ray cluster whose GPU nodes an autoscaler adds on demand.

A job that wants GPUs asks for them (`request_resources`, what the autoscaler scales on) and
waits with a timeout and a progress line, instead of deciding from the resources present at
start (ray_cluster.yaml starts its GPU workers at 0 nodes). `probe_cuda` then checks, on a node
Ray gave a GPU, that torch finds a CUDA device there, so a GPU node without one (a logical GPU,
a broken driver) is one line and not a stack of CUDA errors from every worker.
"""
from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["NoCudaError", "auto_cpu_reason", "probe_cuda", "wait_for_gpus"]


class NoCudaError(RuntimeError):
    """Ray scheduled GPU work on a node where torch finds no CUDA device."""


def auto_cpu_reason(job: str, flag: str) -> str:
    """The one line a job prints when `auto` chose the CPU."""
    return (f"{job}: {flag} auto: no GPU in the Ray cluster now, running on CPU "
            f"({flag} cuda/true waits for a GPU node the autoscaler adds)")


def wait_for_gpus(ray, timeout: float, need: int = 1, job: str = "job",
                  say: Callable[[str], None] = print, poll: float = 1.0) -> int:
    """Wait until the cluster has at least `need` GPUs; returns the GPU count then.

    Asks the autoscaler for `need` one-GPU bundles and prints a progress line every 10 s;
    raises RuntimeError in one line after `timeout` seconds.
    """
    from ray.autoscaler.sdk import request_resources

    have = int(ray.cluster_resources().get("GPU", 0))
    if have >= need:
        return have
    request_resources(bundles=[{"GPU": 1}] * need)
    say(f"{job}: {have} GPU(s) in the Ray cluster, asked the autoscaler for {need}; "
        f"waiting up to {timeout:.0f}s (--gpu-wait)")
    t0 = last = time.monotonic()
    while True:
        have = int(ray.cluster_resources().get("GPU", 0))
        if have >= need:
            say(f"{job}: {have} GPU(s) joined after {time.monotonic() - t0:.0f}s")
            return have
        now = time.monotonic()
        if now - t0 > timeout:
            raise RuntimeError(f"{job}: {need} GPU(s) asked for, {have} joined the Ray cluster "
                               f"within {timeout:.0f}s (--gpu-wait)")
        if now - last >= 10:
            last = now
            say(f"{job}: waiting for {need - have} more GPU(s) ({now - t0:.0f}s of {timeout:.0f}s)")
        time.sleep(poll)


def _cuda_here() -> tuple[str, bool, str]:
    import socket

    import torch

    return socket.gethostname(), bool(torch.cuda.is_available()), str(torch.version.cuda)


def probe_cuda(ray, job: str = "job", timeout: float = 300.0) -> str:
    """Run a one-GPU task; returns the host name. Raises NoCudaError in one line when the node
    Ray placed it on has no CUDA device for torch."""
    task = ray.remote(num_gpus=1, num_cpus=0, max_retries=0)(_cuda_here)
    host, ok, built = ray.get(task.remote(), timeout=timeout)
    if not ok:
        raise NoCudaError(f"{job}: no CUDA device on node {host}, which Ray gave a GPU "
                          f"(torch built for CUDA {built}); check the node's driver and image")
    return host
