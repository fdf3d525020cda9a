"""The lesion outline: masks in any form, scores, outlines and measurements, Dice, the lesion-first rule, and the one road
(predict, evaluate and the web page say the same about an image)."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from busi.cli import main
from busi.data import load_masks, read_mask, scan
from busi.errors import BusiError
from busi.lesion import dice_iou, lesion_scores, outline
from busi.operating import decide, describe, fit_lesion_rule

CLASSES = ["benign", "malignant", "normal"]


def _blob_map(size=56, box=(10, 20, 30, 44)) -> np.ndarray:
    """A probability map with one lesion: rows box[0]:box[1], columns box[2]:box[3]."""
    m = np.full((size, size), 0.02, np.float32)
    m[box[0]:box[1], box[2]:box[3]] = 0.9
    return m


def test_outline_measures_the_lesion_in_the_images_pixels():
    # the map covers a 112 x 224 image: twice as tall and four times as wide per map cell
    found = outline(_blob_map(), 112, 224)
    x0, y0, x1, y1 = found["box"]
    assert abs(x0 - 30 * 4) <= 4 and abs(x1 - 44 * 4) <= 4 and abs(y0 - 10 * 2) <= 2 and abs(y1 - 20 * 2) <= 2
    assert found["width_px"] == x1 - x0 and found["depth_px"] == y1 - y0
    assert found["depth_to_width"] == pytest.approx(found["depth_px"] / found["width_px"], abs=1e-3)
    assert abs(found["area_px"] - 56 * 20) < 0.15 * 56 * 20
    assert all(x0 <= x <= x1 and y0 <= y <= y1 for x, y in found["polygon"]) and len(found["polygon"]) >= 4
    json.dumps(found)  # plain types: it goes into predict --json
    with_mm = outline(_blob_map(), 112, 224, mm_per_pixel=(0.1, 0.2))
    assert with_mm["width_mm"] == pytest.approx(with_mm["width_px"] * 0.2)
    assert with_mm["depth_mm"] == pytest.approx(with_mm["depth_px"] * 0.1)
    assert outline(np.full((56, 56), 0.1, np.float32), 100, 100) is None  # nothing reaches the level


def test_scores_and_dice_against_known_masks():
    lesion = torch.from_numpy(_blob_map())[None, None]
    empty = torch.full_like(lesion, 0.02)
    maps = torch.cat([lesion, empty, lesion, empty])
    scores = lesion_scores(maps)
    assert scores[0] > 0.8 and scores[1] < 0.1
    truth = torch.from_numpy((_blob_map() > 0.5).astype(np.uint8))[None, None]
    elsewhere = torch.zeros_like(truth)
    elsewhere[..., 40:50, 0:10] = 1
    dice, iou = dice_iou(maps, torch.cat([truth, torch.zeros_like(truth), elsewhere, truth]))
    assert dice[0] == pytest.approx(1.0) and iou[0] == pytest.approx(1.0)  # the same outline
    assert dice[1] == 1.0  # a normal scan outlined as empty agrees with its empty mask
    assert dice[2] == 0.0 and iou[2] == 0.0  # outlined in the wrong place
    assert dice[3] == 0.0  # a lesion missed
    # a mask at the image's resolution is compared on the map's grid
    big = torch.nn.functional.interpolate(truth.float(), scale_factor=4, mode="nearest")
    assert dice_iou(lesion, big)[0][0] == pytest.approx(1.0)


def test_lesion_first_rule_calls_a_scan_without_lesion_normal_whatever_its_p_malignant():
    rule = {"rule": "lesion-first", "class": "malignant", "threshold": 0.3, "lesion_threshold": 0.5,
            "target_recall": 0.9, "lesion_recall": 0.95, "fitted_on_lesions": 40, "fitted_on_positives": 20}
    probs = torch.tensor([[0.05, 0.90, 0.05],   # high p(malignant), but no lesion found: normal
                          [0.30, 0.20, 0.50],   # a lesion, p(malignant | lesion) 0.4 >= 0.3: malignant
                          [0.60, 0.10, 0.30],   # a lesion, p(malignant | lesion) 0.14: benign
                          [0.10, 0.05, 0.85]])  # p(normal) high, but a lesion is outlined: judged as a lesion
    scores = torch.tensor([0.2, 0.8, 0.9, 0.7])
    assert decide(probs, CLASSES, rule, scores).tolist() == [2, 1, 0, 1]
    with pytest.raises(BusiError, match="lesion outline"):
        decide(probs, CLASSES, rule)  # a rule that needs the outline never silently falls back
    assert "'normal' when no lesion is outlined" in describe(rule)


def _scored(counts: list[int], seed: int):
    """Random probabilities, lesion scores lower for normal scans (class 2) than for lesions, and the rule fitted."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([k for k, n in enumerate(counts) for _ in range(n)])
    probs = torch.softmax(torch.randn(len(labels), 3, generator=g), 1)
    scores = torch.where(labels == 2, torch.rand(len(labels), generator=g) * 0.5,
                         0.3 + torch.rand(len(labels), generator=g) * 0.7)
    return labels, probs, scores, fit_lesion_rule(probs, scores, labels, CLASSES, malignant_recall=0.9,
                                                  lesion_recall=0.95)


