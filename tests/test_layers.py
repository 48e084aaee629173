"""Dependencies point one way: every evaclip module imports only modules on its own layer or below (imports inside
functions count: a lazy import is still a dependency), the table is the one docs/ARCHITECTURE.md states, and every
module imports on its own."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# bottom first; a module may import its own layer and the layers before it. A name is a top-level module or package
# of evaclip ("models" covers evaclip.models.*); "evaclip" is the package's own __init__ (the public API).
LAYERS = [
    ["errors", "precision", "logging", "cuda_env"],
    ["distributed", "fsdp", "checkpoint_sharded"],
    ["checkpoint", "parallel", "optim", "losses"],
    ["models"],
    ["encoder"],
    ["runs"],
    ["data", "evals", "evaclip"],
    ["config"],
    ["engine"],
    ["tasks"],
    ["train", "export", "bench", "demo", "demo_ltt", "demo_lcl", "memory", "cli", "__main__"],
]


def layer_text() -> str:
    """The table as docs/ARCHITECTURE.md writes it."""
    return " < ".join("[" + ", ".join(line) + "]" if len(line) > 1 else line[0] for line in LAYERS)


def modules() -> list[str]:
    out = []
    for p in sorted((REPO / "evaclip").rglob("*.py")):
        parts = p.relative_to(REPO).with_suffix("").parts
        out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def imports(module: str, source: str, known: set[str]) -> set[str]:
    """The evaclip modules ``source`` (the text of ``module``) imports anywhere: top level and function bodies, not
    under ``if TYPE_CHECKING``. ``from evaclip import x`` is the submodule ``x`` when there is one."""
    is_pkg = module in {m for m in known if any(k.startswith(m + ".") for k in known)} or module == "evaclip"
    pkg = module if is_pkg else module.rsplit(".", 1)[0]
    found = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.split(".")[0] == "evaclip")
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                if base.split(".")[0] == "evaclip":
                    subs = {f"{base}.{a.name}" for a in node.names} & known
                    found.update(subs or {base})
            visit(ast.iter_child_nodes(node))

    visit(ast.parse(source).body)
    return found


def layer_of(module: str) -> int:
    name = module.split(".")[1] if "." in module else "evaclip"
    for i, line in enumerate(LAYERS):
        if name in line:
            return i
    raise AssertionError(f"{module} is in no layer of the table: add it to LAYERS and docs/ARCHITECTURE.md")


def upward_imports(sources: dict[str, str]) -> list[str]:
    """``"a -> b"`` for every import of a module on a higher layer than the importer."""
    known = set(sources)
    bad = []
    for m, src in sorted(sources.items()):
        for d in sorted(imports(m, src, known)):
            if d in known and layer_of(d) > layer_of(m):
                bad.append(f"{m} (layer {layer_of(m)}) -> {d} (layer {layer_of(d)})")
    return bad


def _sources() -> dict[str, str]:
    out = {}
    for m in modules():
        path = REPO / Path(*m.split("."))
        out[m] = (path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).read_text()
    return out


def test_every_import_points_down_the_layer_table():
    assert upward_imports(_sources()) == []


def test_one_upward_import_fails_the_check_even_inside_a_function():
    sources = _sources()
    # models never import the engine: a lazy import in a function body is caught
    sources["evaclip.models.attention"] += "\n\ndef _late():\n    from evaclip.engine.step import accumulate\n"
    # relative imports are resolved too: precision (a leaf) must not reach into models
    sources["evaclip.precision"] += "\nfrom .models import registry\n"
    assert upward_imports(sources) == [
        "evaclip.models.attention (layer 3) -> evaclip.engine.step (layer 8)",
        "evaclip.precision (layer 0) -> evaclip.models.registry (layer 3)",
    ]


def test_the_table_is_the_one_architecture_md_states():
    assert f"`{layer_text()}`" in (REPO / "docs" / "ARCHITECTURE.md").read_text()


def test_every_module_imports_on_its_own():
    """Each module imported first in a clean evaclip namespace (all evaclip modules dropped from sys.modules)."""
    script = (
        "import importlib, sys, traceback\n"
        "bad = []\n"
        "for m in sys.argv[1:]:\n"
        "    for k in [k for k in sys.modules if k == 'evaclip' or k.startswith('evaclip.')]:\n"
        "        del sys.modules[k]\n"
        "    try:\n"
        "        importlib.import_module(m)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{m}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n")
    mods = [m for m in modules() if not m.endswith("__main__")]
    proc = subprocess.run([sys.executable, "-c", script, *mods], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
