"""index's declared public API: every name resolves, and `import index` stays light."""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import index

ROOT = Path(__file__).resolve().parents[2]


def test_every_public_name_resolves():
    for name in index.__all__:
        assert getattr(index, name) is not None, name
    assert index.rerank_chain.__module__ == "index.rerank.chain"
    assert index.RerankConfig is importlib.import_module("index.rerank.chain").RerankConfig
    assert sorted(index.__all__) == sorted(["open", *index._WHERE])  # one list, one map
    importlib.import_module("index.rerank.kreciprocal")
    assert index.rerank.kreciprocal.__name__ == "index.rerank.kreciprocal"  # the subpackage keeps its name


def test_import_index_does_not_load_faiss_or_torch():
    code = ("import sys, json, index; index.RerankConfig; index.open; "
            "print(json.dumps([m for m in ('faiss', 'torch', 'ray') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
