"""The trained model that ships inside the package: where it is, its card, and how a run becomes it."""
from __future__ import annotations

import csv
import json
import platform
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import torch
import yaml

from . import __version__, checkpoint
from .errors import BusiError
from .operating import MAX_LESIONS_CALLED_NORMAL

ASSETS = Path(__file__).resolve().parent / "assets"
MODEL = ASSETS / "recommended.pth"
CARD = ASSETS / "MODEL_CARD.md"
CARD_DATA = ASSETS / "card.json"  # what the card says, for machines (and the test that holds the file to it)
REBUILD = "python scripts/bundle_model.py --data Dataset_BUSI_with_GT"
# Keys that say on what data and hardware, not with what recipe, a run trained: they may differ between the bundled run
# and configs/recommended.yaml.
RUN_ONLY_KEYS = ("data", "meta", "id_column", "patient_column", "group_column", "precision", "channels_last",
                 "accelerator", "devices", "strategy", "num_nodes", "busi_version", "command")


def default_checkpoint(say=None) -> Path:
    """The bundled model's path, checked; says in one line (stderr) that it is the one in use."""
    if not MODEL.is_file():
        raise BusiError(f"{MODEL}: no bundled model in this installation; pass --checkpoint FILE, or rebuild it "
                        f"from a source checkout: {REBUILD}")
    try:
        checkpoint.peek(MODEL)  # the full read comes with the command's own load
    except BusiError as e:
        raise BusiError(f"{e}; the bundled model is damaged: reinstall busi, rebuild it ({REBUILD}) "
                        f"or pass --checkpoint FILE") from None
    (say or (lambda line: print(line, file=sys.stderr)))(
        f"busi: using the bundled model ({MODEL.name}; `busi model` shows its card: data, figures at home and at "
        "hospitals it never saw, limits)")
    return MODEL


def card_text() -> str:
    if not CARD.is_file():
        raise BusiError(f"{CARD}: no model card in this installation (rebuild: {REBUILD})")
    return CARD.read_text()


def for_terminal(markdown: str, width: int | None = None) -> str:
    """A Markdown card as plain text for a terminal: headings underlined, emphasis and code marks dropped, paragraphs
    and list items wrapped to the window."""
    import re
    import shutil
    import textwrap
    width = width or min(100, shutil.get_terminal_size((100, 24)).columns)
    out = []
    for line in markdown.splitlines():
        text = re.sub(r"\*\*(.+?)\*\*", r"\1", line).replace("`", "")
        if text.startswith("#"):
            title = text.lstrip("#").strip()
            out += ["", title, ("=" if line.startswith("# ") else "-") * len(title)]
        elif text.lstrip().startswith("- "):
            indent = len(text) - len(text.lstrip())
            out += textwrap.wrap(text.strip(), width, initial_indent=" " * indent,
                                 subsequent_indent=" " * (indent + 2))
        else:
            out += textwrap.wrap(text, width) or [""]
    return "\n".join(out).strip() + "\n"


def card_summary() -> str:
    """What `busi model` prints: what the model is, what to expect at another hospital, its rule and how to re-set
    it, in a few lines; `busi model --full` prints the whole card."""
    import textwrap
    from .operating import describe
    if not CARD_DATA.is_file():
        raise BusiError(f"{CARD_DATA}: no model card in this installation (rebuild: {REBUILD})")
    data = json.loads(CARD_DATA.read_text())
    op = data.get("operating_point") or {}
    sources = ", ".join(data.get("trained_on", []))
    lines = [f"busi's bundled model: {data['model']}"
             + (" with a lesion segmenter" if (data.get("recipe") or {}).get("lesion_size") else "")
             + f", classes {', '.join(data['classes'])}, trained on {sources}. Research tool, not a diagnosis."]
    if data.get("hospitals_never_seen"):
        lines.append(f"At a hospital it never saw (hospital-out cross-validation): {data['hospitals_never_seen']}; "
                     "at your hospital expect figures like these, not the home ones.")
    seg = op.get("segmentation_hospital_out") or {}
    for run, per in list(seg.items())[:1]:
        lines.append("Lesion outline at a hospital its segmenter never saw: " + "; ".join(
            f"{name} Dice {v['dice_mean']:.2f}" + (f", normal vs lesion AUROC {v['normal_vs_lesion_auroc']:.2f}"
                                                   if "normal_vs_lesion_auroc" in v else "") for name, v in per.items()))
    lines.append(f"Decision rule: {describe(op, brief=True)}; fitted for {op.get('target_recall', 0.9):.0%} of the "
                 "cancers at every hospital (busi model --full says how)." if op.get("rule") == "lesion-first"
                 else f"Decision rule: {describe(op)}.")
    lines.append("Re-set it on your own labelled images: busi split MY_LABELLED --out parts --meta MY.csv "
                 "--patient-column PATIENT, then busi calibrate --data parts/adapt and busi evaluate --data parts/test.")
    lines.append("The whole card (data, recipe, figures, limits, citations): busi model --full")
    return "\n".join(textwrap.fill(line, 100, subsequent_indent="  ", break_on_hyphens=False) for line in lines)


