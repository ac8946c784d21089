"""Submit any pipeline as a Ray job, wait, stream its logs, return its exit status.

    python -m cluster.jobs --address http://127.0.0.1:8265 -- pipelines/train.py --config c.yaml
    python -m cluster.jobs --head outputs/ray-local-head.json -- pipelines/evaluate.py --help

Builds `ray job submit --address A --submission-id ID --working-dir . --runtime-env-json
{...} -- python pipelines/X.py ARGS` as an argument list and runs it without a shell. The
runtime env uploads the working dir minus the venv, outputs, VCS data, caches and benchmark
results (Ray also honours .gitignore). The job's own exit status (the driver's, e.g. 2 for a
refused nightly gate) is read back from the Jobs API afterwards, so callers such as cron
see the real reason, not just "failed".

Quoting: `ray job submit` joins the entrypoint with shlex.join and the cluster runs it with
a shell, so every argument reaches the job as exactly one word, metacharacters included.
Auth: RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH from the environment (cluster), or the private
token of a local head with --head.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

# gitignore-style patterns (Ray runtime_env "excludes"), relative to the working dir.
# No trailing slashes: Ray matches directory paths without one, so "outputs/" would miss.
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".venv",
    "/outputs",
    ".git",
    "__pycache__",
    "*.pyc",
    "/benchmarks/results",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "/build",
    "/dist",
)

# Environment variables a job needs from the submitting side (none by default); secrets are
# never copied implicitly.
DEFAULT_JOB_ENV: Mapping[str, str] = {"PYTHONUNBUFFERED": "1"}

# Terminal states of a Ray job (ray.job_submission.JobStatus values).
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """One pipeline run as a Ray job.

    script: path of the pipeline relative to working_dir (e.g. "pipelines/train.py").
    args: its arguments, passed verbatim (each becomes one argv entry of the job).
    address: the cluster's dashboard/Jobs API, e.g. http://127.0.0.1:8265 (None: Ray uses
    $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS). python: interpreter on the cluster's PATH.
    """

    script: str
    args: tuple[str, ...] = ()
    address: str | None = None
    working_dir: str = "."
    excludes: tuple[str, ...] = DEFAULT_EXCLUDES
    env_vars: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_JOB_ENV))
    python: str = "python"
    submission_id: str | None = None
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None
    wait: bool = True


def new_submission_id(script: str) -> str:
    """A readable unique job id: cr-<pipeline>-<UTC time>-<random>."""
    name = Path(script).stem.replace("_", "-") or "job"
    return f"cr-{name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


def runtime_env(spec: JobSpec) -> dict:
    """The runtime_env dict sent with the job: upload excludes and job env vars.

    working_dir is given separately on the command line (--working-dir), which overrides the
    runtime env's field in `ray job submit`.
    """
    env: dict = {"excludes": list(spec.excludes)}
    if spec.env_vars:
        env["env_vars"] = {str(k): str(v) for k, v in spec.env_vars.items()}
    return env


def entrypoint(spec: JobSpec) -> list[str]:
    """The job's command as an argument list: python SCRIPT ARGS..."""
    return [spec.python, spec.script, *map(str, spec.args)]


def ray_executable() -> str:
    from cluster.local import ray_executable as _ray

    return _ray()


def submit_command(spec: JobSpec, ray: str | None = None) -> list[str]:
    """The full `ray job submit` argument list (for subprocess without a shell)."""
    if not spec.script:
        raise ValueError("no pipeline script given")
    wd = Path(spec.working_dir)
    if not wd.is_dir():
        raise NotADirectoryError(f"working dir {spec.working_dir} is not a directory")
    if not (wd / spec.script).is_file():
        raise FileNotFoundError(f"{spec.script} not found under working dir {spec.working_dir}")
    cmd = [ray or ray_executable(), "job", "submit", "--log-style", "record"]
    if spec.address:
        cmd += ["--address", spec.address]
    cmd += ["--submission-id", spec.submission_id or new_submission_id(spec.script)]
    cmd += ["--working-dir", spec.working_dir]
    cmd += ["--runtime-env-json", json.dumps(runtime_env(spec), sort_keys=True)]
    if spec.entrypoint_num_cpus is not None:
        cmd += ["--entrypoint-num-cpus", str(spec.entrypoint_num_cpus)]
    if spec.entrypoint_num_gpus is not None:
        cmd += ["--entrypoint-num-gpus", str(spec.entrypoint_num_gpus)]
    if not spec.wait:
        cmd += ["--no-wait"]
    return cmd + ["--", *entrypoint(spec)]


@dataclasses.dataclass(frozen=True)
class JobResult:
    submission_id: str
    status: str            # SUCCEEDED / FAILED / STOPPED / PENDING / RUNNING / UNKNOWN
    exit_code: int         # the driver's exit status (1 when unknown and not succeeded)
    message: str = ""


