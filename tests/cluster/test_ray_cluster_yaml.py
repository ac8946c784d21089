"""ray_cluster.yaml passes Ray's own launcher validation offline and sets up what we need.

prepare_config + validate_config are the checks `ray up` runs before it talks to the cloud
(defaults merged, JSON schema, node types); no network or credentials are needed.
"""
import copy
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "ray_cluster.yaml"

jsonschema = pytest.importorskip("jsonschema")


def _load() -> dict:
    with open(CONFIG) as f:
        return yaml.safe_load(f)


def _prepared(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def _makefile_pins() -> dict[str, str]:
    """torch / torchvision versions pinned by the Makefile's install step."""
    text = (REPO / "Makefile").read_text()
    return dict(re.findall(r"\b(torch|torchvision)==([\w.+-]+)", text))


def test_config_validates_with_ray():
    cfg = _prepared(_load())
    assert cfg["provider"]["type"] == "aws"
    assert cfg["head_node_type"] in cfg["available_node_types"]


def test_raw_config_matches_the_schema_without_defaults():
    # The file itself (not only the merged result) must follow Ray's schema.
    import json

    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(_load(), schema)


def test_validation_rejects_broken_variants():
    # The validation above can fail: a wrong head type, a non-integer GPU count, an unknown
    # field, min_workers above max_workers are all refused.
    base = _load()
    bad_head = copy.deepcopy(base)
    bad_head["head_node_type"] = "no.such.type"
    bad_gpu = copy.deepcopy(base)
    gpu_type = next(t for t, v in bad_gpu["available_node_types"].items()
                    if v["resources"].get("GPU"))
    bad_gpu["available_node_types"][gpu_type]["resources"]["GPU"] = "one"
    bad_field = copy.deepcopy(base)
    bad_field["available_node_types"][gpu_type]["gpus"] = 1
    too_many = copy.deepcopy(base)
    too_many["available_node_types"][gpu_type]["min_workers"] = base["max_workers"] + 1
    for bad in (bad_head, bad_gpu, bad_field, too_many):
        with pytest.raises((ValueError, jsonschema.ValidationError)):
            _prepared(bad)
    # and the unmodified copy still passes, so the failures come from the edits
    _prepared(copy.deepcopy(base))


def test_cpu_head_and_autoscaling_gpu_workers():
    cfg = _prepared(_load())
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU", 0) > 0
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_types = {name: t for name, t in types.items()
                 if name != cfg["head_node_type"] and t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "a worker type must request GPU resources"
    for t in gpu_types.values():
        # autoscaling: can scale up from its minimum, within the global cap
        assert t["max_workers"] > t.get("min_workers", 0)
        assert t["max_workers"] <= cfg["max_workers"]
        assert t["resources"].get("CPU", 0) > 0
    assert cfg["idle_timeout_minutes"] > 0


def worker_setup(cfg: dict, node_type: str) -> list[str]:
    """The setup commands a worker of `node_type` runs, as Ray's autoscaler picks them: the
    type's own worker_setup_commands if it has them, else the merged global list."""
    return cfg["available_node_types"][node_type].get("worker_setup_commands",
                                                      cfg["worker_setup_commands"])


def test_a_cpu_and_a_gpu_worker_type_both_autoscale():
    cfg = _prepared(_load())
    workers = {n: t for n, t in cfg["available_node_types"].items() if n != cfg["head_node_type"]}
    cpu = [n for n, t in workers.items() if t["resources"].get("CPU", 0) > 0
           and not t["resources"].get("GPU", 0)]
    gpu = [n for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1]
    assert cpu and gpu, workers
    for n in cpu + gpu:
        assert workers[n]["max_workers"] > workers[n].get("min_workers", 0)


def test_setup_installs_the_project():
    cfg = _prepared(_load())
    pins = _makefile_pins()
    assert set(pins) == {"torch", "torchvision"}
    torch_cmd = f"torch=={pins['torch']} torchvision=={pins['torchvision']}"
    # prepare_config merges setup_commands into the head's and the workers' lists (in order);
    # a node type's own list replaces the merged one for its nodes
    node_cmds = [(cfg["head_setup_commands"], "cpu", "gpu")]
    for name, t in cfg["available_node_types"].items():
        if name != cfg["head_node_type"]:
            node_cmds.append((worker_setup(cfg, name), "gpu" if t["resources"].get("GPU") else "cpu",
                              "cpu" if t["resources"].get("GPU") else "gpu"))
    assert len(node_cmds) == 3
    for cmds, extra, other in node_cmds:
        joined = "\n".join(cmds)
        assert "python3 -m venv ~/cr-venv" in cmds[0], "the venv first"
        i_torch = next(i for i, c in enumerate(cmds) if "pip install" in c and torch_cmd in c)
        i_proj = next(i for i, c in enumerate(cmds) if re.search(
            rf'pip install -e "\.\[{extra}\]"', c))
        assert i_torch < i_proj, "torch first, then the project"
        assert f'.[{other}]' not in joined, "faiss-cpu and faiss-gpu must not both be installed"
    # the project is installed from the directory file_mounts syncs the repository to
    remote = [r for r, local in cfg["file_mounts"].items() if local in (".", "./")]
    assert len(remote) == 1
    assert all(f"cd {remote[0]}" in c for cmds, _, _ in node_cmds for c in cmds if "pip install -e" in c)
    # the extras named exist in pyproject.toml
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"cpu", "gpu"} <= set(extras)


def test_every_node_mounts_the_shared_file_system():
    # index roots and the nightly work dir live on one NFS (EFS) mount all nodes see; it is
    # mounted by initialization_commands (before setup and `ray start`), which no node type
    # replaces, so the head and both worker types run it
    cfg = _prepared(_load())
    init = cfg["initialization_commands"]
    mounts = [c for c in init if re.search(r"\bmount -t nfs4?\b", c)]
    assert len(mounts) == 1
    point = mounts[0].split()[-1]
    assert f"mountpoint -q {point}" in mounts[0], "idempotent: a second `ray up` must not re-mount"
    assert any(f"mkdir -p {point}/indexes {point}/nightly" in c for c in init)
    assert all("initialization_commands" not in t for t in cfg["available_node_types"].values())
    # documented where a user sets the paths
    text = CONFIG.read_text()
    assert f"{point}/indexes" in text and f"{point}/nightly" in text and "s3://" in text


def test_sync_excludes_local_state_and_nodes_use_token_auth():
    cfg = _prepared(_load())
    excl = set(cfg["rsync_exclude"])
    assert {".venv", ".git", "__pycache__"} <= excl
    assert any(e.strip("/") == "outputs" for e in excl)
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        start = [c for c in cmds if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start)
    assert "~/.ray/auth_token" in cfg["file_mounts"]