def recipe_of(config: dict) -> dict:
    """The recipe part of a run's config: every key but those that only say where and on what hardware it ran."""
    return {k: v for k, v in config.items() if k not in RUN_ONLY_KEYS}


def _oof_rows(runs: list[Path]) -> list[dict]:
    import csv
    rows = []
    for run in runs:
        with open(run / "oof_predictions.csv", newline="") as f:
            rows += list(csv.DictReader(f))
    return rows


def operating_point_from_cv(runs: list[Path], classes: list[str], target_recall: float, patients: dict[str, str],
                            prefix: str = "p_", also: dict[str, list[Path]] | None = None) -> dict:
    """The malignant threshold fitted on the out-of-fold predictions of `busi cv` runs of the recipe (hundreds of
    malignant images, each scored by a model that never saw it), with the recall it can promise and its recall and
    specificity per source there; also: {name: other cv runs} on whose predictions the same threshold is judged per
    source (e.g. at_home: a within-source cv). patients: image path -> patient, for the bootstrap (images elsewhere);
    prefix "adapted_p_" fits on the predictions after label-free adaptation (hospital-out runs have them)."""
    import yaml
    from .operating import fit_with_ci
    def predictions(rows, prefix):  # -> (probabilities, labels) of oof_predictions.csv rows
        return (torch.tensor([[float(r[f"{prefix}{c}"]) for c in classes] for r in rows]),
                torch.tensor([classes.index(r["true"]) for r in rows]))
    rows = _oof_rows(runs)
    probs, labels = predictions(rows, prefix)
    point = fit_with_ci(probs, labels, classes, target_recall, [patients.get(r["path"], r["path"]) for r in rows],
                        where="the out-of-fold predictions")
    k, b = classes.index(point["class"]), classes.index("benign")
    hospital_out = all(yaml.safe_load((run / "config.yaml").read_text()).get("split") == "source" for run in runs)
    point["fitted_where"] = ("out-of-fold predictions of hospital-out cross-validation (each image scored by a model "
                             "that never saw its hospital)" if hospital_out else
                             "out-of-fold predictions of cross-validation on every source it trains on")
    point["fitted_on_runs"] = [run.name for run in runs]

    def per_source(rows, prefix, normals: bool) -> dict:
        """{source: recall, specificity (and normal scans called malignant, where asked) at the threshold}"""
        probs, labels = predictions(rows, prefix)
        figures = {}
        for source in sorted({r["path"].split("/", 1)[0] for r in rows}):
            mine = torch.tensor([r["path"].startswith(source + "/") for r in rows])
            malignant, benign = mine & (labels == k), mine & (labels == b)
            figures[source] = {"recall": round(float((probs[malignant, k] >= point["threshold"]).float().mean()), 4),
                               "specificity": round(float((probs[benign, k] < point["threshold"]).float().mean()), 4)
                               if benign.any() else None}
            # the rule overrides every class, so a sensitive threshold calls normal scans malignant too; measured only
            # where the models knew "normal" (hospital-out, BUS-BRA's models never saw a normal scan)
            normal = mine & (labels == classes.index("normal")) if normals and "normal" in classes else mine & False
            if normal.any():
                figures[source]["normal_called_malignant"] = round(
                    float((probs[normal, k] >= point["threshold"]).float().mean()), 4)
        return figures
    point["per_source"] = per_source(rows, prefix, normals=False)
    for name, other in (also or {}).items():
        point[name] = {"runs": [run.name for run in other], **per_source(_oof_rows(list(other)), "p_", normals=True)}
    return point