def test_fit_lesion_rule_reaches_its_recalls():
    labels, probs, scores, rule = _scored([60, 30, 30], seed=0)
    predicted = decide(probs, CLASSES, rule, scores)
    assert int((scores[labels != 2] >= rule["lesion_threshold"]).sum()) >= 0.95 * 90
    assert int((predicted[labels == 1] == 1).sum()) >= 0.9 * 30  # the whole rule's recall, missed lesions included
    assert rule["fitted_on_lesions"] == 90 and rule["fitted_on_positives"] == 30
    # a scan called malignant always had a lesion outlined
    assert (scores[predicted == 1] >= rule["lesion_threshold"]).all()
    with pytest.raises(BusiError, match="at least 10"):
        fit_lesion_rule(probs[:65], scores[:65], labels[:65], CLASSES)  # 5 malignant images


def test_rule_figures_give_intervals_that_resample_whole_patients():
    from busi.operating import lesion_rule_figures
    labels, probs, scores, rule = _scored([20, 20, 20], seed=1)
    copies = 10  # each patient scanned ten times with the same result: ten copies are not ten times the evidence
    many = lesion_rule_figures(probs.repeat_interleave(copies, 0), scores.repeat_interleave(copies),
                               labels.repeat_interleave(copies), CLASSES, rule,
                               clusters=np.arange(60).repeat(copies), n_boot=400)["all"]["lesion_first"]
    naive = lesion_rule_figures(probs.repeat_interleave(copies, 0), scores.repeat_interleave(copies),
                                labels.repeat_interleave(copies), CLASSES, rule, n_boot=400)["all"]["lesion_first"]
    for name in ("sensitivity", "normal_recall", "accuracy"):
        low, high = many["ci"][name]
        assert low <= many[name] <= high
        assert high - low > 2 * (naive["ci"][name][1] - naive["ci"][name][0])  # about sqrt(10) times wider
    assert "60 clusters" in many["ci_method"] and "600 images" in naive["ci_method"]


def _scan_with(root, cls, name, mask: Image.Image | list[Image.Image], size=(80, 60)):
    folder = root / cls
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (90, 90, 90)).save(folder / f"{name}.png")
    for i, m in enumerate(mask if isinstance(mask, list) else [mask]):
        m.save(folder / f"{name}_mask{'' if i == 0 else f'_{i}'}.png")


def test_masks_in_every_common_form_are_read(tmp_path, capsys):
    box = (10, 10, 40, 30)

    def drawn(mode, fill, background=0):
        m = Image.new(mode, (80, 60), background)
        ImageDraw.Draw(m).rectangle(box, fill=fill)
        return m
    _scan_with(tmp_path, "malignant", "red", drawn("RGB", (255, 0, 0)))  # pure red: grey level 76
    _scan_with(tmp_path, "benign", "green", drawn("RGB", (0, 255, 0)))
    _scan_with(tmp_path, "benign", "zero_one", drawn("L", 1))  # 0/1 values, not 0/255
    _scan_with(tmp_path, "benign", "rgba", drawn("RGBA", (255, 255, 255, 255), (0, 0, 0, 0)))
    _scan_with(tmp_path, "benign", "onebit", drawn("1", 1))
    half = Image.new("L", (80, 60), 0)
    ImageDraw.Draw(half).rectangle((50, 40, 70, 50), fill=255)
    _scan_with(tmp_path, "benign", "two_files", [drawn("L", 255), half])
    _scan_with(tmp_path, "normal", "all_white", Image.new("L", (80, 60), 255))
    _scan_with(tmp_path, "normal", "wrong_size", Image.new("L", (40, 30), 0))
    dataset = scan(tmp_path)
    by_name = {s.path.split("/")[-1]: s for s in dataset.samples}
    for name in ("red.png", "green.png", "zero_one.png", "rgba.png", "onebit.png"):
        m = read_mask([dataset.file(p) for p in by_name[name].mask_paths])
        assert m.sum() == 31 * 21, name  # the rectangle, inclusive of its edges
    both = read_mask([dataset.file(p) for p in by_name["two_files.png"].mask_paths])
    assert both.sum() == 31 * 21 + 21 * 11  # several files per image: their union
    masks, status = load_masks(dataset, 32)
    got = dict(zip((s.path.split("/")[-1] for s in dataset.samples), status))
    assert got["red.png"] == got["green.png"] == got["two_files.png"] == "lesion"
    assert got["all_white.png"] == "all_lesion" and got["wrong_size.png"] == "size_mismatch"
    err = capsys.readouterr().err
    assert "all_white_mask.png" in err and "wrong_size_mask.png" in err and "still are" in err
    assert len([line for line in err.splitlines() if "lesion mask(s)" in line]) == 2  # one line per kind


