"""The package's layout rule: the library (``medssl.<module>``) never imports a wing, ``medssl.lab`` may import
``medssl.clinic`` but not the reverse, only the command line (``medssl.cli``, ``medssl.__main__``) imports everything,
and no two modules import each other (no import cycle of any length). Imports inside functions count too."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, List, Set

from helpers import REPO

PACKAGE = REPO / "shared" / "medssl"
FRONT = {"medssl.cli", "medssl.__main__"}
# wing -> the wings it may import
ALLOWED = {"library": {"library"}, "clinic": {"library", "clinic"}, "lab": {"library", "clinic", "lab"}}


def module_names(root: Path) -> Dict[str, Path]:
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def import_graph(root: Path) -> Dict[str, Set[str]]:
    """module -> the package's modules it imports (``from a import b`` counts as ``a.b`` where that is a module)."""
    names = module_names(root)
    top = root.name
    graph: Dict[str, Set[str]] = {}
    for name, path in names.items():
        is_pkg = path.name == "__init__.py"
        targets: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative import
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    targets.add(sub if sub in names else module)
        graph[name] = {t for t in targets if t in names and t != name and (t == top or t.startswith(top + "."))}
    return graph


def wing(module: str) -> str:
    parts = module.split(".")
    if module in FRONT:
        return "front"
    if len(parts) > 1 and parts[1] in ("clinic", "lab"):
        return parts[1]
    return "library"


def violations(graph: Dict[str, Set[str]]) -> List[str]:
    found = []
    for src, targets in sorted(graph.items()):
        for dst in sorted(targets):
            a, b = wing(src), wing(dst)
            if a != "front" and b not in ALLOWED[a]:  # the command line may import anything; nothing imports it
                found.append(f"{src} ({a}) imports {dst} ({b})")
    return found


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted. A package's ``__init__``
    importing its own submodules, and those importing each other, is an edge like any other."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_three_wings_exist_and_the_library_keeps_what_bundles_name():
    names = module_names(PACKAGE)
    for module in ("segment", "dicom", "dicom_node", "label", "runtime_choice", "release"):
        assert f"medssl.clinic.{module}" in names
    for module in ("benchmark", "speed", "demo", "sample_data", "prepare_la"):
        assert f"medssl.lab.{module}" in names
    # every medssl.<module> a bundle config names (the committed bundles' configs) is a library module
    named = set()
    for config in (REPO / "bundles").glob("*/configs/*.json"):
        for dotted in re.findall(r"\bmedssl(?:\.\w+)+", config.read_text()):
            parts = dotted.split(".")
            named.update(".".join(parts[:i]) for i in range(2, len(parts) + 1) if ".".join(parts[:i]) in names)
    assert {"medssl.export", "medssl.precision", "medssl.networks", "medssl.data"} <= named
    assert all(wing(m) == "library" for m in named), sorted(m for m in named if wing(m) != "library")


def test_no_module_imports_against_the_layout():
    graph = import_graph(PACKAGE)
    assert graph["medssl.cli"] & {"medssl.clinic.segment", "medssl.lab.benchmark"}  # the graph sees lazy imports
    assert violations(graph) == []


def test_no_import_cycle():
    assert cycles(import_graph(PACKAGE)) == []


def test_the_checks_find_what_they_forbid(tmp_path):
    pkg = tmp_path / "medssl"
    for rel, text in {
        "__init__.py": "",
        "cli.py": "from medssl.lab import demo\nfrom medssl.clinic import segment\n",
        "networks.py": "def f():\n    from medssl.clinic.segment import x\n",  # library -> clinic, lazily
        "export.py": "from medssl import openvino\n",
        "openvino.py": "from .data import y\n",
        "data.py": "import medssl.export\n",  # export -> openvino -> data -> export
        "clinic/__init__.py": "",
        "clinic/segment.py": "from medssl.lab.demo import z\nfrom medssl.cli import main\n",  # clinic -> lab, -> front
        "lab/__init__.py": "",
        "lab/demo.py": "from medssl.clinic import segment\nfrom medssl.networks import VNet\n",  # allowed
    }.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    graph = import_graph(pkg)
    assert graph["medssl.openvino"] == {"medssl.data"}  # relative import resolved
    assert violations(graph) == [
        "medssl.clinic.segment (clinic) imports medssl.cli (front)",
        "medssl.clinic.segment (clinic) imports medssl.lab.demo (lab)",
        "medssl.networks (library) imports medssl.clinic.segment (clinic)",
    ]
    assert cycles(graph) == [
        ["medssl.cli", "medssl.clinic.segment", "medssl.lab.demo", "medssl.networks"],
        ["medssl.data", "medssl.export", "medssl.openvino"],
    ]


# "one concern per module, about 600 lines at most": a module past this is due for a split along its concerns
MAX_MODULE_LINES = 650


def test_no_module_is_past_the_size_of_one_concern():
    files = [p for p in sorted(PACKAGE.rglob("*.py")) + sorted((REPO / "apps").rglob("*.py")) if "model" not in p.parts]
    lines = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p in files}
    assert len(lines) > 40 and "shared/medssl/openvino_int8.py" in lines and "apps/monailabel/main.py" in lines
    too_long = {path: n for path, n in lines.items() if n > MAX_MODULE_LINES}
    assert not too_long, f"modules past {MAX_MODULE_LINES} lines (split them by concern): {too_long}"
