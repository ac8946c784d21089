"""The declared `model` API: every public name resolves lazily, and `import model` is light."""
import importlib
import subprocess
import sys

import pytest

import model


def test_every_public_name_resolves_to_its_defining_module():
    # import every submodule first: a public name that is also a submodule's name would then
    # come back as the module instead of the function
    for mod in sorted(set(model._NAMES.values())):
        importlib.import_module(mod)
    for name in model.__all__:
        value = getattr(model, name)
        if name in model._MODULES:
            assert value is importlib.import_module(f"model.{name}")
        else:
            assert value is getattr(importlib.import_module(model._NAMES[name]), name), name
    assert set(model.__all__) <= set(dir(model))
    assert model.losses.batch_hard_triplet is model.batch_hard_triplet


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        model.no_such_name  # noqa: B018


def test_import_model_does_not_import_torch():
    code = ("import sys, model; cfg = model.ModelConfig(backbone='resnet18'); "
            "heavy = [m for m in ('torch', 'torchvision', 'PIL', 'pyarrow', 'ray') if m in sys.modules]; "
            "print(','.join(heavy) or 'none')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "none", out.stdout


def test_all_lists_exactly_the_lazy_names():
    assert sorted(model.__all__) == sorted([*model._NAMES, *model._MODULES])
