"""The house: no import cycles among busi's modules, and `busi predict` loads no training, metrics or plotting library."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "busi"


def _module(path: Path) -> str:
    """busi/cli/local.py -> 'cli.local'; busi/cli/__init__.py -> 'cli'."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """busi module -> the busi modules it imports, at the top or inside a function (a late import is an edge too);
    a sub-package's modules are nodes of their own (cli.local), so a cycle through one is found too."""
    files = {_module(p): p for p in PACKAGE.rglob("*.py") if p.name != "__main__.py"}
    edges = {m: set() for m in files}
    for m, path in files.items():
        package = m.split(".") if path.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                if node.module:  # from .x.y import z: the deepest of x.y, x that is a module
                    named = [".".join([*base, *node.module.split(".")[:i]]) for i in (2, 1)]
                    named = [next((c for c in named if c in files), "")]
                else:  # from . import a, b: each a module of the package
                    named = [".".join([*base, a.name]) for a in node.names]
                edges[m].update(c for c in named if c in files and c != m)
    return edges


def test_no_module_imports_itself_round_a_cycle():
    edges = _imports()
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m, path):
        seen[m] = 1
        for n in sorted(edges[m]):
            assert seen.get(n) != 1, "import cycle: " + " -> ".join(path[path.index(n):] + [n])
            if n not in seen:
                visit(n, path + [n])
        seen[m] = 2
    for m in sorted(edges):
        if m not in seen:
            visit(m, [m])
    assert "data" not in edges["models"] and "runs" not in edges["models"]  # architectures know no folders
    assert "cli.local" in edges["cli"] and "inference" in edges["cli.predicting"]  # the walk sees the sub-package


def test_no_command_module_outgrows_a_reading():
    """cli's modules each hold a few commands' arguments, checks and calls: none grows back into one long file."""
    for path in (PACKAGE / "cli").glob("*.py"):
        assert len(path.read_text().splitlines()) <= 250, f"{path.name} has grown past 250 lines: split it"


def test_predict_loads_no_training_metrics_or_plotting_library():
    code = ("import sys\nfrom busi.cli import main\n"
            "assert main(['predict', 'examples/benign', '--no-progress', '--engine', 'torch']) == 0\n"
            "print('LOADED:' + ' '.join(m for m in ('lightning', 'torchmetrics', 'matplotlib', 'scipy.signal', 'sklearn', "
            "'pytorch_grad_cam', 'gradio', 'pandas') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = next(line for line in done.stdout.splitlines() if line.startswith("LOADED:")).removeprefix("LOADED:")
    assert loaded == "", f"busi predict loaded: {loaded}"
