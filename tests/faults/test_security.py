"""Security checks: a static scan of the code for unsafe loading / execution, and the
hostile-input paths that are not already covered elsewhere.

Already covered (not repeated here):
- tests/model/test_shards.py::test_member_names_are_never_paths (hostile tar through the reader)
- tests/model/test_ingest.py::test_manifest_path_escape_is_refused (make_shards manifests)
- tests/model/test_ingest.py::test_scan_folders_rejects_symlinks_out
- tests/model/test_config.py::test_yaml_cannot_construct_objects (!!python/object/apply)
- tests/model/test_checkpoint.py::test_load_errors (pickled objects in model.pt refused)
- tests/cluster/test_jobs.py::test_submit_runs_without_shell_and_returns_the_driver_exit_status
"""
from __future__ import annotations

import ast
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("model", "index", "pipelines", "cluster")

# (file, call) pairs allowed to break a rule, each with the reason.
ALLOW: dict[tuple[str, str], str] = {
    # demo.py runs the project's own jobs one after another: an argument list built from
    # fixed strings and a --out path, never a shell (checked below: no shell=True anywhere).
    ("pipelines/demo.py", "subprocess.run"): "argument list of our own job commands",
    # cluster glue starts `ray start` / `ray job submit` / a python -c info snippet as
    # argument lists without a shell (tests/cluster/test_jobs.py checks the lists).
    ("cluster/jobs.py", "subprocess.run"): "argument lists, no shell",
    ("cluster/local.py", "subprocess.run"): "argument lists, no shell",
    ("cluster/local.py", "subprocess.Popen"): "argument lists, no shell",
    # the packages' lazy public attributes (PEP 562): the module names come from the package's
    # own fixed name -> submodule table, never from input
    ("contracts/__init__.py", "importlib.import_module"): "fixed table of own submodules",
    ("index/__init__.py", "import_module"): "fixed table of own submodules",
    ("model/__init__.py", "importlib.import_module"): "fixed table of own submodules",
}


def _sources(repo: Path):
    for pkg in PACKAGES:
        if not (repo / pkg).is_dir():
            continue
        for path in sorted((repo / pkg).rglob("*.py")):
            yield path.relative_to(repo).as_posix(), ast.parse(path.read_text(), str(path))


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    # a call on an expression (net.to(d).eval()) gets a '?' base: never a bare builtin name
    parts.append(node.id if isinstance(node, ast.Name) else "?")
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return None


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def scan_problems(repo: Path = REPO) -> list[str]:
    """Every unsafe construct in model/ index/ pipelines/ cluster/ as 'file:line: what'."""
    bad = []
    for rel, tree in _sources(repo):
        for node in ast.walk(tree):
            where = f"{rel}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                for n in names:
                    if n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib"):
                        bad.append(f"{where}: imports {n}")
            if not isinstance(node, ast.Call):
                continue
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if name in ("eval", "exec", "compile", "__import__"):
                bad.append(f"{where}: {name}()")
            if name in ("os.system", "os.popen", "os.execv", "os.execvp", "os.spawnl", "commands.getoutput",
                        "subprocess.getoutput", "subprocess.getstatusoutput"):
                bad.append(f"{where}: {name}() runs a shell")
            if _is_true(_kw(node, "shell")):
                bad.append(f"{where}: {name}(shell=True)")
            if name.startswith("subprocess.") and (rel, name) not in ALLOW:
                bad.append(f"{where}: {name}() not in the allow-list")
            if (last == "import_module" or name == "importlib.__import__") and (rel, name) not in ALLOW:
                bad.append(f"{where}: {name}() imports a computed module name")
            if name == "torch.load" and not _is_true(_kw(node, "weights_only")):
                bad.append(f"{where}: torch.load without weights_only=True")
            if name in ("np.load", "numpy.load") and _kw(node, "allow_pickle") is not None \
                    and not (isinstance(_kw(node, "allow_pickle"), ast.Constant) and _kw(node, "allow_pickle").value is False):
                bad.append(f"{where}: np.load(allow_pickle=...)")
            if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
                bad.append(f"{where}: {name}() can construct Python objects (use yaml.safe_load)")
            if last in ("read_pickle", "to_pickle") or name.startswith("pickle."):
                bad.append(f"{where}: {name}() pickles")
    return bad


def test_static_scan_finds_no_unsafe_loading_or_execution():
    assert scan_problems() == []


