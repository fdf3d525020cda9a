import json

import pytest

from browser import CHROMIUM_ARGS, chromium_path
from busi.cli import main
from busi.errors import BusiError
from busi.report import render
from test_cli import TINY


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    from conftest import make_kaggle_folder
    root = tmp_path_factory.mktemp("report")
    data = make_kaggle_folder(root / "data", per_class=10, size=64)
    assert main(["train", "--data", str(data), "--model", "custom-cnn", "--out", str(root / "run"), *TINY]) == 0
    return root / "run"


def test_every_train_run_has_a_report_and_the_pictures(run_folder):
    for name in ("report.html", "custom-cnn/roc.png", "custom-cnn/calibration.png", "custom-cnn/gradcam.png",
                 "custom-cnn/confusion_matrix.png", "custom-cnn/misclassified.png"):
        assert (run_folder / name).is_file(), name
    m = json.loads((run_folder / "custom-cnn" / "metrics.json").read_text())
    assert {"ece_before", "ece_after", "temperature"} <= set(m["calibration"])
    assert m["localization"]["mask_status"]["lesion"] + m["localization"]["mask_status"]["empty"] == m["n"]
    assert set(m["localization"]["per_class"]) == {"benign", "malignant", "normal"}


def test_report_renders_in_chromium_with_metrics_and_images(run_folder):
    (run_folder / "report.html").unlink()
    assert main(["report", str(run_folder)]) == 0  # rebuilt from the files alone
    html = (run_folder / "report.html").read_text()
    assert "http://" not in html and "https://" not in html  # self-contained: opens offline
    path = chromium_path()
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto((run_folder / "report.html").resolve().as_uri())
            table = page.locator("table.metrics").first
            assert table.is_visible() and "accuracy" in table.inner_text()
            images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete && i.naturalWidth > 0])")
            assert len(images) >= 6 and all(ok for _, ok in images), images
            assert any("Grad-CAM" in alt for alt, _ in images) and any("reliability" in alt for alt, _ in images)
        finally:
            browser.close()


def test_report_of_a_non_run_folder(tmp_path):
    with pytest.raises(BusiError, match="not a busi run folder"):
        render(tmp_path)
