"""Job submission (cluster/jobs.py) and the private local head (cluster/local.py).

Fast tests check the `ray job submit` command, the upload excludes (through Ray's own
packaging code), that no shell is involved, exit-status mapping, and that `stop` signals only
marked processes. One slow test starts a real private head, submits jobs, and stops it.
"""
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from cluster import jobs, local

REPO = Path(__file__).resolve().parents[2]
PROBE = "tests/cluster/probe_job.py"
HOSTILE = ["a b", "$(touch /tmp/cr-pwned)", "x'y;echo z", "`id`", "--flag=1 2", "", "ü\"q\""]


def _after_dashdash(cmd):
    return cmd[cmd.index("--") + 1:]


def _opt(cmd, name):
    head = cmd[:cmd.index("--")]
    return head[head.index(name) + 1]


# ---------------------------------------------------------------- command construction


def test_submit_command_is_an_argument_list_with_the_pipeline_after_dashdash():
    spec = jobs.JobSpec(script=PROBE, args=tuple(HOSTILE), address="http://127.0.0.1:1234",
                        working_dir=str(REPO), submission_id="cr-x-1")
    cmd = jobs.submit_command(spec, ray="/opt/ray")
    assert cmd[:3] == ["/opt/ray", "job", "submit"]
    assert _opt(cmd, "--address") == "http://127.0.0.1:1234"
    assert _opt(cmd, "--working-dir") == str(REPO)
    assert _opt(cmd, "--submission-id") == "cr-x-1"
    assert _after_dashdash(cmd) == ["python", PROBE, *HOSTILE]
    # `ray job submit` sends shlex.join(entrypoint) and the cluster runs it in a shell:
    # every argument must come back as exactly the same word.
    assert shlex.split(shlex.join(_after_dashdash(cmd))) == ["python", PROBE, *HOSTILE]
    env = json.loads(_opt(cmd, "--runtime-env-json"))
    for pattern in (".venv", ".git", "__pycache__"):
        assert pattern in env["excludes"]
    assert any(p.strip("/") == "outputs" for p in env["excludes"])
    assert any(p.strip("/") == "benchmarks/results" for p in env["excludes"])
    assert "working_dir" not in env  # given by --working-dir, which takes precedence


def test_submit_command_options_and_defaults():
    spec = jobs.JobSpec(script=PROBE, working_dir=str(REPO), entrypoint_num_gpus=1,
                        entrypoint_num_cpus=0.5, env_vars={"A": "1"}, python="python3", wait=False)
    cmd = jobs.submit_command(spec, ray="ray")
    assert "--address" not in cmd  # falls back to RAY_API_SERVER_ADDRESS / RAY_ADDRESS
    assert _opt(cmd, "--entrypoint-num-gpus") == "1"
    assert _opt(cmd, "--entrypoint-num-cpus") == "0.5"
    assert "--no-wait" in cmd[:cmd.index("--")]
    assert _after_dashdash(cmd) == ["python3", PROBE]
    assert json.loads(_opt(cmd, "--runtime-env-json"))["env_vars"] == {"A": "1"}
    sid = _opt(cmd, "--submission-id")
    assert sid.startswith("cr-probe-job-") and sid != _opt(jobs.submit_command(spec, "ray"),
                                                           "--submission-id")


def test_submit_command_refuses_missing_script_or_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.py"):
        jobs.submit_command(jobs.JobSpec(script="pipelines/no_such.py", working_dir=str(REPO)))
    with pytest.raises(NotADirectoryError):
        jobs.submit_command(jobs.JobSpec(script=PROBE, working_dir=str(tmp_path / "nope")))


# ---------------------------------------------------------------- what gets uploaded


def _ray_package(tmp_path, root: Path, excludes) -> set[str]:
    """Files Ray's own packaging puts in the working-dir zip for these excludes."""
    from ray._private.runtime_env.packaging import create_package

    out = tmp_path / "pkg.zip"
    create_package(str(root), out, include_gitignore=False, excludes=list(excludes))
    with zipfile.ZipFile(out) as z:
        return {n for n in z.namelist() if not n.endswith("/")}


def test_excludes_drop_venv_outputs_git_caches_and_benchmark_results(tmp_path):
    root = tmp_path / "repo"
    files = ["pipelines/train.py", "model/net.py", "benchmarks/embed.py", "pyproject.toml",
             "model/outputs.py", "index/results.py", "tests/outputs/keep.txt",
             ".venv/lib/site.py", "outputs/run/emb.parquet", ".git/HEAD", "model/__pycache__/n.pyc",
             "benchmarks/results/x.json", "x.egg-info/PKG-INFO", ".pytest_cache/v"]
    for f in files:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("x")
    spec = jobs.JobSpec(script="pipelines/train.py", working_dir=str(root))
    got = _ray_package(tmp_path, root, jobs.runtime_env(spec)["excludes"])
    # only top-level outputs/ and benchmarks/results/ are dropped; look-alikes stay
    assert got == {"pipelines/train.py", "model/net.py", "benchmarks/embed.py", "pyproject.toml",
                   "model/outputs.py", "index/results.py", "tests/outputs/keep.txt"}


