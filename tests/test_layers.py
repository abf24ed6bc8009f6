"""The import structure, read from the source with the standard library's ``ast`` (every import counts: module
level, inside functions, and under ``TYPE_CHECKING``): no import circle in ``converter/`` or ``service/``, and
the layers of docs/architecture.md, each importing only its own layer or the ones below it::

    entry       service.cli, service.server, service.launcher, service.__main__
    transports  service.rest.*, service.grpc.*      (peers: neither imports the other; neither imports runtime)
    dataplane   service.dataplane
    runtime     service.runtime.*                   (the only place of onnxruntime, and of the converter besides cli)
    v2          service.v2.*
    shared      service.errors, service.metrics, service.settings, service.logging_setup, service (the face)

and ``converter`` never imports ``service``. FastAPI/Starlette are imported only by ``service.rest``, grpc only by
``service.grpc``.
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterator
from pathlib import Path

from tests.support.layers import LAYERS, layer

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("service", "converter")

#: third-party packages only these service rooms may import
ONLY_IN = {
    "onnxruntime": "service.runtime",
    "fastapi": "service.rest",
    "starlette": "service.rest",
    "grpc": "service.grpc",
}


def source_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported_names(name: str, path: Path, modules: Collection[str]) -> Iterator[str]:
    """The modules the import statements of ``name`` (at ``path``) name, relative imports resolved:
    ``from pkg import sub`` names ``pkg.sub`` when that is a module, else (a name from ``pkg``) ``pkg``."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield sub if sub in modules else base


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(imports between our modules, third-party top-level packages each module imports)."""
    modules = source_modules()
    ours: dict[str, set[str]] = {}
    theirs: dict[str, set[str]] = {}
    for name, path in modules.items():
        names = set(imported_names(name, path, modules))
        ours[name] = {n for n in names if n in modules and n != name}
        theirs[name] = {n.split(".")[0] for n in names if n.split(".")[0] not in PACKAGES}
    return ours, theirs


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circles() -> None:
    ours, _ = graph()
    assert cycles(ours) == []


def test_the_cycle_finder_finds_a_circle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_service_layers_import_only_downwards() -> None:
    ours, _ = graph()
    wrong = []
    for module, deps in sorted(ours.items()):
        if not module.startswith("service"):
            continue
        depth, room = layer(module)
        for dep in sorted(deps):
            if not dep.startswith("service"):
                continue
            dep_depth, dep_room = layer(dep)
            name = LAYERS[depth][0]
            if dep_depth < depth:
                wrong.append(f"{module} ({name}) imports {dep} ({LAYERS[dep_depth][0]}), a layer above")
            elif name == "transports" and dep_depth == depth and dep_room != room:
                wrong.append(f"{module} imports {dep}: the transports are peers")
            elif name == "transports" and LAYERS[dep_depth][0] == "runtime":
                wrong.append(f"{module} imports {dep}: a transport reaches the runtime through the dataplane")
    assert wrong == []


def test_the_converter_never_imports_the_service_and_the_service_imports_it_to_fold_on_load() -> None:
    ours, _ = graph()
    back = [f"{m} imports {d}" for m, deps in ours.items() if m.startswith("converter") for d in deps if "service" in d]
    assert back == []
    users = {m for m, deps in ours.items() if m.startswith("service") and any(d.startswith("converter") for d in deps)}
    assert {layer(m)[1] for m in users} <= {"service.runtime", "service.cli"}, sorted(users)


def test_onnxruntime_and_the_web_and_grpc_stacks_stay_in_their_rooms() -> None:
    _, theirs = graph()
    wrong = [
        f"{module} imports {package} (only {room} may)"
        for module, packages in sorted(theirs.items())
        if module.startswith("service")
        for package, room in ONLY_IN.items()
        if package in packages and not (module == room or module.startswith(room + "."))
    ]
    assert wrong == []
