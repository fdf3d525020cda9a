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


def test_pictures_follow_one_decision_rule_and_small_groups_are_too_few(tmp_path):
    """At an operating point that overrides argmax: captions give the probability of the class they name, the gallery
    counts the errors the confusion matrix shows, and an interval over 8 images is replaced by 'too few'."""
    import csv
    import torch
    from conftest import make_kaggle_folder
    from busi import checkpoint
    from busi.models import build
    from busi.results import _caption
    classes = ["benign", "malignant", "normal"]
    assert _caption("a.png", classes, 0, 1, 0.3) == "a.png\ntrue benign, said malignant (p = 30%)"
    data = make_kaggle_folder(tmp_path / "data", per_class=15, size=64)
    ckpt = tmp_path / "op.pth"
    torch.manual_seed(0)
    checkpoint.save(ckpt, build("custom-cnn", 3), {
        "arch": "custom-cnn", "classes": classes, "image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3,
        "operating_point": {"class": "malignant", "threshold": 0.2, "target_recall": 0.9, "fitted_on": 10,
                            "fitted_on_positives": 5}})
    rows = ["ID,Case,Device"] + [f"{c} ({i}),{c}{i},{'small' if i <= 3 and c != 'normal' else 'big'}"
                                 for c in classes for i in range(1, 16)]
    (tmp_path / "meta.csv").write_text("\n".join(rows) + "\n")
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--meta", str(tmp_path / "meta.csv"),
                 "--patient-column", "Case", "--group-column", "Device", "--out", str(tmp_path / "ev"),
                 "--no-progress"]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    matrix = torch.tensor(m["operating_point"]["confusion_matrix"])
    assert m["pictures"]["rule"] == "decisions at the operating point"
    assert m["pictures"]["misclassified"] == int(matrix.sum() - matrix.trace())
    predictions = list(csv.DictReader(open(tmp_path / "ev" / "predictions.csv")))
    assert sum(r["predicted"] != r["true"] for r in predictions) == m["pictures"]["misclassified"]
    small = m["per_group"]["small"]["malignant_vs_benign"]
    assert small["n"] == 6 and small["too_few"] and small["auroc"]["ci_low"] is None
    assert not m["per_group"]["big"]["malignant_vs_benign"]["too_few"]
    page = (tmp_path / "ev" / "report.html").read_text()
    assert "too few: 6 images, 6 patients" in page and "None" not in page
    assert page.index('class="lead"') < page.index("<table")  # the sentences come before any table
    assert "Decision rule:" in page and "At this rule it found" in page


def test_the_lead_says_what_was_found_what_is_too_few_and_what_to_do_next():
    from busi.report import lead
    confusion = [[30, 10, 0], [1, 19, 0], [3, 2, 4]]  # rows: true benign, malignant, normal
    m = {"n": 69, "accuracy": 0.7, "per_class": {"benign": {"support": 40}, "malignant": {"support": 20},
                                                 "normal": {"support": 9}},
         "operating_point": {"rule": "'malignant' when p >= 0.2.", "confusion_matrix": confusion, "accuracy": 0.768,
                             "per_class": {"malignant": {"recall": 0.95}, "normal": {"recall": 4 / 9}}},
         "shift": {"n": 69, "flagged": 30, "share": 0.43, "expected_share": 0.05, "outside": True},
         "training_overlap": {"checked": True, "n_with_near_duplicate_in_training": 2, "n_training_images": 900,
                              "metrics_without_them": {"accuracy": 0.69}},
         "lesion": {"dice_mean": 0.71, "n_lesion_masks": 60}}
    text = " ".join(lead(m, "hospital/"))
    assert text.startswith("69 images of hospital/ (40 benign, 20 malignant, 9 normal).")
    assert "found 19 of the 20 malignant images (sensitivity 95%)" in text
    assert "called 10 of the 40 benign ones malignant (specificity 75%)" in text
    assert "44% of the 9 normal scans normal" in text and "Too few to trust: 9 normal" in text
    assert "30 of 69 images (43%) lie outside" in text and "busi calibrate" in text
    assert "2 image(s) are copies or near-copies" in text and "Dice of 0.71" in text
    calibrated = " ".join(lead({**m, "rule_fitted_where": "images of hospital/adapt"}))
    assert "already re-set on images of hospital/adapt" in calibrated and "busi finetune" in calibrated
    assert "busi calibrate" not in calibrated


def test_train_report_shows_the_keys_that_shaped_the_run(run_folder):
    page = (run_folder / "report.html").read_text()
    config = page[page.index("<h2>Configuration</h2>"):]
    assert "epochs:" in config and "\nfolds:" not in config and "external_meta:" not in config.split("</pre>")[0]


def test_train_report_counts_what_its_confusion_matrix_shows(run_folder):
    import csv
    m = json.loads((run_folder / "custom-cnn" / "metrics.json").read_text())
    rows = list(csv.DictReader(open(run_folder / "custom-cnn" / "predictions.csv")))
    assert m["pictures"]["rule"] == "decisions by argmax"  # no operating point in this run
    wrong = sum(r["predicted"] != r["true"] for r in rows)
    assert m["pictures"]["misclassified"] == wrong == m["n"] - round(m["accuracy"] * m["n"])
    assert "None" not in (run_folder / "report.html").read_text()
