"""The package as a whole: its entry points and the import graph of its modules."""

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sspo"


def test_python_m_sspo_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "sspo", "--help"], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stderr
    assert "usage: sspo" in result.stdout


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere in its body (module level or inside functions).

    `from a import b` imports the module a.b when there is one, else the module a; a name below no known module
    (a third-party import) is ignored.
    """
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x`, `from ..x import y`
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    done: set[str] = set()
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for successor in sorted(graph[node]):
            cycle = visit(successor)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return None


def test_find_cycle_names_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_inside_sspo_have_no_cycle():
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: imported_modules(path, set(files)) for name, path in files.items()}
    assert graph["sspo.stages"] >= {"sspo.config", "sspo.storage", "sspo.train.trainer"}  # the graph sees both forms
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# Loaders that unpickle: a checkpoint or reward model loaded through one could run code.
UNPICKLING_MODULES = {"pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve"}
JSON_ONLY_LOADERS = ("Tokenizer", "Processor", "Scheduler")  # their from_pretrained reads JSON and text files


def keyword(call: ast.Call, name: str):
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def pickle_risks(path: Path) -> list[str]:
    risks = []
    for node in ast.walk(ast.parse(path.read_text())):
        where = f"{path}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            risks += [f"{where} imports {n}" for n in names if n.split(".")[0] in UNPICKLING_MODULES]
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = ast.unparse(node.func.value)
        method = node.func.attr
        if method == "load" and owner == "torch" and not is_true(keyword(node, "weights_only")):
            risks.append(f"{where} torch.load without weights_only=True")
        if method == "load" and owner in ("np", "numpy") and is_true(keyword(node, "allow_pickle")):
            risks.append(f"{where} numpy.load with allow_pickle=True")
        if method == "read_pickle":
            risks.append(f"{where} {owner}.read_pickle")
        if (method == "from_pretrained" and not owner.endswith(JSON_ONLY_LOADERS)
                and not is_true(keyword(node, "use_safetensors"))):
            risks.append(f"{where} {owner}.from_pretrained without use_safetensors=True")
    return risks


def test_no_pickle_is_loaded_anywhere_in_the_package():
    risks = [risk for path in sorted(PACKAGE.rglob("*.py")) for risk in pickle_risks(path)]
    assert not risks, "\n".join(risks)


def test_the_pickle_scan_finds_each_kind_of_load(tmp_path):
    risky = tmp_path / "probe.py"
    lines = ["import pickle", "torch.load(f)", "np.load(f, allow_pickle=True)", "pd.read_pickle(f)",
             "UNet.from_pretrained(d)", "torch.load(f, weights_only=True)", "AutoTokenizer.from_pretrained(d)",
             "UNet.from_pretrained(d, use_safetensors=True)"]
    risky.write_text("\n".join(lines) + "\n")
    assert [risk.removeprefix(f"{risky}:") for risk in pickle_risks(risky)] == [
        "1 imports pickle", "2 torch.load without weights_only=True", "3 numpy.load with allow_pickle=True",
        "4 pd.read_pickle", "5 UNet.from_pretrained without use_safetensors=True"]
