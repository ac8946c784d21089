"""The declared API of `contracts`: every name in __all__ resolves, lazily."""
import subprocess
import sys
from pathlib import Path

import contracts

REPO = Path(__file__).resolve().parents[2]


def test_every_declared_name_resolves_to_its_submodule():
    assert sorted(contracts.__all__) == sorted(contracts._WHERE) and len(set(contracts.__all__)) == len(contracts.__all__)
    for name in contracts.__all__:
        value = getattr(contracts, name)
        module = __import__(f"contracts.{contracts._WHERE[name]}", fromlist=[name])
        assert value is getattr(module, name), name
        assert name in module.__all__, f"{name} not declared by contracts.{module.__name__}"
    for sub in contracts.SUBMODULES:
        assert getattr(contracts, sub).__name__ == f"contracts.{sub}"
    assert set(contracts.__all__) <= set(dir(contracts))


def test_unknown_name_is_an_attribute_error():
    import pytest

    with pytest.raises(AttributeError, match="no attribute 'read_vectorz'"):
        contracts.read_vectorz  # noqa: B018


def test_import_contracts_is_light():
    code = ("import sys, contracts; heavy = [m for m in ('pyarrow', 'pyarrow.dataset', 'torch', 'numpy') "
            "if m in sys.modules]; print(','.join(heavy)); contracts.row_keys; "
            "print('pyarrow.dataset' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    first, second = out.stdout.splitlines()
    assert first == "", f"import contracts loaded {first}"
    assert second == "False"  # the row key needs pyarrow, not the dataset layer