def test_a_lesion_model_saves_and_loads_its_segmenter(lesion_model):
    from busi import checkpoint
    from busi.models import LesionNet
    _, ckpt, _ = lesion_model
    model, config = checkpoint.load(ckpt)
    assert isinstance(model, LesionNet) and config["lesion_size"] == 64
    x = torch.randn(2, 3, 64, 64)
    logits, lesion = model.forward_with_lesion(x)
    assert logits.shape == (2, 3) and lesion.shape == (2, 1, 32, 32)
    assert torch.equal(model(x), logits)  # the plain forward is the classifier: Grad-CAM, shift and export read it


def test_predict_evaluate_and_the_web_page_say_the_same_about_an_image(lesion_model, tmp_path, capsys):
    from busi.app import Predictor
    from busi.inference import run_predict
    data, ckpt, root = lesion_model
    image = sorted((data / "malignant").glob("*[0-9]).png"))[0]
    row = run_predict(ckpt, [image])[0]
    assert set(row["lesion"]) >= {"score", "box"}
    page = Predictor(ckpt).classify(image, explain=True)
    assert page["probabilities"] == row["probabilities"] and page["lesion"] == row["lesion"]
    assert page["predicted"] == row["predicted"] and page["overlay"].shape[:2] == (64, 64)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "ev"),
                 "--no-progress"]) == 0
    rows = {r["path"]: r for r in csv.DictReader(open(tmp_path / "ev" / "predictions.csv"))}
    mine = rows[f"malignant/{image.name}"]
    assert mine["predicted"] == row["predicted"]
    for c in CLASSES:
        assert float(mine[f"p_{c}"]) == pytest.approx(row["probabilities"][c], abs=2e-6)
    assert float(mine["lesion_score"]) == pytest.approx(row["lesion"]["score"], abs=1e-4)
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    lesion = metrics["lesion"]
    assert lesion["n_lesion_masks"] == 12 and 0 <= lesion["dice_mean"] <= 1 and "normal_vs_lesion_auroc" in lesion
    assert mine["lesion_dice"] != ""  # its mask is known: its Dice is written beside its prediction


