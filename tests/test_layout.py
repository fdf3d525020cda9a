"""The house: no import cycles among busi's modules, and `busi predict` loads no training, metrics or plotting library."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "busi"


def _imports() -> dict[str, set[str]]:
    """busi module -> the busi modules it imports, at the top or inside a function (a late import is an edge too)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    edges = {m: set() for m in modules}
    for m in modules:
        for node in ast.walk(ast.parse((PACKAGE / f"{m}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                named = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
                edges[m].update(n for n in named if n in modules and n != m)
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


def test_predict_loads_no_training_metrics_or_plotting_library():
    code = ("import sys\nfrom busi.cli import main\n"
            "assert main(['predict', 'examples/benign', '--no-progress', '--engine', 'torch']) == 0\n"
            "print('LOADED:' + ' '.join(m for m in ('lightning', 'torchmetrics', 'matplotlib', 'scipy.signal', 'sklearn', "
            "'pytorch_grad_cam', 'gradio', 'pandas') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = next(line for line in done.stdout.splitlines() if line.startswith("LOADED:")).removeprefix("LOADED:")
    assert loaded == "", f"busi predict loaded: {loaded}"
