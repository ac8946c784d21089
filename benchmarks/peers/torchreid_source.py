"""torchreid's evaluation and re-ranking code, taken from its PyPI sdist at run time (not vendored).

`load(cache)` downloads torchreid's source distribution once (`pip download --no-binary :all:
--no-deps`, into `cache`), unpacks the two pure-numpy files the peers benchmark runs,
torchreid/reid/metrics/rank.py (`eval_market1501`, its Python form: the Cython extension is
not built) and torchreid/reid/utils/rerank.py (`re_ranking`), and imports them as modules
without installing torchreid (whose setup builds Cython extensions and pins old packages).
"""
from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys
import tarfile

VERSION = "0.2.5"
FILES = {"rank": "torchreid/reid/metrics/rank.py", "rerank": "torchreid/reid/utils/rerank.py"}


def fetch(cache: pathlib.Path, version: str = VERSION) -> pathlib.Path:
    """The unpacked sdist folder (downloaded on first use)."""
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / f"torchreid-{version}"
    if all((root / f).is_file() for f in FILES.values()):
        return root
    sdist = cache / f"torchreid-{version}.tar.gz"
    if not sdist.is_file():
        r = subprocess.run([sys.executable, "-m", "pip", "download", f"torchreid=={version}", "--no-deps",
                            "--no-binary", ":all:", "--no-build-isolation", "-d", str(cache), "-q"],
                           capture_output=True, text=True, check=False)
        if r.returncode or not sdist.is_file():
            last = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
            raise SystemExit(f"could not download the torchreid {version} sdist from PyPI: {last[0]}")
    with tarfile.open(sdist) as t:
        members = [m for m in t.getmembers() if m.name.removeprefix(f"torchreid-{version}/") in FILES.values()]
        t.extractall(cache, members=members, filter="data")
    return root


def load(cache: pathlib.Path, version: str = VERSION):
    """(rank module, rerank module) of torchreid `version`."""
    root = fetch(cache, version)
    mods = []
    for name, rel in FILES.items():
        spec = importlib.util.spec_from_file_location(f"torchreid_{name}", root / rel)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mods.append(mod)
    return tuple(mods)
