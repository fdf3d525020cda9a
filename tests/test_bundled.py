"""The model that ships in busi/assets/: it loads safely, is the recommended recipe, and says what its card says."""
import json
from pathlib import Path

import pytest
import torch
import yaml

from busi import bundled
from busi.cli import main
from busi.inference import run_predict

ROOT = Path(__file__).resolve().parents[1]


def test_bundled_model_loads_without_unpickling_and_is_small():
    obj = torch.load(bundled.MODEL, map_location="cpu", weights_only=True)
    assert obj["format"] == "busi-checkpoint" and obj["config"]["arch"] == "efficientnet-lite0"
    assert bundled.MODEL.stat().st_size <= 25 * 2 ** 20
    card = json.loads(bundled.CARD_DATA.read_text())
    kinds = {"float16": torch.float16, "float32": torch.float32}
    if card["stored_as"] in kinds:
        assert all(v.dtype == kinds[card["stored_as"]] for v in obj["state_dict"].values() if v.is_floating_point())
    else:  # the classifier as trained, the segmenter halved
        assert card["stored_as"] == "float32 classifier, float16 segmenter"
        for k, v in obj["state_dict"].items():
            if v.is_floating_point():
                assert v.dtype == (torch.float16 if k.startswith("segmenter.") else torch.float32), k
    assert card["max_probability_change"] <= 1e-3  # against the model as trained, on the example images


def test_bundled_model_is_the_recommended_recipe():
    card = json.loads(bundled.CARD_DATA.read_text())
    name = "lesion.yaml" if card["recipe"].get("lesion_size") else "recommended.yaml"  # with a segmenter: its recipe
    recipe = bundled.recipe_of(yaml.safe_load((ROOT / "configs" / name).read_text()))
    assert {k: card["recipe"].get(k) for k in recipe} == recipe
    assert card["commit"] and card["command"].startswith("python scripts/bundle_model.py")


def test_bundled_model_classifies_the_examples_as_its_card_says():
    card = json.loads(bundled.CARD_DATA.read_text())
    rows = run_predict(bundled.MODEL, [ROOT / "examples"])
    assert len(rows) == len(card["examples"]) == 6
    for row, said in zip(rows, card["examples"]):
        assert row["path"].endswith(said["image"]) and row["predicted"] == said["predicted"]
        assert all(abs(row["probabilities"][c] - p) < 1e-4 for c, p in said["probabilities"].items())


def test_commands_default_to_the_bundled_model(capsys):
    assert main(["predict", "--json", str(ROOT / "examples" / "malignant")]) == 0
    out = capsys.readouterr()
    assert len(json.loads(out.out)) == 2 and "using the bundled model" in out.err
    assert main(["model"]) == 0
    summary = capsys.readouterr().out
    assert summary.count("\n") <= 20 and "Research tool" in summary and "hospital it never saw" in summary
    assert "Decision rule:" in summary and "busi calibrate" in summary and "busi model --full" in summary
    assert main(["model", "--full"]) == 0
    card = capsys.readouterr().out
    assert "Research tool, not a medical device" in card and "cross-validation" in card
    assert card.index("hospital it never saw") < card.index("At home")  # the home figure never alone, nor first
    assert "BUSI" in card and "examples/" in card
    assert "**" not in card and "`" not in card and "\n## " not in card  # rendered for a terminal, not raw Markdown


def test_missing_or_damaged_bundled_model_says_how_to_rebuild(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bundled, "MODEL", tmp_path / "recommended.pth")
    assert main(["predict", str(ROOT / "examples" / "normal")]) == 2
    err = capsys.readouterr().err
    assert "no bundled model" in err and "scripts/bundle_model.py" in err and "--checkpoint" in err
    (tmp_path / "recommended.pth").write_bytes(b"\x00" * 64)
    assert main(["export", "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "damaged" in err and err.count("\n") == 1


def test_the_app_offers_the_examples_and_starts_without_them(tmp_path):
    pytest.importorskip("gradio")
    from busi.app import Predictor, build_app
    predictor = Predictor(bundled.MODEL)
    # the bundled card's figures, shown on the page: at a hospital it never saw, and at home
    assert "hospitals_never_seen" in predictor.card and "cross_validation" in predictor.card
    with_examples, _ = build_app(predictor)
    without, _ = build_app(predictor, examples=tmp_path / "none")
    labels = lambda app: [getattr(b, "value", "") for b in app.blocks.values()]  # noqa: E731
    assert any("example images" in str(v) for v in labels(with_examples))
    assert not any("example images" in str(v) for v in labels(without))


def test_bundled_model_travels_with_its_checks_and_no_paths_of_the_machine_it_was_built_on():
    from busi import checkpoint
    _, config, extras = checkpoint.load(bundled.MODEL, extras=True)
    assert sorted(config["trained_on"]) == ["busbra_dev", "busi_dev"]  # source names, not folders
    assert "/work/" not in json.dumps(config) and "/work/" not in bundled.CARD_DATA.read_text()
    assert config["shift"]["n_heldout"] >= 100 and {"shift.bank", "fingerprints.phash"} <= set(extras)
    assert len(config["fingerprint_paths"]) == len(extras["fingerprints.phash"]) == 1219
    op = config["operating_point"]
    assert op["fitted_on_positives"] >= 300  # out-of-fold predictions of both sources, not a validation part's few
    assert "never saw its hospital" in op["fitted_where"]  # hospital-out predictions: a threshold that travels
    assert set(op["per_source"]) == set(op["at_home"]) - {"runs", "segmentation"} == {"busi_dev", "busbra_dev"}
    if op.get("rule") == "lesion-first":  # both thresholds on hospital-out predictions, with the segmenter's Dice there
        assert op["fitted_on_lesions"] >= 1000 and 0 < op["lesion_threshold"] < 1
        assert set(next(iter(op["segmentation_hospital_out"].values()))) == {"busi_dev", "busbra_dev"}