def test_real_repository_upload_has_the_code_and_no_local_state(tmp_path):
    spec = jobs.JobSpec(script="pipelines/evaluate.py", working_dir=str(REPO))
    got = _ray_package(tmp_path, REPO, jobs.runtime_env(spec)["excludes"])
    assert {"pipelines/evaluate.py", "pipelines/_cli.py", "cluster/jobs.py", "pyproject.toml",
            "index/evaluation/metrics.py", "contracts/vectors.py"} <= got
    for name in got:
        top = name.split("/")[0]
        assert top not in {".venv", ".git", "outputs", ".pytest_cache", ".ruff_cache"}, name
        assert "__pycache__" not in name and not name.startswith("benchmarks/results/"), name


# ---------------------------------------------------------------- running (no shell)


class _FakeRun:
    """Records subprocess.run calls; the second one (job info) answers with `info`."""

    def __init__(self, submit_rc, info):
        self.calls, self.submit_rc, self.info = [], submit_rc, info

    def __call__(self, cmd, **kw):
        self.calls.append((cmd, kw))
        if "-c" in cmd[:2]:  # job_info's fresh interpreter
            if self.info is None:
                return subprocess.CompletedProcess(cmd, 1, "", "ConnectionError: refused\n")
            return subprocess.CompletedProcess(cmd, 0, json.dumps(self.info) + "\n", "")
        return subprocess.CompletedProcess(cmd, self.submit_rc)


@pytest.mark.parametrize("submit_rc,info,status,code", [
    (0, {"status": "SUCCEEDED", "driver_exit_code": 0, "message": ""}, "SUCCEEDED", 0),
    (1, {"status": "FAILED", "driver_exit_code": 2, "message": "gate"}, "FAILED", 2),
    (1, {"status": "STOPPED", "driver_exit_code": None, "message": ""}, "STOPPED", 1),
    (1, None, "UNKNOWN", 1),
])
def test_submit_runs_without_shell_and_returns_the_driver_exit_status(
        monkeypatch, submit_rc, info, status, code):
    fake = _FakeRun(submit_rc, info)
    monkeypatch.setattr(jobs.subprocess, "run", fake)
    spec = jobs.JobSpec(script=PROBE, args=tuple(HOSTILE), address="http://h:1",
                        working_dir=str(REPO))
    res = jobs.submit(spec, env={"RAY_AUTH_MODE": "token", "PATH": os.environ["PATH"]}, ray="ray")
    assert (res.status, res.exit_code) == (status, code)
    assert len(fake.calls) == 2
    for cmd, kw in fake.calls:
        assert isinstance(cmd, list) and all(isinstance(c, str) for c in cmd)
        assert not kw.get("shell", False)
        assert kw["env"]["RAY_AUTH_MODE"] == "token"
    submit_cmd, info_cmd = fake.calls[0][0], fake.calls[1][0]
    assert _after_dashdash(submit_cmd)[2:] == HOSTILE
    # the status is asked for the very job id that was submitted
    assert info_cmd[-2:] == ["http://h:1", _opt(submit_cmd, "--submission-id")] == \
        ["http://h:1", res.submission_id]


def test_cli_builds_the_job_from_argv(monkeypatch, capsys):
    fake = _FakeRun(0, {"status": "SUCCEEDED", "driver_exit_code": 0, "message": ""})
    monkeypatch.setattr(jobs.subprocess, "run", fake)
    monkeypatch.chdir(REPO)
    rc = jobs.main(["--address", "http://h:2", "--env", "K=v=w", "--exclude", "/data",
                    "--num-gpus", "1", "--", PROBE, "--out", "x y", "--", "z"])
    assert rc == 0
    cmd = fake.calls[0][0]
    assert _after_dashdash(cmd) == ["python", PROBE, "--out", "x y", "--", "z"]
    env = json.loads(_opt(cmd, "--runtime-env-json"))
    assert env["env_vars"]["K"] == "v=w" and "/data" in env["excludes"] and ".venv" in env["excludes"]
    assert _opt(cmd, "--entrypoint-num-gpus") == "1.0"
    assert "SUCCEEDED" in capsys.readouterr().err


def test_cli_without_pipeline_or_with_bad_env_is_a_usage_error(monkeypatch):
    monkeypatch.setattr(jobs.subprocess, "run", _FakeRun(0, None))
    for argv in (["--address", "http://h:2"], ["--env", "novalue", "--", PROBE]):
        with pytest.raises(SystemExit) as e:
            jobs.main(argv)
        assert e.value.code == 2


