"""The web app end to end: a real `busi serve` process, headless Chromium, and the HTTP API."""
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

from browser import CHROMIUM_ARGS, chromium_path
from busi.cli import main
from busi.inference import run_predict
from conftest import BUSI_DEV
from test_cli import TINY

pytest.importorskip("gradio")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from conftest import make_kaggle_folder
    root = tmp_path_factory.mktemp("app")
    data = make_kaggle_folder(root / "data", per_class=8, size=64)
    # the recommended architecture, from its ImageNet weights
    assert main(["train", "--data", str(data), "--model", "efficientnet-lite0", "--out", str(root / "run"), *TINY]) == 0
    ckpt = root / "run" / "efficientnet-lite0" / "checkpoint.pth"
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    log = open(root / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "busi.cli", "serve", "--checkpoint", str(ckpt), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("busi serve did not start:\n" + (root / "serve.log").read_text())
                time.sleep(0.5)
        yield url, ckpt, root
    finally:  # always stopped, pass or fail
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _real_image() -> Path:
    path = BUSI_DEV / "malignant" / "malignant (3).png"
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    return path


def test_page_shows_class_probabilities_overlay_and_bad_file_message(server):
    url, ckpt, root = server
    image = _real_image()
    broken = root / "broken.png"
    broken.write_text("this is not an image")
    path = chromium_path()
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            hosts = set()
            page.on("request", lambda r: hosts.add(urlparse(r.url).hostname))
            page.goto(url)
            page.get_by_text("Research tool, not a diagnosis").first.wait_for(timeout=30000)
            assert page.get_by_text("efficientnet-lite0").first.is_visible()  # the model card
            page.locator("input[type=file]").first.set_input_files([str(image)])
            page.get_by_role("button", name="Analyse").click()
            answer = page.locator(".busi-class").first
            answer.wait_for(timeout=60000)
            assert answer.inner_text() in ("benign", "malignant", "normal")
            assert page.locator(".busi-bar").count() == 3
            assert "%" in page.locator(".busi-card").first.inner_text()
            page.locator(".busi-note").first.wait_for()
            page.locator("img[src*='gradio_api/file']").first.wait_for(timeout=30000)  # the Grad-CAM overlay
            page.screenshot(path=str(root / "page.png"), full_page=True)

            page.locator("button[aria-label='Clear']").first.click() if page.locator("button[aria-label='Clear']").count() else None
            notes = root / "notes.txt"  # not an image at all: answered too, not silently dropped by the browser
            notes.write_text("hello")
            assert "PNG, JPEG, BMP, TIFF or DICOM" in page.content()
            page.locator("input[type=file]").first.set_input_files([str(broken), str(notes)])
            page.get_by_role("button", name="Analyse").click()
            error = page.locator(".busi-error").first
            error.wait_for(timeout=60000)
            assert "broken.png" in error.inner_text() and "not a readable image" in error.inner_text()
            assert error.inner_text().count("broken.png") == 1  # named once, not "broken.png: broken.png: …"
            assert page.locator(".busi-error").count() == 2 and "notes.txt" in page.locator(".busi-error").nth(1).inner_text()
            page.reload()  # the server keeps serving after a bad file
            page.get_by_text("Research tool, not a diagnosis").first.wait_for(timeout=30000)
            assert hosts <= {"127.0.0.1", "localhost"}, hosts  # nothing fetched from the internet
        finally:
            browser.close()


def test_http_api_gives_the_same_answer_and_survives_20_concurrent_requests(server):
    from gradio_client import Client, handle_file
    url, ckpt, _ = server
    image = _real_image()
    expected = run_predict(ckpt, [image])[0]
    client = Client(url, verbose=False)
    answer = client.predict(handle_file(str(image)), api_name="/classify")
    assert answer["predicted"] == expected["predicted"]
    for c, p in expected["probabilities"].items():
        assert abs(answer["probabilities"][c] - p) < 1e-4
    jobs = [client.submit(handle_file(str(image)), api_name="/classify") for _ in range(20)]
    results = [job.result(timeout=120) for job in jobs]
    assert len(results) == 20 and all(r["predicted"] == expected["predicted"] for r in results)
    assert all(abs(r["probabilities"][c] - p) < 1e-4 for r in results for c, p in expected["probabilities"].items())


def test_serve_log_has_busis_own_address_line_and_no_share_tip(server):
    _, _, root = server
    log = (root / "serve.log").read_text()
    assert "busi: serving" in log and "share=True" not in log


def test_too_many_images_in_one_request_get_a_message(server):
    from gradio_client import Client, handle_file
    from busi.app import MAX_IMAGES
    url, _, _ = server
    image = _real_image()
    answer, gallery = Client(url, verbose=False).predict([handle_file(str(image))] * (MAX_IMAGES + 1), api_name="/analyse")
    assert f"Too many images ({MAX_IMAGES + 1})" in answer and not gallery


def test_the_page_leads_with_the_figures_of_the_rule_users_get(tmp_path):
    import json
    from busi.app import model_card
    config = {"arch": "efficientnet-lite0", "classes": ["benign", "malignant", "normal"], "image_size": 224}
    (tmp_path / "metrics.json").write_text(json.dumps({
        "n": 100, "accuracy": 0.773, "macro_f1": 0.7, "per_class": {"malignant": {"recall": 0.8}},
        "operating_point": {"accuracy": 0.640, "per_class": {"malignant": {"recall": 0.95}}}}))
    card = model_card(tmp_path / "checkpoint.pth", config)
    assert "at its decision rule: accuracy 0.640, malignant recall 0.950" in card["evaluation"]
    assert "0.773" not in card["evaluation"]  # the argmax accuracy, which no user gets, is not the headline
    (tmp_path / "metrics.json").write_text(json.dumps({"n": 100, "accuracy": 0.773, "macro_f1": 0.7,
                                                       "per_class": {"malignant": {"recall": 0.8}}}))
    assert "(most probable class): accuracy 0.773" in model_card(tmp_path / "checkpoint.pth", config)["evaluation"]


def test_the_page_keeps_no_upload_once_it_has_answered(tmp_path, monkeypatch):
    from gradio.utils import get_upload_folder

    from busi.app import forget_uploads
    uploads = Path(get_upload_folder())
    own = uploads / "busi-test-upload"
    own.mkdir(parents=True, exist_ok=True)
    upload = own / "scan.dcm"
    upload.write_bytes(b"patient data")
    example = tmp_path / "example.png"  # a file outside the upload folder (the examples) is never touched
    example.write_bytes(b"x")
    forget_uploads([str(upload), str(example)])
    assert not upload.exists() and not own.exists() and example.exists()
    from busi.app import Uploads
    own.mkdir()
    upload.write_bytes(b"patient data")
    uploads = Uploads()
    with uploads:  # two requests for the same upload (Gradio files identical uploads once): kept until both answered
        with uploads:
            uploads.answered_with([str(upload)])
        assert upload.exists()
        uploads.answered_with([str(upload)])
    assert not upload.exists()
