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
    assert bundled.MODEL.stat().st_size <= 32 * 2 ** 20  # float32 where float16 would move an answer (below)
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
    assert sorted(config["trained_on"]) == ["busbra_dev", "busi_dev", "uclm_dev"]  # source names, not folders
    assert "/work/" not in json.dumps(config) and "/work/" not in bundled.CARD_DATA.read_text()
    assert config["shift"]["n_heldout"] >= 100 and {"shift.bank", "fingerprints.phash"} <= set(extras)
    assert len(config["fingerprint_paths"]) == len(extras["fingerprints.phash"]) == 1533
    op = config["operating_point"]
    assert op["fitted_on_positives"] >= 300  # out-of-fold predictions of every source, not a validation part's few
    assert "never saw its hospital" in op["fitted_where"]  # hospital-out predictions: a threshold that travels
    sources = {"busi_dev", "busbra_dev", "uclm_dev"}
    assert set(op["per_source"]) == set(op["at_home"]) - {"runs", "segmentation"} == sources
    if op.get("rule") == "lesion-first":  # both thresholds on hospital-out predictions, with the segmenter's Dice there
        assert op["fitted_on_lesions"] >= 1000 and 0 < op["lesion_threshold"] < 1
        assert set(next(iter(op["segmentation_hospital_out"].values()))) == sources
        # the cancers kept at every hospital, also at one it never saw (the familiar-only rule's point)
        assert all(f["lesion_first"]["sensitivity"] >= 0.9 for f in op["per_source"].values())


def _runs(root, rows: dict[str, dict]):
    """A hospital-out classifier run and two segmenter runs (hospital-out, home) from {path: figures}."""
    import csv
    classifier, new, home = (root / n for n in ("cv", "seg-new", "seg-home"))
    for folder in (classifier, new, home):
        folder.mkdir()
    with open(classifier / "oof_predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "true", "p_benign", "p_malignant", "p_normal", "outside_training"])
        for path, r in rows.items():
            w.writerow([path, r["true"], *r["p"], int(r["outside"])])
    for folder, key in ((new, "new"), (home, "home")):
        with open(folder / "lesion_oof.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "source", "true", "lesion_score"])
            for path, r in rows.items():
                w.writerow([path, path.split("/")[0], r["true"], r[key]])
        (folder / "lesion_metrics.json").write_text('{"segmentation": {}}')
    return classifier, new, home


def test_a_rule_fitted_for_home_and_new_hospitals_keeps_the_cancers_the_segmenter_misses_at_a_new_one(tmp_path):
    """bundled.lesion_rule_from_cv(familiar_only=True): at a hospital it never saw the segmenter finds no lesion in some
    cancers (score 0.05), which the shift check flags; at home normal scans score 0.1 and lesions 0.9. The hospital-out
    fit alone must call nothing normal to keep those cancers; the familiar-only fit calls the home normal scans normal
    and still keeps 90% of the cancers at the new hospital."""
    from busi.bundled import lesion_rule_from_cv
    from busi.operating import FAMILIAR_ONLY, decide, guarded
    rows = {}
    for source in ("a", "b"):
        for i in range(40):
            true = ("benign", "malignant", "normal")[i % 3] if i < 39 else "malignant"
            p = {"benign": (0.7, 0.2, 0.1), "malignant": (0.2, 0.7, 0.1), "normal": (0.3, 0.2, 0.5)}[true]
            missed = true == "malignant" and i < 12  # at the new hospital: no lesion found, and flagged
            rows[f"{source}/{true}/{i}.png"] = {
                "true": true, "p": p, "outside": missed or i % 2 == 0,
                "new": 0.05 if missed else (0.5 if true == "normal" else 0.9),
                "home": 0.1 if true == "normal" else 0.9}
    classifier, new, home = _runs(tmp_path, rows)
    plain = lesion_rule_from_cv([classifier], [new], ["benign", "malignant", "normal"], 0.9)
    familiar = lesion_rule_from_cv([classifier], [new], ["benign", "malignant", "normal"], 0.9,
                                   home=([classifier], [home]), familiar_only=True)
    assert plain["lesion_threshold"] <= 0.05 and FAMILIAR_ONLY not in plain
    assert familiar[FAMILIAR_ONLY] and familiar["lesion_threshold"] > 0.1
    for source, f in familiar["per_source"].items():  # the new hospital, flags applied: its cancers kept
        assert f["lesion_first"]["sensitivity"] >= 0.9
    for source, f in familiar["at_home"].items():
        if source not in ("runs", "segmentation"):
            assert f["lesion_first"]["normal_recall"] == 1.0 and f["lesion_first"]["sensitivity"] >= 0.9
    # what predict decides with the stored rule: a flagged cancer with no lesion found is not called normal
    probs = torch.tensor([[0.2, 0.7, 0.1]])
    assert decide(probs, ["benign", "malignant", "normal"], familiar,
                  guarded(torch.tensor([0.05]), torch.tensor([True]), familiar)).item() == 1
