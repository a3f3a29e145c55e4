"""Model modules use fastvit.checkpoints through its public names only (#13 item 3): no import of, and no
attribute access to, an ``_``-prefixed module or name of ``fastvit.checkpoints``."""

from __future__ import annotations

import ast
from pathlib import Path

import fastvit

MODELS = Path(fastvit.__file__).parent / "models"
CHECKPOINTS = "fastvit.checkpoints"


def _is_private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def _private_in(dotted: str) -> bool:
    """``dotted`` names something under fastvit.checkpoints through a private component."""
    if dotted != CHECKPOINTS and not dotted.startswith(CHECKPOINTS + "."):
        return False
    return any(_is_private(part) for part in dotted.split(".")[2:])


def _absolute(module: str | None, level: int, package: str) -> str:
    if not level:
        return module or ""
    base = package.split(".")
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _dotted(node: ast.AST) -> list[str] | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id] + parts[::-1]


def private_checkpoint_uses(source: str, package: str = "fastvit.models") -> list[str]:
    """Every place in ``source`` (a module of ``package``) that reaches a private name of fastvit.checkpoints."""
    tree = ast.parse(source)
    bound: dict[str, str] = {}  # local name -> the dotted path it stands for
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _private_in(alias.name):
                    found.append(f"line {node.lineno}: import {alias.name}")
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    root = alias.name.split(".")[0]
                    bound[root] = root
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(node.module, node.level, package)
            for alias in node.names:
                full = f"{module}.{alias.name}"
                if _private_in(full):
                    found.append(f"line {node.lineno}: from {module} import {alias.name}")
                bound[alias.asname or alias.name] = full
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            parts = _dotted(node)
            if parts and parts[0] in bound:
                full = ".".join([bound[parts[0]]] + parts[1:])
                if _private_in(full) and not _private_in(bound[parts[0]]):  # the import itself is reported above
                    found.append(f"line {node.lineno}: {'.'.join(parts)} ({full})")
    return sorted(set(found))


def test_checker_finds_private_uses():
    """The checker itself: every way of reaching a private name is reported, public uses are not."""
    bad = {
        "from fastvit.checkpoints._io import read_container": "_io",
        "from fastvit.checkpoints import _io": "_io",
        "import fastvit.checkpoints._io": "_io",
        "import fastvit.checkpoints._io as io": "_io",
        "from fastvit.checkpoints.reader import _unwrap": "_unwrap",
        "from ...checkpoints._common import shorten": "_common",
        "from fastvit import checkpoints\ncheckpoints._io.read_container": "_io",
        "import fastvit.checkpoints.reader as r\nr._unwrap({}, True)": "_unwrap",
        "import fastvit\nfastvit.checkpoints._io.read_container('x')": "_io",
        "from fastvit.checkpoints import mmseg\nmmseg._IN_PROJ": "_IN_PROJ",
    }
    for source, name in bad.items():
        found = private_checkpoint_uses(source, package="fastvit.models.segmentation")
        assert found and name in found[0], (source, found)
    good = (
        "from fastvit.checkpoints import mmseg\nmmseg.load_backbone(m, p)\nmmseg.__name__",
        "from fastvit.checkpoints import CheckpointError, read_checkpoint",
        "from fastvit.models.segmentation._common import Features",  # private, but not of checkpoints
        "import fastvit\nfastvit.checkpoints.mmseg.read_segmentor(p)",
        "from ._common import _resize",
    )
    for source in good:
        assert private_checkpoint_uses(source, package="fastvit.models.segmentation") == [], source


def test_models_use_public_checkpoint_names_only():
    files = sorted(MODELS.rglob("*.py"))
    assert MODELS / "segmentation" / "backbone.py" in files and MODELS / "segmentation" / "segmentor.py" in files
    problems = []
    for path in files:
        rel = path.relative_to(MODELS.parent.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        package = ".".join(parts if rel.name == "__init__" else parts[:-1])
        problems += [f"{rel}.py {use}" for use in private_checkpoint_uses(path.read_text(), package)]
    assert not problems, "model modules reach private fastvit.checkpoints names (make them public there): " + "; ".join(
        problems
    )