# ---------------------------------------------------------------- local head helpers


def test_head_env_and_start_command_are_private(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "someone-elses")
    env = local.head_env("abc", "/tmp/tok")
    assert "RAY_ADDRESS" not in env and "RAY_AUTH_TOKEN" not in env
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == "/tmp/tok"
    assert env[local.MARKER_ENV] == "abc"
    # jobs on the head run `python` from its PATH: this interpreter's directory comes first
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    ports = dict(zip(("gcs", "dashboard", "agent", "client"), local.free_ports(4)))
    assert len(set(ports.values())) == 4
    cmd = local.start_command("/tmp/x/ray", ports, 3, object_store_memory=10**8)
    assert cmd[1:3] == ["start", "--head"] and "stop" not in cmd
    for flag, value in (("--temp-dir", "/tmp/x/ray"), ("--port", ports["gcs"]),
                        ("--dashboard-port", ports["dashboard"]), ("--num-cpus", 3),
                        ("--ray-client-server-port", ports["client"]),
                        ("--dashboard-agent-listen-port", ports["agent"]),
                        ("--object-store-memory", 10**8), ("--dashboard-host", "127.0.0.1")):
        assert cmd[cmd.index(flag) + 1] == str(value)


def test_start_refuses_bad_sizes_before_starting_anything(tmp_path):
    with pytest.raises(ValueError, match="num_cpus"):
        local.start_head(-1, base_dir=str(tmp_path))
    with pytest.raises(ValueError, match="object_store_memory"):
        local.start_head(1, object_store_memory=1000, base_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_stop_signals_only_processes_carrying_its_marker():
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    ours = subprocess.Popen(sleeper, env={**os.environ, local.MARKER_ENV: "mine-123"})
    other = subprocess.Popen(sleeper, env={**os.environ, local.MARKER_ENV: "mine-1234"})
    plain = subprocess.Popen(sleeper)
    try:
        deadline = time.monotonic() + 5
        while local.find_head_processes("mine-123") != [ours.pid] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert local.find_head_processes("mine-123") == [ours.pid]
        stopped = local._terminate("mine-123", grace=2.0)
        assert stopped == [ours.pid]
        assert ours.wait(timeout=5) == -signal.SIGTERM
        assert other.poll() is None and plain.poll() is None
    finally:
        for p in (ours, other, plain):
            if p.poll() is None:
                p.kill()
            p.wait()


def test_head_record_round_trip(tmp_path):
    head = local.LocalHead(head_id="h", state_dir=str(tmp_path), temp_dir=str(tmp_path / "ray"),
                           session_dir=str(tmp_path / "ray/s"), gcs_address="127.0.0.1:1",
                           dashboard_url="http://127.0.0.1:2", token_path=str(tmp_path / "tok"),
                           num_cpus=1, pids=(5, 6), started_at=1.0)
    head.record_path.write_text(head.to_json())
    pointer = tmp_path / "pointer.json"
    pointer.write_text(json.dumps({"state_dir": str(tmp_path)}))
    for src in (tmp_path, head.record_path, pointer):
        assert local.LocalHead.load(src) == head
    env = head.client_env({"RAY_ADDRESS": "elsewhere:1", "RAY_AUTH_TOKEN": "t", "X": "1"})
    assert env == {"X": "1", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": head.token_path,
                   "RAY_API_SERVER_ADDRESS": "http://127.0.0.1:2"}
    with pytest.raises(FileNotFoundError):
        local.LocalHead.load(tmp_path / "missing.json")


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_private_head_runs_submitted_jobs_and_stops_only_itself(tmp_path):
    # Isolation: a private temp dir, ports and token; never attaches to another cluster.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with local.local_head(num_cpus=1, object_store_memory=100 * 1024**2) as head:
            assert Path(head.session_dir).is_dir() and head.session_dir.startswith(head.state_dir)
            assert head.pids and set(head.pids) <= set(local.find_head_processes(head.head_id))
            # the Jobs API refuses a caller without the head's token
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(f"{head.dashboard_url}/api/jobs/", timeout=10)
            assert e.value.code in (401, 403)

            # 1) through the CLI: python -m cluster.jobs --head <record> -- probe ARGS
            out = tmp_path / "ok.json"
            proc = subprocess.run(
                [sys.executable, "-m", "cluster.jobs", "--head", str(head.record_path), "--",
                 PROBE, "--out", str(out), *HOSTILE],
                cwd=REPO, env=head.client_env(), capture_output=True, text=True, timeout=120,
                check=False)
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
            assert "SUCCEEDED" in proc.stderr
            report = json.loads(out.read_text())
            assert report["rest"] == HOSTILE  # every argument arrived as one word, unexpanded
            assert not Path("/tmp/cr-pwned").exists()
            assert report["has_numpy"] and report["ray_address"]  # project env, attached to Ray
            assert PROBE in report["files"] and "pipelines/evaluate.py" in report["files"]
            assert not [f for f in report["files"]
                        if f.split("/")[0] in {".venv", ".git", "outputs"} or "__pycache__" in f]

            # 2) through the API: the job's own exit status comes back
            res = jobs.submit(jobs.JobSpec(script=PROBE, working_dir=str(REPO),
                                           address=head.dashboard_url,
                                           args=("--out", str(tmp_path / "bad.json"), "--exit", "3")),
                              env=head.client_env(), timeout=120)
            assert (res.status, res.exit_code) == ("FAILED", 3)
            started = set(local.find_head_processes(head.head_id))
        state_dir = Path(head.state_dir)
        # stopped: none of its processes is left, its state dir is gone, the bystander lives
        assert local.find_head_processes(head.head_id) == []
        for pid in started:
            assert not Path(f"/proc/{pid}").exists() or local._is_zombie(pid) or \
                f"{local.MARKER_ENV}={head.head_id}".encode() not in \
                Path(f"/proc/{pid}/environ").read_bytes()
        assert not state_dir.exists()
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


# ---------------------------------------------------------------- nightly schedule files

REINDEX_OPTIONS = ("--gallery-manifest", "--model", "--work", "--index-root", "--name",
                   "--validation")
LOCK = "/run/lock/centroid-reindex.lock"


def _cron_jobs(text: str) -> list[tuple[list[str], str]]:
    """(five schedule fields, command) of every active crontab line."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" in line.split()[0]:
            continue
        fields = line.split(None, 5)
        out.append((fields[:5], fields[5]))
    return out


def test_nightly_crontab_runs_reindex_under_a_lock_with_logs():
    text = (REPO / "cluster" / "nightly.crontab").read_text()
    entries = _cron_jobs(text)
    reindex = [cmd for _, cmd in entries if "pipelines/reindex.py" in cmd]
    assert len(reindex) == 1, "exactly one active nightly run"
    for fields, cmd in entries:
        assert all(f == "*" or f.replace(",", "").replace("-", "").isdigit() for f in fields)
        # cron turns an unescaped % into a newline
        assert "%" not in cmd.replace("\\%", "")
    cmd = reindex[0]
    assert f"flock -n -E 75 {LOCK}" in cmd
    assert ">> \"$LOGDIR/" in cmd and cmd.endswith("2>&1")
    words = shlex.split(cmd.split("pipelines/reindex.py", 1)[1].split(">>")[0])
    opts = [w for w in words if w.startswith("--")]
    assert sorted(opts) == sorted(REINDEX_OPTIONS)
    assert all(not words[words.index(o) + 1].startswith("--") for o in opts)


def test_systemd_units_are_single_instance_and_share_the_lock():
    import configparser

    def parse(name):
        cp = configparser.ConfigParser(strict=False, interpolation=None)
        cp.optionxform = str
        cp.read(REPO / "cluster" / name)
        return cp

    svc, timer = parse("centroid-reindex.service"), parse("centroid-reindex.timer")
    assert svc["Service"]["Type"] == "oneshot"  # systemd never runs two at once
    exec_start = svc["Service"]["ExecStart"]
    assert exec_start.startswith(f"/usr/bin/flock -n -E 75 {LOCK} ")
    assert "75" in svc["Service"]["SuccessExitStatus"].split()
    words = exec_start.split()
    assert "pipelines/reindex.py" in words
    assert sorted(w for w in words if w.startswith("--")) == sorted(REINDEX_OPTIONS)
    assert timer["Timer"]["Unit"] == "centroid-reindex.service"
    assert timer["Timer"]["OnCalendar"] and timer["Timer"]["Persistent"] == "true"
    assert timer["Install"]["WantedBy"] == "timers.target"


def test_systemd_units_verify(tmp_path):
    import shutil

    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed")
    for name in ("centroid-reindex.service", "centroid-reindex.timer"):
        shutil.copy(REPO / "cluster" / name, tmp_path / name)
    proc = subprocess.run([tool, "verify", str(tmp_path / "centroid-reindex.timer"),
                           str(tmp_path / "centroid-reindex.service")],
                          capture_output=True, text=True, timeout=60, check=False)
    problems = [ln for ln in (proc.stdout + proc.stderr).splitlines()
                if "centroid-reindex" in ln and "/opt/centroid-retrieval" not in ln]
    assert proc.returncode == 0 and not problems, proc.stdout + proc.stderr


def test_nightly_options_exist_in_reindex_help():
    script = REPO / "pipelines" / "reindex.py"
    if not script.is_file():
        pytest.skip("pipelines/reindex.py not written yet")
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for opt in REINDEX_OPTIONS:
        assert opt in proc.stdout