def joined_oof(classifier_runs: list[Path], lesion_runs: list[Path], classes: list[str], score: str = "lesion_score"):
    """(probabilities, lesion scores, labels, sources, the segmenter runs' figures): out-of-fold class probabilities of
    `busi cv` runs joined by image with out-of-fold lesion scores of benchmarks/lesion.py runs; several runs of either
    (seeds) meet in every combination, as many rows. score: the lesion_oof.csv column taken as the lesion score."""
    scores: dict[str, list[float]] = {}
    segmentation = {}
    for run in lesion_runs:
        with open(run / "lesion_oof.csv", newline="") as f:
            for r in csv.DictReader(f):
                scores.setdefault(r["path"], []).append(float(r[score]))
        segmentation[run.name] = json.loads((run / "lesion_metrics.json").read_text())["segmentation"]
    pairs = [(r, s) for r in _oof_rows(classifier_runs) if r["path"] in scores for s in scores[r["path"]]]
    return (torch.tensor([[float(r[f"p_{c}"]) for c in classes] for r, _ in pairs]),
            torch.tensor([s for _, s in pairs]), torch.tensor([classes.index(r["true"]) for r, _ in pairs]),
            [r["path"].split("/", 1)[0] for r, _ in pairs], segmentation,
            torch.tensor([r.get("outside_training") == "1" for r, _ in pairs]))


def lesion_rule_from_cv(classifier_runs: list[Path], lesion_runs: list[Path], classes: list[str],
                        target_recall: float, max_lesions_called_normal: float = MAX_LESIONS_CALLED_NORMAL,
                        home: tuple[list[Path], list[Path]] | None = None, per_hospital: bool = True,
                        familiar_only: bool = False) -> dict:
    """The lesion-first rule fitted on hospital-out out-of-fold predictions: class probabilities from `busi cv --split
    source` runs of the classifier, lesion scores from benchmarks/lesion.py runs of the segmenter (each image scored
    by models that never saw its hospital); with what the rule does per held-out source, and the segmenter's Dice
    there. Both thresholds are fitted together (operating.fit_joint_rule), with the recall bound held at every held-out
    hospital (per_hospital) or over them pooled; the trade-off (sensitivity, specificity and normal recall per
    held-out hospital against the recall asked for) is kept beside the rule. home: (within-source cv runs of the
    classifier, benchmarks/lesion.py --folds runs): what the same rule does at home, where normal scans were in
    training. familiar_only (operating.FAMILIAR_ONLY): 'normal' only for a scan with no lesion found that is not
    flagged unlike the training images, the rule fitted on the hospital-out and the home rows together, each bound
    held at every hospital in both (a rule for the hospitals a model trained on that keeps the cancers at one it never
    saw)."""
    from .operating import FAMILIAR_ONLY, fit_joint_rule, guarded, lesion_rule_figures, rule_tradeoff
    probs, lesion, labels, sources, segmentation, outside = joined_oof(classifier_runs, lesion_runs, classes)
    where = ("out-of-fold predictions of hospital-out cross-validation (each image's class probabilities and lesion "
             "score from models that never saw its hospital)")
    groups = sources if per_hospital else None
    fit_on = (probs, lesion, labels)
    if familiar_only:  # both kinds of row, each bound held at every hospital in both; a flagged scan: a lesion found
        if not home:
            raise BusiError("a rule that calls 'normal' only for familiar scans is fitted at home and at hospitals "
                            "never seen: it needs segmenters cross-validated within the sources (--lesion-home)")
        lesion = guarded(lesion, outside, {FAMILIAR_ONLY: True})
        home_probs, home_lesion, home_labels, home_sources, _, _ = joined_oof(*home, classes)
        fit_on = (torch.cat([probs, home_probs]), torch.cat([lesion, home_lesion]), torch.cat([labels, home_labels]))
        groups = [f"new hospital: {s}" for s in sources] + [f"home: {s}" for s in home_sources]
        where = ("out-of-fold predictions at hospitals never seen (hospital-out cross-validation, each image's class "
                 "probabilities, lesion score and shift flag from models that never saw its hospital) and at home (the "
                 "same images' lesion scores from segmenters cross-validated within the pooled sources, the shift "
                 "flag taken as not raised), each image once of each kind; a scan flagged unlike the training images "
                 "counts as a lesion found")
    rule = fit_joint_rule(*fit_on, classes, target_recall, max_lesions_called_normal, where=where, groups=groups)
    if familiar_only:
        rule[FAMILIAR_ONLY] = True
    rule["fitted_on_runs"] = [run.name for run in list(classifier_runs) + list(lesion_runs)]
    rule["per_source"] = lesion_rule_figures(probs, lesion, labels, classes, rule, sources)
    rule["tradeoff"] = rule_tradeoff(*fit_on, classes, groups if groups is not None else sources,
                                     max_lesions_called_normal=max_lesions_called_normal, per_group_bounds=per_hospital)
    rule["segmentation_hospital_out"] = segmentation
    if home:
        probs, lesion, labels, sources, segmentation, _ = joined_oof(*home, classes)
        rule["at_home"] = {"runs": [run.name for run in home[0] + home[1]], "segmentation": segmentation,
                           **lesion_rule_figures(probs, lesion, labels, classes, rule, sources)}
    return rule


