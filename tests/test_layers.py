"""The package's layers import downward only (DESIGN.md, "Layout").

A module may import its own layer and the layers below it; an import of a
higher layer (even one inside a function) is a cycle in the design waiting to
happen, and fails here with the module and line named.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "bcjax"

# Bottom first. A module belongs to the first entry its dotted name starts with.
LAYERS = [
    (
        "files, report, stats, clinical, models",
        ("bcjax.files", "bcjax.report", "bcjax.stats", "bcjax.clinical", "bcjax.models"),
    ),
    ("data, config checks, specs", ("bcjax.data", "bcjax.config_check", "bcjax.specs")),
    ("step math", ("bcjax.step",)),
    ("parallel", ("bcjax.parallel",)),
    ("timing", ("bcjax.timing",)),
    ("eval", ("bcjax.eval",)),
    ("train", ("bcjax.train",)),
    ("tools", ("bcjax",)),  # main, cv, scaling, benchmark, predict, evaluate, runtime
]


def layer_of(module: str) -> int:
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} belongs to no layer; add it to LAYERS")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def bcjax_imports(path: pathlib.Path):
    """(line, imported module) for every import of a bcjax module in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "bcjax":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "bcjax":
                # `from bcjax.data import busi` imports bcjax.data.busi
                for alias in node.names:
                    yield node.lineno, f"{node.module}.{alias.name}"


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_layers_cover_every_module():
    assert len(MODULES) > 30
    for path in MODULES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    here = module_name(path)
    mine = layer_of(here)
    upward = []
    for line, target in bcjax_imports(path):
        theirs = layer_of(target)
        if theirs > mine:
            upward.append(
                f"{path.name}:{line} imports {target} ({LAYERS[theirs][0]}) "
                f"from layer '{LAYERS[mine][0]}'"
            )
    assert not upward, "\n".join(upward)


def test_the_check_catches_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from bcjax.train import loop\n")
    found = list(bcjax_imports(bad))
    assert found == [(2, "bcjax.train.loop")]
    assert layer_of("bcjax.train.loop") > layer_of("bcjax.parallel.strategies")