# Run in a fresh interpreter: Ray caches its auth settings per process, so asking from a
# process that already used Ray (a test session, a notebook) could send the wrong token.
_INFO_SNIPPET = (
    "import json, sys\n"
    "from ray.job_submission import JobSubmissionClient\n"
    "i = JobSubmissionClient(sys.argv[1] or None).get_job_info(sys.argv[2])\n"
    "print(json.dumps({'status': str(getattr(i.status, 'value', i.status)),\n"
    "                  'driver_exit_code': i.driver_exit_code, 'message': i.message or ''}))\n"
)


def job_info(address: str | None, submission_id: str, env: Mapping[str, str] | None = None,
             timeout: float = 60.0) -> dict:
    """{"status", "driver_exit_code", "message"} of a job, from the Jobs API."""
    proc = subprocess.run([sys.executable, "-c", _INFO_SNIPPET, address or "", submission_id],
                          check=False,
                          env=dict(os.environ if env is None else env), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise RuntimeError(f"cannot read status of job {submission_id}: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def submit(spec: JobSpec, env: Mapping[str, str] | None = None, ray: str | None = None,
           timeout: float | None = None) -> JobResult:
    """Submit the job, stream its logs to this process's stdout, wait, return its result.

    env: environment for `ray job submit` (default: this process's); timeout: seconds to
    wait for the submit command (None: no limit).
    """
    if spec.submission_id is None:
        spec = dataclasses.replace(spec, submission_id=new_submission_id(spec.script))
    cmd = submit_command(spec, ray)
    proc_env = dict(os.environ if env is None else env)
    # No shell: the argument list goes to exec as is. Output is inherited (streamed live).
    rc = subprocess.run(cmd, check=False, env=proc_env, stdin=subprocess.DEVNULL,
                        timeout=timeout).returncode
    try:
        info = job_info(spec.address, spec.submission_id, proc_env)
    except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as e:
        # the submission itself failed (unreachable cluster, bad auth)
        return JobResult(spec.submission_id, "UNKNOWN", rc or 1, f"no job info: {e}")
    status = info["status"]
    code = info["driver_exit_code"]
    if code is None:  # e.g. stopped before the driver ran, or still running (--no-wait)
        code = 0 if status == "SUCCEEDED" else (rc or 1) if status in TERMINAL else rc
    return JobResult(spec.submission_id, status, int(code), info["message"])


def _split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    argv = list(argv)
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: list[str] | None = None) -> int:
    own, job = _split_argv(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(
        prog="python -m cluster.jobs",
        usage="python -m cluster.jobs [options] -- pipelines/X.py [ARGS...]",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None,
                   help="Jobs API address, e.g. http://127.0.0.1:8265 (default: "
                        "$RAY_API_SERVER_ADDRESS / $RAY_ADDRESS)")
    p.add_argument("--head", default=None,
                   help="a local head record from `python -m cluster.local start` (address and "
                        "token taken from it)")
    p.add_argument("--working-dir", default=".", help="directory uploaded as the job's cwd")
    p.add_argument("--python", default="python", help="interpreter on the cluster (default: python)")
    p.add_argument("--exclude", action="append", default=[],
                   help="extra upload exclude pattern (gitignore style); repeatable")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the job; repeatable")
    p.add_argument("--submission-id", default=None, help="job id (default: cr-<pipeline>-<time>-<rand>)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs reserved for the driver")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs reserved for the driver")
    p.add_argument("--no-wait", action="store_true", help="submit and return at once")
    a = p.parse_args(own)
    if not job:
        p.error("give the pipeline after `--`, e.g. -- pipelines/evaluate.py --help")
    env_vars = dict(DEFAULT_JOB_ENV)
    for kv in a.env:
        k, sep, v = kv.partition("=")
        if not sep or not k:
            p.error(f"--env wants KEY=VALUE, got {kv!r}")
        env_vars[k] = v
    proc_env = None
    address = a.address
    if a.head:
        from cluster.local import LocalHead

        head = LocalHead.load(a.head)
        proc_env = head.client_env()
        address = address or head.dashboard_url
    spec = JobSpec(script=job[0], args=tuple(job[1:]), address=address,
                   working_dir=a.working_dir, excludes=DEFAULT_EXCLUDES + tuple(a.exclude),
                   env_vars=env_vars, python=a.python, submission_id=a.submission_id,
                   entrypoint_num_cpus=a.num_cpus, entrypoint_num_gpus=a.num_gpus,
                   wait=not a.no_wait)
    result = submit(spec, env=proc_env)
    reason = (result.message.strip().splitlines() or [""])[0] if result.exit_code else ""
    print(f"job {result.submission_id}: {result.status} (exit {result.exit_code})"
          + (f": {reason}" if reason else ""), file=sys.stderr)
    if not spec.wait:
        return 0 if result.status != "UNKNOWN" else 1
    return result.exit_code


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