def data_summary(run: Path, meta: dict[str, dict[str, str]] | None = None) -> dict:
    """What trained the model (training and validation part of the run): images per source and class, per scanner."""
    parts = json.loads((run / "split.json").read_text())
    used = parts["train"] + parts["val"]
    out: dict = {}
    for path in used:
        source, cls = path.split("/")[:2] if path.count("/") >= 2 else ("data", path.split("/")[0])
        entry = out.setdefault(source, {"images": 0, "classes": {}, "scanners": {}})
        entry["images"] += 1
        entry["classes"][cls] = entry["classes"].get(cls, 0) + 1
        scanner = (meta or {}).get(path, {}).get("group")
        if scanner:
            entry["scanners"][scanner] = entry["scanners"].get(scanner, 0) + 1
    return {"sources": out, "left_out_label_conflicts": len(parts.get("left_out_label_conflicts", [])),
            "skipped": len(parts.get("skipped", {}))}


def bundle(run: Path, recipe_file: Path, examples: Path, command: str, out: Path = MODEL,
           threshold_runs: list[Path] = (), patients: dict[str, str] | None = None, home_runs: list[Path] = (),
           adapted_threshold_runs: list[Path] = (), lesion_runs: list[Path] = (),
           max_lesions_called_normal: float = MAX_LESIONS_CALLED_NORMAL, lesion_home_runs: list[Path] = (),
           per_hospital: bool = True, familiar_only: bool = False) -> dict:
    """Turn a finished `busi train` run of the recommended recipe into the bundled model: fp16 tensors where they move
    no probability of the example images by more than 1e-3, else fp32, with the card's data (card.json) beside it.

    threshold_runs: `busi cv --split source` folders of the same recipe on the same sources: the stored operating point is
    then fitted on their out-of-fold predictions (hundreds of malignant images, each scored by a model that never saw
    its hospital: a threshold set for hospitals it never saw) instead of the run's few validation images; home_runs
    (`busi cv` within the sources) say what the same threshold does at home. adapted_threshold_runs: hospital-out
    runs whose adapted predictions set the threshold `busi adapt` switches to.
    Folder paths of the machine it was built on are replaced by source names."""
    from .inference import LoadedModel, run_predict
    run_config = yaml.safe_load((run / "config.yaml").read_text())
    recipe = yaml.safe_load(recipe_file.read_text())
    differ = sorted(k for k, v in recipe_of(recipe).items() if run_config.get(k) != v)
    if differ:
        raise BusiError(f"{run}: was not trained with {recipe_file} (differs in {', '.join(differ)})")
    arch = run_config["models"][0]
    source = run / arch / "checkpoint.pth"
    model, config, extras = LoadedModel(source).checkpoint("the bundled model")
    trained_on = config["trained_on"] if isinstance(config["trained_on"], list) else [config["trained_on"]]
    config["trained_on"] = [Path(p).name for p in trained_on]  # names travel; this machine's folders do not
    if config.get("parent"):  # the classifier a segmenter joined: its file's name, not where it lay
        config["parent"]["checkpoint"] = Path(config["parent"]["checkpoint"]).name
    if lesion_runs:  # a segmenter beside the classifier: the lesion-first rule, fitted hospital-out
        # at home, the classifier's hospital-out predictions where no within-source run is given: its p(malignant |
        # lesion) there is pessimistic, never flattering
        home = ((list(home_runs or threshold_runs), list(lesion_home_runs)) if lesion_home_runs
                and (home_runs or familiar_only) else None)
        config["operating_point"] = lesion_rule_from_cv(
            list(threshold_runs), list(lesion_runs), list(config["classes"]), recipe["malignant_recall"],
            max_lesions_called_normal, home, per_hospital, familiar_only)
    elif threshold_runs:
        config["operating_point"] = operating_point_from_cv(list(threshold_runs), list(config["classes"]),
                                                            recipe["malignant_recall"], patients or {},
                                                            also={"at_home": list(home_runs)} if home_runs else None)
    if adapted_threshold_runs:  # hospital-out runs with adapted predictions: the threshold `busi adapt` switches to
        config["operating_point_after_adapt"] = operating_point_from_cv(
            list(adapted_threshold_runs), list(config["classes"]), recipe["malignant_recall"], patients or {},
            "adapted_p_")
    out.parent.mkdir(parents=True, exist_ok=True)
    full = run_predict(source, [examples])

    def saved_as(dtype, only=""):  # -> (rows predicted by the saved file, largest change of a probability against
        checkpoint.save(out, model, config, dtype=dtype, extras=extras, only=only)  # the run's, and of a lesion score)
        rows = run_predict(out, [examples])
        return (rows, max(abs(a["probabilities"][c] - b["probabilities"][c]) for a, b in zip(full, rows)
                          for c in a["probabilities"]),
                max([abs(a["lesion"]["score"] - b["lesion"]["score"]) for a, b in zip(full, rows) if "lesion" in a],
                    default=0.0))
    # smaller where it changes no answer noticeably: a probability by 1e-3 at most, a lesion score (its threshold is
    # ~0.15, fitted on hundreds of images) by 5e-3
    noticed = lambda drift, lesion_drift: drift > 1e-3 or lesion_drift > 5e-3  # noqa: E731
    stored = "float16"
    half, drift, lesion_drift = saved_as(torch.float16)
    if noticed(drift, lesion_drift) and "lesion_size" in config:  # the segmenter alone in float16
        stored = "float32 classifier, float16 segmenter"
        half, drift, lesion_drift = saved_as(torch.float16, only="segmenter.")
    if noticed(drift, lesion_drift):  # ship the fp32 tensors as trained
        stored = "float32"
        half, drift, lesion_drift = saved_as(None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    data = {
        "model": arch, "classes": config["classes"], "image_size": config["image_size"],
        "temperature": config.get("temperature"), "operating_point": config.get("operating_point"),
        "operating_point_after_adapt": config.get("operating_point_after_adapt"), "trained_on": config["trained_on"], "shift": config.get("shift"),
        "fingerprints": len(config.get("fingerprint_paths", [])),
        "recipe": {k: Path(v).name if k == "init_checkpoint" and v else v for k, v in recipe_of(run_config).items()}, "trained_with": {k: run_config.get(k) for k in ("precision", "channels_last")},
        "command": command, "commit": commit or "unknown", "bundled_at": datetime.now().isoformat(timespec="seconds"),
        "trained_at": config.get("trained_at"), "train_seconds": config.get("train_seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                   f"{torch.backends.cpu.get_cpu_capability()}",
        "busi_version": __version__, "stored_as": stored, "max_probability_change": round(drift, 7),
        "max_lesion_score_change": round(lesion_drift, 7),
        "size_bytes": out.stat().st_size,
        "examples": [{"image": str(Path(r["path"]).relative_to(examples.parent)), "predicted": r["predicted"],
                      "probabilities": r["probabilities"]} for r in half],
    }
    (out.parent / CARD_DATA.name).write_text(json.dumps(data, indent=2) + "\n")
    return data
