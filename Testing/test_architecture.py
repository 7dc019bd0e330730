"""The layering of RadCLIPCore, checked statically (README, Architecture):

- the library (every module outside `RadCLIPCore/commands/`) never imports argparse or the command
  layer, never prints and never exits: it takes values, returns results and raises RadCLIPError;
- no import cycles, counting imports inside functions too;
- no private name (`_x`) imported from another module;
- an import inside a function is only a lazy import of a heavy optional dependency, never of our own
  modules (that would be a cycle dodged, not removed) — except in the command layer, whose commands
  import the (torch-heavy) library when they run, so that parsing and `--help` start at once.
"""
import ast
from pathlib import Path

from conftest import REPO

CORE = REPO / "RadCLIPCore"
COMMANDS = CORE / "commands"
# heavy or optional third-party packages a library function may import when it needs them
LAZY_OK = {"matplotlib", "sklearn", "tqdm", "nrrd", "huggingface_hub", "PIL", "ctypes", "torch", "transformers",
           "importlib"}


def modules() -> dict:
    """{dotted name: path} of every module of the package."""
    out = {}
    for path in CORE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str, path: Path):
    """(imported module, names, inside a function?) for every import of a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    local = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local |= {id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], id(node) in local
        elif isinstance(node, ast.ImportFrom):
            yield resolve(name, path.name == "__init__.py", node), [a.name for a in node.names], id(node) in local


def library(name: str) -> bool:
    return not name.startswith("RadCLIPCore.commands")


def test_only_the_command_layer_parses_arguments_prints_or_exits():
    offenders = []
    for name, path in modules().items():
        if not library(name) or name == "RadCLIPCore.__main__":
            continue
        for module, _, _ in imports(name, path):
            if module == "argparse" or module.startswith("RadCLIPCore.commands"):
                offenders.append(f"{name} imports {module}")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.id if isinstance(func, ast.Name) else \
                    f"{getattr(func.value, 'id', '')}.{func.attr}" if isinstance(func, ast.Attribute) else ""
                if called in ("print", "sys.exit", "exit", "quit", "os._exit"):
                    offenders.append(f"{name}:{node.lineno} calls {called}")
    assert offenders == []


def test_no_import_cycles():
    mods = modules()
    graph = {name: {m for m, names, _ in imports(name, path) for m in [m] + [f"{m}.{n}" for n in names] if m in mods}
             for name, path in mods.items()}
    for name in graph:  # a package's __init__ does not count as an edge into its own children
        graph[name].discard(name)
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt == "RadCLIPCore" or (node == "RadCLIPCore" and nxt.startswith("RadCLIPCore.")):
                continue  # the package's lazy __init__ re-exports; it imports nothing at load time
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert cycles == []


def test_no_private_name_is_imported_from_another_module():
    offenders = [f"{name} imports {n} from {module}" for name, path in modules().items()
                 for module, names, _ in imports(name, path) if module.startswith("RadCLIPCore")
                 for n in names if n.startswith("_") and not (n.startswith("__") and n.endswith("__"))]
    assert offenders == []


def test_imports_inside_functions_are_only_lazy_heavy_dependencies():
    offenders = []
    for name, path in modules().items():
        for module, _, inside in imports(name, path):
            ours = module.startswith("RadCLIPCore")
            if inside and not (ours and name.startswith("RadCLIPCore.commands")) and \
                    (ours or module.split(".")[0] not in LAZY_OK):
                offenders.append(f"{name} imports {module} inside a function")
    assert offenders == []