def test_static_scan_catches_what_it_is_meant_to(tmp_path):
    """The scan itself can fail: each forbidden construct in a planted file is reported."""
    planted = tmp_path / "model"
    planted.mkdir()
    (planted / "evil.py").write_text(
        "import pickle\nimport os, subprocess, importlib, torch, yaml\nimport numpy as np\n"
        "eval('1')\nexec('x=1')\nos.system('ls')\nsubprocess.run('ls', shell=True)\n"
        "torch.load('m.pt')\ntorch.load('m.pt', weights_only=False)\nnp.load('a.npy', allow_pickle=True)\n"
        "importlib.import_module(name)\nyaml.load(s)\n")
    found = scan_problems(tmp_path)
    for what in ("imports pickle", "eval()", "exec()", "os.system()", "shell=True", "not in the allow-list",
                 "torch.load without", "allow_pickle", "import_module", "yaml.load()"):
        assert any(what in f for f in found), (what, found)
    assert sum("torch.load without" in f for f in found) == 2


# ---- configs cannot name Python objects ---------------------------------------------------

def test_model_config_and_yaml_never_import_user_names(tmp_path):
    from model.config import ModelConfig, load_config

    # a backbone is looked up in a fixed table, never resolved as an attribute / import path
    for name in ("os.system", "__import__", "resnet50.__class__", "../resnet50"):
        with pytest.raises(ValueError, match="unknown backbone"):
            ModelConfig(backbone=name)
    for text in ("model: !!python/name:os.system\n",
                 "model: !!python/object/new:subprocess.Popen [['touch', 'pwned']]\n",
                 "train: !!python/module:os\n"):
        p = tmp_path / "c.yaml"
        p.write_text(text)
        with pytest.raises(ValueError):
            load_config(str(p))
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_model_dir_config_json_cannot_name_objects(tmp_path):
    """A model directory whose config.json names an object as backbone is refused on load
    (the config is checked before the weights are even parsed)."""
    from model.checkpoint import load_model
    from model.config import ModelConfig

    raw = json.loads(ModelConfig(backbone="resnet18", input_size=(32, 16)).to_json())
    raw["backbone"] = "os.system"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    (tmp_path / "m" / "model.pt").write_bytes(b"placeholder")
    with pytest.raises(ValueError, match="unknown backbone"):
        load_model(str(tmp_path / "m"))


# ---- hostile tar through the embed reader ---------------------------------------------------

def _png(size=(8, 8)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_hostile_tar_through_embed_reader_writes_nothing(tmp_path, monkeypatch):
    """'../evil', absolute names, a symlink and a hard link in a shard read by embed's reader:
    the samples come out as data, no file appears anywhere."""
    from model.embedding import samples_from_shards

    row = {"image_id": "x.png", "item_id": "1", "camera_id": 1, "split": "gallery", "path": "x.png"}
    evil = tmp_path / "gallery-000000.tar"
    with tarfile.open(evil, "w") as t:
        for stem in ("../../evil", "/tmp/cr-abs-evil", "ok"):
            for ext, data in (("png", _png()), ("json", json.dumps({**row, "image_id": stem + ".png"}).encode())):
                info = tarfile.TarInfo(f"{stem}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("lnk.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(link)
        hard = tarfile.TarInfo("hard.png")
        hard.type, hard.linkname = tarfile.LNKTYPE, "/etc/passwd"
        t.addfile(hard)
    work = tmp_path / "w1" / "w2"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = set(os.listdir("/tmp"))
    tables = list(samples_from_shards([str(evil)]))
    ids = [i for t in tables for i in t.column("image_id").to_pylist()]
    assert "ok.png" in ids
    assert sorted(os.listdir(tmp_path)) == ["gallery-000000.tar", "w1"]
    assert os.listdir(work) == [] and os.listdir(tmp_path / "w1") == ["w2"]
    assert not (set(os.listdir("/tmp")) - before) & {"cr-abs-evil.png", "cr-abs-evil.json"}
    # the symlink / hard link never produced the content of /etc/passwd
    passwd = Path("/etc/passwd").read_bytes() if Path("/etc/passwd").exists() else b"\0never"
    for t in tables:
        assert passwd not in t.column("image").to_pylist()


# ---- manifest paths cannot escape the dataset root (embed --manifest) -----------------------

def test_embed_manifest_paths_cannot_escape_root(tmp_path):
    from model.embedding import manifest_sample_table

    root = tmp_path / "root"
    root.mkdir()
    (root / "in.png").write_bytes(_png())
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png((9, 9)))
    rows = [{"image_id": p, "item_id": "1", "camera_id": None, "split": "gallery", "path": p}
            for p in ("in.png", "../secret.png", str(secret), "sub/../../secret.png")]
    t = manifest_sample_table(rows, str(root))
    images, errors = t.column("image").to_pylist(), t.column("read_error").to_pylist()
    assert images[0] and errors[0] is None
    for img, err in zip(images[1:], errors[1:]):
        assert img == b"" and err is not None and "root" in err
