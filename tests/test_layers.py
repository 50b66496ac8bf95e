"""The import rules of the layers, read from the source (no import is run): rlhfkit has no import circle (imports
inside functions count too: a circle there is a design knot, only hidden); torch is imported only under
rlhfkit/engine/ (and by DPO's loss, which is torch code the engine runs); the Tinker API server imports no torch."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rlhfkit"
TORCH_ALLOWED = {
    "rlhfkit/preference/train_dpo.py",  # the DPO loss: a torch function the engine runs
    "rlhfkit/utils/ml_log.py",  # TensorBoard's event writer ships as torch.utils.tensorboard (imported on first use)
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    deps: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("rlhfkit"):
            submodules = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
            deps.update(submodules)
            if len(submodules) < len(node.names):  # names defined by the module itself
                deps.add(node.module)
        elif isinstance(node, ast.Import):
            deps.update(a.name for a in node.names if a.name.startswith("rlhfkit"))
    return {d for d in deps if d in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_rlhfkit_has_no_import_circle():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    # a package's own __init__ importing its submodules is not a circle: drop module -> its package edges
    for name in graph:
        graph[name] = {d for d in graph[name] if not name.startswith(d + ".")}
    assert _cycles(graph) == []


def test_the_circle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_torch_is_imported_only_under_the_engine():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("rlhfkit/engine/") or rel in TORCH_ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            if any(n == "torch" or n.startswith("torch.") for n in names):
                offenders.append(f"{rel}:{node.lineno}")
    assert offenders == []


def _all_imports(path: Path) -> list[tuple[str, int]]:
    """Every module a file imports (at module level or inside functions), with its line."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, node.lineno))
            out += [(f"{node.module}.{a.name}", node.lineno) for a in node.names]
    return out


VLLM_SIDE = "rlhfkit.engine.vllm_engine"
VLLM_ENVIRONMENT_PACKAGES = {"vllm", "torch", "transformers", "safetensors", "numpy", "ray"}
RLHFKIT_ON_THE_VLLM_SIDE = {  # the torch-free request code the vLLM side shares
    "rlhfkit",
    "rlhfkit.engine",
    "rlhfkit.engine.types",
    "rlhfkit.engine.requests",
    "rlhfkit.engine.settings",
    "rlhfkit.environment",
    "rlhfkit.paths",
}


def test_the_vllm_side_imports_only_what_its_environment_has():
    """Everything under engine/vllm_engine/ runs in the vLLM environment's Python (its own transformers, no
    peft, no rlhfkit dependencies): it and every rlhfkit module it reaches import only the standard library,
    that environment's packages, the shared request code and vllm_engine/ itself."""
    import sys

    modules = _modules()
    todo = [name for name in modules if name == VLLM_SIDE or name.startswith(VLLM_SIDE + ".")]
    seen, offenders = set(), []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a module runs its packages
        for imported, line in _all_imports(modules[name]):
            top = imported.split(".")[0]
            if top == "rlhfkit":
                if imported not in modules:
                    continue  # a name imported from a module, not a module
                if imported in RLHFKIT_ON_THE_VLLM_SIDE or imported.startswith(VLLM_SIDE):
                    todo.append(imported)
                else:
                    offenders.append(f"{name}:{line} imports {imported}")
            elif top not in sys.stdlib_module_names and top not in VLLM_ENVIRONMENT_PACKAGES:
                offenders.append(f"{name}:{line} imports {imported}")
    assert offenders == []
    assert {"rlhfkit.engine.vllm_engine.worker", "rlhfkit.engine.requests"} <= seen


def test_the_engines_contract_is_torch_free():
    """The files directly under engine/ that every backend and inference engine share (settings, interfaces,
    request types, futures, row planning) import no torch at module level; the torch code lives in model/,
    torch_engine/ and the backends."""
    offenders = []
    for name in ("settings", "clients", "types", "futures", "requests", "sampling_api"):
        path = PACKAGE / "engine" / f"{name}.py"
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] in ("torch", "transformers", "peft") for n in names):
                offenders.append(f"engine/{name}.py:{node.lineno}")
    assert offenders == []


def test_only_the_environment_module_reads_rlhfkit_variables():
    """Engine settings are one value passed down: no module but rlhfkit/environment.py reads the process
    environment for an RLHFKIT_* variable (a module naming one and reading os.environ counts)."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        if rel == "rlhfkit/environment.py":
            continue
        tree = ast.parse(path.read_text())
        reads = any(
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
            and node.attr in ("environ", "getenv")
            for node in ast.walk(tree)
        )
        names = any(
            isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("RLHFKIT_")
            for node in ast.walk(tree)
        )
        if reads and names:
            offenders.append(rel)
    assert offenders == []
