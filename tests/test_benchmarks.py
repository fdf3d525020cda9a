"""The benchmark scripts keep working (they are run by hand; here on a few images and one step)."""
import json
import subprocess
import sys
from pathlib import Path

from conftest import make_kaggle_folder

ROOT = Path(__file__).resolve().parents[1]


def test_speed_script_writes_its_table(tmp_path):
    data = make_kaggle_folder(tmp_path / "data", per_class=12, size=64)
    out = tmp_path / "speed.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--data", str(data), "--models", "resnet18",
                           "--steps", "1", "--json", str(out), "--md", str(tmp_path / "speed.md")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == ["resnet18"]
    assert {"model", "image_size", "ours_img_s", "reference_img_s", "ratio", "device"} <= set(rows[0])
    assert rows[0]["ours_img_s"] > 0 and rows[0]["reference_img_s"] > 0
    assert "ONNX Runtime" in (tmp_path / "speed.md").read_text()