def test_calibrate_re_fits_both_thresholds_together_and_promises_a_cross_fitted_recall(lesion_model, tmp_path, capsys):
    from busi import checkpoint
    from busi.inference import LoadedModel
    from conftest import make_kaggle_folder
    _, ckpt, _ = lesion_model
    model, config = checkpoint.load(ckpt)
    stored = {"rule": "lesion-first", "class": "malignant", "threshold": 0.5, "target_recall": 0.9,
              "lesion_threshold": 0.999, "lesion_recall": 0.95, "fitted_where": "somewhere else",
              "normal_only_if_familiar": True}
    checkpoint.save(tmp_path / "parent.pth", model, {**config, "operating_point": stored})
    here = make_kaggle_folder(tmp_path / "here", per_class=12, size=64)
    assert main(["calibrate", "--checkpoint", str(tmp_path / "parent.pth"), "--data", str(here),
                 "--malignant-recall", "0.75", "--out", str(tmp_path / "cal"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "(was 0.999)" in out and "fitted together on 36 images" in out and "cross-fitted over" in out
    loaded = LoadedModel(tmp_path / "cal" / "checkpoint.pth")
    op = loaded.config["operating_point"]
    assert op["rule"] == "lesion-first" and op["fitted_jointly"] and op["fitted_on_lesions"] == 24
    assert op["fitted_on_normals"] == 12 and op["lesion_threshold"] < 0.999
    # fitted on this hospital's own cancers and lesions: the guard that stood in for an unmeasured hospital is dropped
    assert "normal_only_if_familiar" not in op
    images = sorted(p for c in CLASSES for p in (here / c).glob("*).png"))
    said = loaded.run(torch.cat([loaded.prepare(p).input for p in images]))
    truth = torch.tensor([CLASSES.index(p.parent.name) for p in images])
    # on the images it was fitted on, the whole rule keeps the recall: a cancer with no lesion found counts as missed
    assert int((said.predicted[truth == 1] == 1).sum()) >= 9  # 75% of 12
    assert int((said.predicted[truth != 2] == 2).sum()) <= 2  # at most 10% of the 24 lesions called normal
    assert op["recall_where_fitted"] == pytest.approx(float((said.predicted[truth == 1] == 1).float().mean()), abs=1e-4)
    # what it promises comes from images the rule was not fitted on, with its interval
    promise = op["cross_fitted"]
    assert promise["images_decided"] > 0 and op["expected_recall"] == promise["malignant_recall"]
    assert "fold left out" in op["ci_method"]
    # a folder without normal scans keeps the lesion threshold it has and says so
    for name in ("normal",):
        import shutil
        shutil.rmtree(here / name)
    assert main(["calibrate", "--checkpoint", str(tmp_path / "cal" / "checkpoint.pth"), "--data", str(here),
                 "--malignant-recall", "0.75", "--out", str(tmp_path / "cal2"), "--no-progress"]) == 0
    assert "the lesion threshold" in capsys.readouterr().err
    kept = LoadedModel(tmp_path / "cal2" / "checkpoint.pth").config["operating_point"]
    assert kept["lesion_threshold"] == op["lesion_threshold"] and kept["fitted_jointly"] is False


def test_predict_json_and_table_show_the_outline(lesion_model, capsys):
    data, ckpt, _ = lesion_model
    image = sorted((data / "benign").glob("*[0-9]).png"))[0]
    assert main(["predict", "--checkpoint", str(ckpt), str(image), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert "score" in row["lesion"] and ("polygon" in row["lesion"] or row["lesion"]["box"] is None)
    assert main(["predict", "--checkpoint", str(ckpt), str(image)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "lesion (width x depth, depth/width)" in header


def test_evaluate_without_masks_reports_everything_but_dice_and_says_why(lesion_model, tmp_path):
    import shutil
    data, ckpt, _ = lesion_model
    bare = tmp_path / "bare"
    for cls in CLASSES:
        (bare / cls).mkdir(parents=True)
        for p in (data / cls).glob("*[0-9]).png"):
            shutil.copy(p, bare / cls / p.name)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(bare), "--out", str(tmp_path / "ev"),
                 "--no-progress"]) == 0
    lesion = json.loads((tmp_path / "ev" / "metrics.json").read_text())["lesion"]
    assert "dice_mean" not in lesion and "no lesion masks" in lesion["dice_note"]
    assert "normal_vs_lesion_auroc" in lesion and lesion["masks_not_used"] == {"missing": 18}
    loc = json.loads((tmp_path / "ev" / "metrics.json").read_text()).get("localization", {})
    assert "error" in loc or loc.get("against", "").startswith("the model's own lesion outlines")


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_exported_lesion_model_outlines_and_decides_as_the_checkpoint(lesion_model, tmp_path, fmt):
    from busi.export import export
    from busi.inference import run_predict
    data, ckpt, _ = lesion_model
    images = sorted((data / "malignant").glob("*[0-9]).png"))[:2] + sorted((data / "normal").glob("*[0-9]).png"))[:1]
    exported = export(ckpt, fmt, tmp_path / f"m{'.onnx' if fmt == 'onnx' else '.pt'}")
    for mine, theirs in zip(run_predict(exported, images), run_predict(ckpt, images)):
        assert mine["predicted"] == theirs["predicted"]
        assert all(abs(mine["probabilities"][c] - theirs["probabilities"][c]) < 1e-4 for c in CLASSES)
        assert mine["lesion"]["score"] == pytest.approx(theirs["lesion"]["score"], abs=1e-3)


def test_dice_interval_resamples_patients_and_figures_come_per_scanner():
    from busi.lesion import lesion_figures
    n = 40
    dice = torch.linspace(0.2, 0.9, n)
    status = ["lesion"] * 30 + ["empty"] * 10
    labels = torch.tensor([0] * 15 + [1] * 15 + [2] * 10)
    scores = torch.where(labels == 2, torch.tensor(0.1), torch.tensor(0.8))
    patients = [f"p{i // 2}" for i in range(n)]  # two images each
    groups = ["GE"] * 20 + ["Toshiba"] * 20
    out = lesion_figures(scores, dice, dice, status, labels, CLASSES, patients=patients, groups=groups)
    assert out["dice_ci_method"] == "95% bootstrap over 15 patients" and out["dice_ci"][0] < out["dice_mean"] < out["dice_ci"][1]
    assert set(out["per_group"]) == {"GE", "Toshiba"}
    assert out["per_group"]["GE"]["n_lesion_masks"] == 20 and out["per_group"]["Toshiba"]["n_lesion_masks"] == 10
    assert out["per_group"]["Toshiba"]["normal_vs_lesion_auroc"] == 1.0 and out["lesions_found"] == 1.0
    few = lesion_figures(scores[:6], dice[:6], dice[:6], status[:6], labels[:6], CLASSES, patients=patients[:6])
    assert few["dice_ci"] is None and few["dice_ci_method"].startswith("too few: 3 patients")


def test_evaluate_streams_the_folder_in_batches_to_the_same_figures(lesion_model):
    """evaluate keeps no image, mask or map of the folder: batch by batch it must say what one pass over all says."""
    from busi.data import load, load_masks, scan
    from busi.evaluate import _stream
    from busi.inference import LoadedModel
    from busi.lesion import dice_iou
    data, ckpt, _ = lesion_model
    loaded = LoadedModel(ckpt)
    (data / "benign" / "benign (2).png").rename(data / "benign.bak")  # a mask left without its image
    (data / "benign" / "benign (2).png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    try:
        streamed = _stream(loaded, scan(data), progress=False, batch_size=4)
        steps = loaded.config.get("preprocess", ())
        images, labels, dataset = load(scan(data), loaded.config["image_size"], False, steps)
        masks, status = load_masks(dataset, loaded.config["image_size"], steps)
    finally:
        (data / "benign.bak").replace(data / "benign" / "benign (2).png")
    whole = loaded.run(images)
    dice, _ = dice_iou(whole.lesion_maps, masks, status)
    assert [s.path for s in streamed["dataset"].samples] == [s.path for s in dataset.samples]
    assert "benign/benign (2).png" in streamed["dataset"].skipped and streamed["mask_status"] == status
    assert torch.equal(streamed["labels"], labels)
    assert torch.allclose(streamed["probs"], whole.probs, atol=1e-5)
    assert torch.allclose(streamed["lesion_scores"], whole.lesion_scores, atol=1e-3)
    assert torch.allclose(streamed["lesion_dice"], dice, atol=1e-3, equal_nan=True)


def test_the_outline_goes_with_the_decision():
    from busi.lesion import decision_outline
    faint = np.full((56, 56), 0.02, np.float32)
    faint[20:30, 20:30] = 0.3  # over a lesion threshold of, say, 0.2, but nowhere near the outline's 0.5
    found = decision_outline(faint, 112, 112, called_lesion=True)
    assert found is not None and found["faint"] and found["level"] == pytest.approx(0.15)
    x0, y0, x1, y1 = found["box"]
    assert abs(x0 - 40) <= 3 and abs(x1 - 60) <= 3 and abs(y0 - 40) <= 3 and abs(y1 - 60) <= 3
    assert decision_outline(_blob_map(), 112, 112, called_lesion=False) is None  # called normal: no lesion shown
    clear = decision_outline(_blob_map(), 112, 224, called_lesion=True)
    assert "faint" not in clear and clear["box"] == outline(_blob_map(), 112, 224)["box"]


def test_predict_shows_a_lesion_for_every_lesion_decision_and_none_for_normal(lesion_model, tmp_path, capsys):
    from busi.inference import run_predict
    data, ckpt, _ = lesion_model
    images = sorted(data.rglob("*[0-9]).png"))
    rows = run_predict(ckpt, images, explain_dir=tmp_path / "x")
    for row in rows:
        called_lesion = row["predicted"] != "normal"
        assert bool(row["lesion"].get("box")) == called_lesion, row
        assert row["basis"]["text"].startswith(row["predicted"] + ":")
    assert main(["predict", "--checkpoint", str(ckpt), *map(str, images)]) == 0
    table = capsys.readouterr().out.splitlines()[1:]
    for line, row in zip(table, rows):
        assert ("none found" in line) == (row["predicted"] == "normal")
