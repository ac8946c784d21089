"""Start and stop a private local Ray head for development, and stop ONLY that head.

Other Ray processes may run on this machine (other users, other tests, an embedded
`ray.init()`), so this never calls `ray stop` (which kills every Ray process of the user).
Instead each head gets:

- its own directory (`tempfile.mkdtemp`, mode 0700) holding the Ray temp dir (session
  logs), a private auth token and `head.json`, the record of what was started;
- free ports for GCS, dashboard, dashboard agent and Ray client server;
- token authentication (`RAY_AUTH_MODE=token`, token read from `RAY_AUTH_TOKEN_PATH`
  pointing at the private token file, never ~/.ray/auth_token), so jobs must present it;
- a marker variable `CR_LOCAL_RAY_HEAD=<id>` in the environment of `ray start`. Every Ray
  process of that head (GCS, raylet, dashboard, workers, job drivers) inherits it, so
  `stop` finds exactly those processes by their environment, and a recycled pid that
  belongs to someone else is never signalled.

Jobs on the head run `python` from the head's PATH; `start` puts the directory of this
interpreter (the project venv) first on that PATH so the jobs see the project's packages.

A multi-node cluster on this one machine (tests, the demo of the cluster path, benchmarks):
`start --nodes 3` starts the head plus 2 worker nodes, each its own raylet (`ray start
--address`) with its own CPU count and a custom resource naming it (`cr_node_<name>: 1`), so
jobs can be pinned or spread and the state API shows which node ran what. `add_node` joins a
node later (an autoscaler's new node, or a logical GPU node: `num_gpus=1` on a CPU machine,
which Ray schedules on without a real device); `kill_node` SIGKILLs one worker node's raylet
and its workers (a lost machine). Worker nodes carry the head's marker too, so `stop` ends
them with the head, and a second marker CR_LOCAL_RAY_NODE=<name> that `kill_node` matches.

CLI (the scripts cluster/start_local.sh and stop_local.sh wrap it):
    python -m cluster.local start [--num-cpus N] [--nodes 3 --node-cpus 1] [--record outputs/ray-local-head.json]
    python -m cluster.local add-node --name gpu1 [--num-cpus 1] [--num-gpus 1] [--record ...]
    python -m cluster.local kill-node --name w1 [--record ...]
    python -m cluster.local env   [--record ...]   # `eval "$(...)"` to submit jobs by hand
    python -m cluster.local status [--record ...]
    python -m cluster.local stop  [--record ...] [--keep-logs]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

MARKER_ENV = "CR_LOCAL_RAY_HEAD"
NODE_ENV = "CR_LOCAL_RAY_NODE"      # the name of a worker node, in its processes' environment
NODE_RESOURCE = "cr_node_"          # custom resource `cr_node_<name>: 1` names each node
RECORD_NAME = "head.json"
TOKEN_NAME = "auth_token"
# Where `start` leaves a pointer to the head it started, for `stop` / `env` without arguments.
DEFAULT_RECORD = Path("outputs") / "ray-local-head.json"
# Variables that would make `ray start` join or authenticate against some other cluster.
_FOREIGN_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


@dataclasses.dataclass(frozen=True)
class LocalHead:
    """What `start_head` started: enough to reach the head and to stop only it."""

    head_id: str              # value of CR_LOCAL_RAY_HEAD in every process of this head
    state_dir: str            # private directory (0700): temp dir, token, head.json
    temp_dir: str             # Ray --temp-dir (inside state_dir)
    session_dir: str          # Ray session directory (logs under session_dir/logs)
    gcs_address: str          # host:port, for `ray.init(address=...)`
    dashboard_url: str        # http://127.0.0.1:port, for `ray job submit --address`
    token_path: str           # private auth token file
    num_cpus: int
    pids: tuple[int, ...]     # processes found right after start (more appear later)
    started_at: float

    @property
    def record_path(self) -> Path:
        return Path(self.state_dir) / RECORD_NAME

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for `ray job submit` / `ray.init` against this head (token auth)."""
        env = dict(os.environ if base is None else base)
        for k in _FOREIGN_ENV:
            env.pop(k, None)
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN_PATH"] = self.token_path
        env["RAY_API_SERVER_ADDRESS"] = self.dashboard_url
        return env

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["pids"] = list(self.pids)
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> LocalHead:
        """Read a head record: either a state dir's head.json or a pointer file written by start."""
        p = Path(path)
        if p.is_dir():
            p = p / RECORD_NAME
        if not p.is_file():
            raise FileNotFoundError(f"no local Ray head record at {p}")
        d = json.loads(p.read_text())
        if "state_dir" in d and set(d) == {"state_dir"}:  # pointer file
            return cls.load(Path(d["state_dir"]) / RECORD_NAME)
        d["pids"] = tuple(d.get("pids", ()))
        return cls(**d)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct TCP ports free right now (bound then released together so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_executable() -> str:
    """The `ray` CLI of this interpreter's environment (falls back to PATH)."""
    cand = Path(sys.executable).parent / "ray"
    if cand.is_file() and os.access(cand, os.X_OK):
        return str(cand)
    found = shutil.which("ray")
    if not found:
        raise FileNotFoundError("the `ray` command is not installed (pip install 'ray[default]')")
    return found


def start_command(temp_dir: str, ports: dict[str, int], num_cpus: int,
                  object_store_memory: int | None = None) -> list[str]:
    """The `ray start --head` argument list (no shell): private temp dir, explicit ports."""
    cmd = [
        ray_executable(), "start", "--head",
        "--temp-dir", temp_dir,
        "--port", str(ports["gcs"]),
        "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(ports["dashboard"]),
        "--dashboard-agent-listen-port", str(ports["agent"]),
        "--ray-client-server-port", str(ports["client"]),
        "--include-dashboard", "true",
        "--num-cpus", str(int(num_cpus)),
        "--num-gpus", "0",
        "--disable-usage-stats",
        "--log-style", "record",
    ]
    if object_store_memory:
        cmd += ["--object-store-memory", str(int(object_store_memory))]
    return cmd


def head_env(head_id: str, token_path: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for `ray start`: token auth, the marker, this venv first on PATH."""
    env = dict(os.environ if base is None else base)
    for k in _FOREIGN_ENV:
        env.pop(k, None)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = token_path
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env[MARKER_ENV] = head_id
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv_bin] + [p for p in env.get("PATH", "").split(os.pathsep)
                                                if p and p != venv_bin])
    if (Path(venv_bin).parent / "pyvenv.cfg").is_file():
        env["VIRTUAL_ENV"] = str(Path(venv_bin).parent)
    return env


def find_head_processes(head_id: str, node: str | None = None) -> list[int]:
    """Pids of live processes whose environment carries CR_LOCAL_RAY_HEAD=head_id (and
    CR_LOCAL_RAY_NODE=node when `node` is given)."""
    needle = f"{MARKER_ENV}={head_id}".encode()
    if node is not None:
        node_needle = f"{NODE_ENV}={node}".encode()
        return [p for p in find_head_processes(head_id) if node_needle in _environ(p)]
    me = os.getpid()
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                environ = f.read()
        except OSError:  # gone, or another user's process: not ours
            continue
        if needle in environ.split(b"\0") and not _is_zombie(int(entry.name)):
            found.append(int(entry.name))
    return sorted(found)


def _environ(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return stat[stat.rindex(b")") + 2:][:1] in (b"Z", b"X")
    except (OSError, ValueError):
        return True


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _wait_until_ready(dashboard_url: str, timeout: float) -> None:
    """Poll the dashboard's job API until it answers (the head is usable for `ray job submit`)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            # Any HTTP answer (even 401 without token) means the server is up.
            urllib.request.urlopen(f"{dashboard_url}/api/version", timeout=2).close()
            return
        except urllib.error.HTTPError:
            return
        except (urllib.error.URLError, OSError) as e:
            last = e
            time.sleep(0.25)
    raise RuntimeError(f"Ray dashboard at {dashboard_url} did not come up in {timeout:.0f}s: {last}")


def start_head(num_cpus: int = 2, *, object_store_memory: int | None = None,
               base_dir: str | None = None, record: str | os.PathLike | None = None,
               timeout: float = 60.0, attempts: int = 3) -> LocalHead:
    """Start a private Ray head; returns its record (also written to <state_dir>/head.json).

    num_cpus: CPUs the head advertises. object_store_memory: bytes (None: Ray's default).
    base_dir: where the private state dir is created (default: the system temp dir; keep it
    short, Ray's unix sockets live under it). record: optional pointer file naming the state
    dir (for `stop` without arguments). A failed start (e.g. a port taken between choosing
    and binding it) is cleaned up and retried with new ports.
    """
    if int(num_cpus) < 0:
        raise ValueError(f"num_cpus must be >= 0, got {num_cpus}")
    if object_store_memory is not None and object_store_memory < 75 * 1024**2:
        raise ValueError(f"object_store_memory must be at least 75 MiB, got {object_store_memory}")
    last_err = ""
    for _ in range(attempts):
        state_dir = tempfile.mkdtemp(prefix="cr-ray-", dir=base_dir)  # 0700
        head_id = secrets.token_hex(8)
        token_path = os.path.join(state_dir, TOKEN_NAME)
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        temp_dir = os.path.join(state_dir, "ray")
        gcs, dash, agent, client = free_ports(4)
        ports = {"gcs": gcs, "dashboard": dash, "agent": agent, "client": client}
        cmd = start_command(temp_dir, ports, num_cpus, object_store_memory)
        env = head_env(head_id, token_path)
        # Output to a file, not a pipe: daemons forked by `ray start` could hold a pipe open.
        log_path = os.path.join(state_dir, "start.log")
        with open(log_path, "w") as log:
            try:
                rc = subprocess.run(cmd, check=False, env=env, stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                rc = f"timed out after {timeout:.0f}s"
        if rc != 0:
            lines = Path(log_path).read_text(errors="replace").strip().splitlines()
            last_err = rc if isinstance(rc, str) else lines[-1] if lines else f"exit status {rc}"
            _terminate(head_id)
            shutil.rmtree(state_dir, ignore_errors=True)
            continue
        session_dir = os.path.realpath(os.path.join(temp_dir, "session_latest"))
        try:
            gcs_address = Path(temp_dir, "ray_current_cluster").read_text().strip()
        except OSError:
            gcs_address = f"127.0.0.1:{gcs}"
        head = LocalHead(
            head_id=head_id, state_dir=state_dir, temp_dir=temp_dir, session_dir=session_dir,
            gcs_address=gcs_address, dashboard_url=f"http://127.0.0.1:{dash}",
            token_path=token_path, num_cpus=int(num_cpus),
            pids=tuple(find_head_processes(head_id)), started_at=time.time(),
        )
        _write_json(head.record_path, head.to_json())
        try:
            _wait_until_ready(head.dashboard_url, timeout)
        except RuntimeError:
            stop_head(head)
            raise
        if record is not None:
            Path(record).parent.mkdir(parents=True, exist_ok=True)
            _write_json(Path(record), json.dumps({"state_dir": state_dir}))
        return head
    raise RuntimeError(f"ray start failed {attempts} times: {last_err}")


NODES_NAME = "nodes.json"


def node_resource(name: str) -> str:
    """The custom resource that names node `name` (1 of it on that node only)."""
    return f"{NODE_RESOURCE}{name}"


def list_nodes(head: LocalHead) -> list[dict]:
    """The worker nodes started for this head: [{name, num_cpus, num_gpus, resources}]."""
    p = Path(head.state_dir) / NODES_NAME
    return json.loads(p.read_text()) if p.is_file() else []


def add_node(head: LocalHead, name: str, num_cpus: int = 1, num_gpus: int = 0,
             resources: dict[str, float] | None = None, timeout: float = 60.0) -> dict:
    """Join a worker node (its own raylet) to `head`, as an autoscaler's new node would.

    num_gpus > 0 on a CPU machine makes a logical GPU node: Ray schedules GPU actors there,
    but no CUDA device exists inside them. The node advertises `cr_node_<name>: 1`.
    Returns its record; waits until the node is alive in the cluster.
    """
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"node name must be letters, digits, '-' or '_': {name!r}")
    if any(n["name"] == name for n in list_nodes(head)):
        raise ValueError(f"node {name!r} already exists")
    res = {node_resource(name): 1, **(resources or {})}
    agent, metrics, rt_env = free_ports(3)
    # Its own temp dir, as a machine of its own has: nodes sharing one would share the
    # runtime-env folder, and a node unpacking a job's working_dir there replaces the folder
    # that a job driver on another node is running in (its cwd vanishes mid-job).
    temp_dir = os.path.join(head.state_dir, f"n-{name}")
    cmd = [ray_executable(), "start", "--address", head.gcs_address, "--temp-dir", temp_dir,
           "--num-cpus", str(int(num_cpus)), "--num-gpus", str(int(num_gpus)),
           "--resources", json.dumps(res),
           "--dashboard-agent-listen-port", str(agent), "--metrics-export-port", str(metrics),
           "--runtime-env-agent-port", str(rt_env),
           "--disable-usage-stats", "--log-style", "record"]
    env = head_env(head.head_id, head.token_path)
    env[NODE_ENV] = name
    log_path = os.path.join(head.state_dir, f"node-{name}.log")
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, check=False, env=env, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, timeout=timeout).returncode
    if rc != 0:
        lines = Path(log_path).read_text(errors="replace").strip().splitlines()
        _signal_all(find_head_processes(head.head_id, name), signal.SIGKILL)
        raise RuntimeError(f"ray start of node {name} failed: {lines[-1] if lines else rc}")
    record = {"name": name, "num_cpus": int(num_cpus), "num_gpus": int(num_gpus), "resources": res}
    _write_json(Path(head.state_dir) / NODES_NAME, json.dumps(list_nodes(head) + [record]))
    _wait_for_resource(head, node_resource(name), timeout)
    return record


def _wait_for_resource(head: LocalHead, resource: str, timeout: float) -> None:
    """Wait until the GCS lists a live node with `resource` (a fresh process asks the API)."""
    snippet = ("import ray, sys, time\n"
               "ray.init(address=sys.argv[1], log_to_driver=False)\n"
               "t = time.monotonic() + float(sys.argv[3])\n"
               "while time.monotonic() < t:\n"
               "    if any(n['Alive'] and sys.argv[2] in n['Resources'] for n in ray.nodes()):\n"
               "        sys.exit(0)\n"
               "    time.sleep(0.5)\n"
               "sys.exit(1)\n")
    r = subprocess.run([sys.executable, "-c", snippet, head.gcs_address, resource, str(timeout)],
                       check=False, env=head.client_env(), capture_output=True, timeout=timeout + 60)
    if r.returncode != 0:
        raise RuntimeError(f"node with {resource} did not join within {timeout:.0f}s")


def kill_node(head: LocalHead, name: str) -> list[int]:
    """SIGKILL every process of worker node `name` (raylet, object store, its workers): a
    machine lost without warning. Returns the pids killed."""
    pids = find_head_processes(head.head_id, name)
    if not pids:
        raise RuntimeError(f"no live process of node {name!r}")
    _signal_all(pids, signal.SIGKILL)
    _wait_gone(head.head_id, pids, 10.0)
    nodes = [n for n in list_nodes(head) if n["name"] != name]
    _write_json(Path(head.state_dir) / NODES_NAME, json.dumps(nodes))
    return pids


def start_cluster(nodes: int = 3, head_cpus: int = 1, node_cpus: int = 1, **kwargs) -> LocalHead:
    """A head plus `nodes - 1` worker nodes named w1, w2, ... (`node_cpus` CPUs each)."""
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    head = start_head(head_cpus, **kwargs)
    try:
        for i in range(1, nodes):
            add_node(head, f"w{i}", num_cpus=node_cpus)
    except BaseException:
        stop_head(head)
        raise
    return head


@contextlib.contextmanager
def local_cluster(nodes: int = 3, head_cpus: int = 1, node_cpus: int = 1,
                  **kwargs) -> Iterator[LocalHead]:
    """Context manager for tests: `start_cluster`, stopped (only it) on exit, even on error."""
    head = start_cluster(nodes, head_cpus, node_cpus, **kwargs)
    try:
        yield head
    finally:
        stop_head(head)


def _write_json(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(head_id: str, pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while True:
        current = set(find_head_processes(head_id))
        alive = [p for p in pids if p in current]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def _terminate(head_id: str, grace: float = 10.0) -> list[int]:
    """SIGTERM then SIGKILL every process of this head; GCS last (as `ray stop` orders it).

    Returns the pids that were signalled.
    """
    signalled: set[int] = set()
    for _ in range(3):  # a dying raylet may still spawn or reparent a process; re-scan
        pids = find_head_processes(head_id)
        if not pids:
            break
        gcs = [p for p in pids if "gcs_server" in _cmdline(p)]
        rest = [p for p in pids if p not in gcs]
        _signal_all(rest, signal.SIGTERM)
        _signal_all(_wait_gone(head_id, rest, grace / 2), signal.SIGKILL)
        _signal_all(gcs, signal.SIGTERM)
        _signal_all(_wait_gone(head_id, gcs, grace / 2), signal.SIGKILL)
        _wait_gone(head_id, pids, 5.0)
        signalled.update(pids)
    return sorted(signalled)


def stop_head(head: LocalHead | str | os.PathLike, *, keep_logs: bool = False,
              grace: float = 10.0) -> list[int]:
    """Stop only the processes of this head (found by its marker); remove its state dir.

    head: a LocalHead, its state dir, its head.json or a pointer file. keep_logs: keep the
    state dir (session logs) instead of deleting it. Returns the pids stopped. Raises
    RuntimeError if some process of the head survives SIGKILL.
    """
    if not isinstance(head, LocalHead):
        head = LocalHead.load(head)
    stopped = _terminate(head.head_id, grace)
    left = find_head_processes(head.head_id)
    if left:
        raise RuntimeError(f"processes of Ray head {head.head_id} still alive: {left}")
    if not keep_logs:
        shutil.rmtree(head.state_dir, ignore_errors=True)
    return stopped


@contextlib.contextmanager
def local_head(num_cpus: int = 2, **kwargs) -> Iterator[LocalHead]:
    """Context manager for tests: a private head, stopped (only it) on exit, even on error."""
    head = start_head(num_cpus, **kwargs)
    try:
        yield head
    finally:
        stop_head(head)


def _print_env(head: LocalHead) -> None:
    # RAY_ADDRESS (GCS) lets `python pipelines/X.py` attach as a driver; the `ray job` CLI
    # and JobSubmissionClient prefer RAY_API_SERVER_ADDRESS (the dashboard).
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": head.token_path,
           "RAY_API_SERVER_ADDRESS": head.dashboard_url, "RAY_ADDRESS": head.gcs_address}
    for k, v in env.items():
        print(f"export {k}={shlex.quote(v)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start a private head and print its record")
    s.add_argument("--num-cpus", type=int, default=os.cpu_count() or 2,
                   help="CPUs the head advertises (default: all)")
    s.add_argument("--object-store-memory", type=int, default=None,
                   help="object store bytes (default: Ray's choice)")
    s.add_argument("--base-dir", default=None,
                   help="parent of the private state dir (default: system temp dir)")
    s.add_argument("--nodes", type=int, default=1,
                   help="nodes in all: the head plus NODES-1 worker nodes w1, w2, ... (default 1)")
    s.add_argument("--node-cpus", type=int, default=1, help="CPUs of each worker node (default 1)")
    an = sub.add_parser("add-node", help="join a worker node (e.g. a logical GPU node)")
    an.add_argument("--name", required=True)
    an.add_argument("--num-cpus", type=int, default=1)
    an.add_argument("--num-gpus", type=int, default=0)
    kn = sub.add_parser("kill-node", help="SIGKILL one worker node (raylet and its workers)")
    kn.add_argument("--name", required=True)
    for name, hlp in (("stop", "stop only the recorded head and delete its state dir"),
                      ("env", "print `export` lines for submitting jobs to the recorded head"),
                      ("status", "print the record and which of its processes are alive")):
        sp = sub.add_parser(name, help=hlp)
        if name == "stop":
            sp.add_argument("--keep-logs", action="store_true", help="keep the state dir (logs)")
    for sp in sub.choices.values():
        sp.add_argument("--record", default=str(DEFAULT_RECORD),
                        help=f"pointer file or state dir of the head (default: {DEFAULT_RECORD})")
    a = p.parse_args(argv)
    if a.cmd == "start":
        if Path(a.record).is_file():
            try:
                old = LocalHead.load(a.record)
                if find_head_processes(old.head_id):
                    raise RuntimeError(f"a head recorded in {a.record} is running "
                                       f"({old.dashboard_url}); stop it first")
            except FileNotFoundError:
                pass  # stale pointer: its state dir is gone
        head = start_head(a.num_cpus, object_store_memory=a.object_store_memory,
                          base_dir=a.base_dir, record=a.record)
        try:
            for i in range(1, a.nodes):
                add_node(head, f"w{i}", num_cpus=a.node_cpus)
        except BaseException:
            stop_head(head)
            raise
        print(head.to_json())
        for n in list_nodes(head):
            print(f"# node {n['name']}: {n['num_cpus']} CPU(s)", file=sys.stderr)
        print(f"# submit: python -m cluster.jobs --head {a.record} -- pipelines/X.py ...",
              file=sys.stderr)
        return 0
    head = LocalHead.load(a.record)
    if a.cmd == "add-node":
        print(json.dumps(add_node(head, a.name, a.num_cpus, a.num_gpus)))
    elif a.cmd == "kill-node":
        print(f"killed node {a.name}: {len(kill_node(head, a.name))} processes")
    elif a.cmd == "env":
        _print_env(head)
    elif a.cmd == "status":
        print(head.to_json())
        alive = find_head_processes(head.head_id)
        print(f"alive processes: {len(alive)} {alive}")
        return 0 if alive else 1
    elif a.cmd == "stop":
        stopped = stop_head(head, keep_logs=a.keep_logs)
        record = Path(a.record)
        if record.is_file() and record.name != RECORD_NAME:
            record.unlink()
        print(f"stopped Ray head {head.head_id}: {len(stopped)} processes")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
