"""Every `module.name` that portattn's modules use on each other exists.

GPU-only code paths (launch, allocation, streams) never run in CPU CI; a reference to a
helper that was renamed or deleted would only fail on a GPU. This catches that on CPU.
"""
import ast
import importlib
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / "portattn"


def _internal_refs():
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                base = path.relative_to(PKG.parent).with_suffix("").parts[:-node.level]
                for a in node.names:
                    mod = ".".join(base + tuple(filter(None, [node.module, a.name])))
                    aliases[a.asname or a.name] = mod
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases):
                yield path.name, aliases[node.value.id], node.attr


@pytest.mark.parametrize("where, module, attr", sorted(set(_internal_refs())))
def test_reference_exists(where, module, attr):
    try:
        mod = importlib.import_module(module)
    except ImportError:
        pytest.skip(f"{module} is a name, not a module")
    assert hasattr(mod, attr), f"{where} uses {module}.{attr}, which does not exist"
