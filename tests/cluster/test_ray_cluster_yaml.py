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


def test_setup_installs_the_project():
    cfg = _prepared(_load())
    pins = _makefile_pins()
    assert set(pins) == {"torch", "torchvision"}
    torch_cmd = f"torch=={pins['torch']} torchvision=={pins['torchvision']}"
    # prepare_config merges setup_commands into the head's and the workers' lists (in order)
    head, workers = cfg["head_setup_commands"], cfg["worker_setup_commands"]
    for cmds, extra, other in ((head, "cpu", "gpu"), (workers, "gpu", "cpu")):
        joined = "\n".join(cmds)
        i_torch = next(i for i, c in enumerate(cmds) if "pip install" in c and torch_cmd in c)
        i_proj = next(i for i, c in enumerate(cmds) if re.search(
            rf'pip install -e "\.\[{extra}\]"', c))
        assert i_torch < i_proj, "torch first, then the project"
        assert f'.[{other}]' not in joined, "faiss-cpu and faiss-gpu must not both be installed"
    # the project is installed from the directory file_mounts syncs the repository to
    remote = [r for r, local in cfg["file_mounts"].items() if local in (".", "./")]
    assert len(remote) == 1
    assert all(f"cd {remote[0]}" in c for c in head + workers if "pip install -e" in c)
    # the extras named exist in pyproject.toml
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"cpu", "gpu"} <= set(extras)


def test_sync_excludes_local_state_and_nodes_use_token_auth():
    cfg = _prepared(_load())
    excl = set(cfg["rsync_exclude"])
    assert {".venv", ".git", "__pycache__"} <= excl
    assert any(e.strip("/") == "outputs" for e in excl)
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        start = [c for c in cmds if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c for c in start)
    assert "~/.ray/auth_token" in cfg["file_mounts"]
