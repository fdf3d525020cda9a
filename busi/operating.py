"""Decision rules and their thresholds: the sensitivity-first malignant threshold, and the lesion-first rule ('normal'
when no lesion is outlined, else malignant vs benign judged among lesions), fitted and applied."""
from __future__ import annotations

import math

import numpy as np
import torch

from .errors import BusiError

POSITIVE = "malignant"
LESION_FIRST = "lesion-first"
MIN_POSITIVES = 10  # fewer malignant images (or patients) than this promise no recall: refused
# A lesion-first rule with this key true calls 'normal' only a scan that also looks like the model's training images:
# one flagged unlike them (busi.shift) counts as a lesion found, whatever its lesion score. At a hospital it never saw,
# a segmenter misses lesions (their score at its floor) more often than it finds normal tissue, so there 'no lesion'
# is not to be trusted; at home the flag is raised for about 5% of images, and normal scans are still called normal.
FAMILIAR_ONLY = "normal_only_if_familiar"


def fit_threshold(probs: torch.Tensor, labels: torch.Tensor, classes, target_recall: float) -> dict | None:
    """The highest threshold on p(malignant) at which at least target_recall of the malignant images are called so.

    Fitted on the validation part (never on a test part); None when there is no malignant class or image to fit on.
    """
    if POSITIVE not in classes:
        return None
    k = list(classes).index(POSITIVE)
    positives = probs[labels == k, k].sort(descending=True).values
    if len(positives) == 0:
        return None
    needed = max(1, math.ceil(target_recall * len(positives) - 1e-9))
    # never below 0: a negative score marks a positive that no threshold can find (a cancer the lesion-first rule
    # calls normal, busi.adapt), and it must count as missed, not pull the threshold down to reach it
    threshold = max(0.0, float(positives[needed - 1]))
    return {"class": POSITIVE, "threshold": round(threshold, 6), "target_recall": target_recall,
            "fitted_on": int(len(labels)), "fitted_on_positives": int(len(positives)),
            "recall_where_fitted": round(float((positives >= threshold).float().mean()), 4)}


def guarded(lesion_scores: torch.Tensor | None, outside, rule: dict | None) -> torch.Tensor | None:
    """The lesion scores a lesion-first rule decides on: for a rule with FAMILIAR_ONLY, an image flagged unlike the
    training images (outside: a bool per image) scores 1, a lesion found; otherwise the scores as they are."""
    if lesion_scores is None or outside is None or not (rule or {}).get(FAMILIAR_ONLY):
        return lesion_scores
    return torch.where(torch.as_tensor(outside, dtype=torch.bool), torch.ones_like(lesion_scores), lesion_scores)


def decide(probs: torch.Tensor, classes, operating_point: dict | None, lesion_scores: torch.Tensor | None = None
           ) -> torch.Tensor:
    """Predicted class per row.

    The lesion-first rule (a model with a segmenter): 'normal' where the lesion score is below its threshold, else
    'malignant' where p(malignant) / (p(malignant) + p(benign)) reaches its threshold, else 'benign'; so a scan with
    no lesion is never called malignant, however high p(malignant). The malignant operating point: its class wherever
    its probability reaches the threshold, else the most probable other class. Without a rule: argmax.
    """
    if operating_point and operating_point.get("rule") == LESION_FIRST:
        if lesion_scores is None:
            raise BusiError("this model decides from its lesion outline, which this way of running it does not give "
                            "(use the checkpoint.pth, not an exported model)")
        m, b = list(classes).index(POSITIVE), list(classes).index("benign")
        predicted = torch.where(lesion_given(probs, m, b) >= operating_point["threshold"], m, b)
        if "normal" in classes:
            predicted = torch.where(lesion_scores < operating_point["lesion_threshold"], list(classes).index("normal"),
                                    predicted)
        return predicted.long()
    if not operating_point or operating_point.get("class") not in classes:
        return probs.argmax(1)
    k = list(classes).index(operating_point["class"])
    others = probs.clone()
    others[:, k] = -1
    return torch.where(probs[:, k] >= operating_point["threshold"], torch.full_like(probs[:, 0], k, dtype=torch.long),
                       others.argmax(1))


def lesion_given(probs: torch.Tensor, malignant: int, benign: int) -> torch.Tensor:
    """p(malignant | a lesion): the classifier's malignant share of its lesion classes."""
    return probs[:, malignant] / (probs[:, malignant] + probs[:, benign]).clamp_min(1e-12)


def rounded_down(threshold: float) -> float:
    """Six decimals, rounded down: the image whose score set a threshold stays at or above it."""
    return math.floor(threshold * 1e6) / 1e6


def threshold_for_recall(values: torch.Tensor, recall: float) -> float:
    """The highest threshold that at least `recall` of values reach."""
    ordered = values.sort(descending=True).values
    return float(ordered[max(1, math.ceil(recall * len(ordered) - 1e-9)) - 1])


def fit_lesion_rule(probs: torch.Tensor, lesion_scores: torch.Tensor, labels: torch.Tensor, classes,
                    malignant_recall: float = 0.9, lesion_recall: float = 0.95, where: str = "validation images") -> dict:
    """The lesion-first rule's two thresholds: the lesion score that finds lesion_recall of the lesion images
    (benign and malignant), and the p(malignant | lesion) at which the rule as a whole calls malignant_recall of the
    malignant images malignant."""
    classes = list(classes)
    m, b = classes.index(POSITIVE), classes.index("benign")
    lesion = (labels == m) | (labels == b)
    malignant = labels == m
    if int(malignant.sum()) < MIN_POSITIVES or int(lesion.sum()) < MIN_POSITIVES:
        raise BusiError(f"{where}: {int(malignant.sum())} malignant and {int(lesion.sum())} lesion image(s): at least "
                        f"{MIN_POSITIVES} of each are needed to set the lesion-first rule")
    t_l = threshold_for_recall(lesion_scores[lesion], lesion_recall)
    # the malignant threshold is set for the whole rule's recall: a cancer the outline missed is called normal, so the
    # cancers it found must make up the rest (all of them, if too few were found)
    found = lesion_given(probs, m, b)[malignant & (lesion_scores >= t_l)]
    needed = math.ceil(malignant_recall * int(malignant.sum()) - 1e-9)
    if len(found) <= needed:
        t_m = float(found.min()) if len(found) else 0.0
    else:
        t_m = threshold_for_recall(found, needed / len(found))
    return {"rule": LESION_FIRST, "class": POSITIVE, "threshold": rounded_down(t_m), "target_recall": malignant_recall,
            "lesion_threshold": rounded_down(t_l), "lesion_recall": lesion_recall, "fitted_on": int(len(labels)),
            "fitted_on_positives": int(malignant.sum()), "fitted_on_lesions": int(lesion.sum()), "fitted_where": where}


MAX_LESIONS_CALLED_NORMAL = 0.10  # the joint fit's cap on lesions (benign or malignant) called 'normal'
MAX_CANDIDATES = 400  # lesion thresholds tried by the joint fit: every score on small sets, quantiles beyond


def fit_joint_rule(probs: torch.Tensor, lesion_scores: torch.Tensor, labels: torch.Tensor, classes,
                   malignant_recall: float = 0.9, max_lesions_called_normal: float = MAX_LESIONS_CALLED_NORMAL,
                   where: str = "validation images", lesion_threshold: float | None = None, groups=None) -> dict:
    """The lesion-first rule's two thresholds fitted together for what matters: the rule as a whole (a cancer with no
    lesion found counts as missed) calls at least malignant_recall of the malignant images malignant, calls at most
    max_lesions_called_normal of the lesions 'normal', and among the rules that keep both, calls the most normal scans
    normal and benign lesions benign (the sum of those two shares). A normal scan called malignant costs more than a
    benign lesion called normal, and both cost less than a missed cancer: hence the recall bound first, then the two
    shares. groups (e.g. each image's held-out hospital): both bounds hold in every group (with at least MIN_POSITIVES
    malignant images, for the recall), and the shares are averaged over groups, so no hospital pays for another.
    lesion_threshold: keep it and fit only the malignant threshold (a set without normal scans to fit on)."""
    classes = list(classes)
    m, b = classes.index(POSITIVE), classes.index("benign")
    n = classes.index("normal") if "normal" in classes else -1
    y, s = labels.numpy(), lesion_scores.double().numpy()
    q = lesion_given(probs, m, b).double().numpy()
    mal, ben, nor = y == m, y == b, y == n
    lesion = mal | ben
    if int(mal.sum()) < MIN_POSITIVES or int(lesion.sum()) < MIN_POSITIVES:
        raise BusiError(f"{where}: {int(mal.sum())} malignant and {int(lesion.sum())} lesion image(s): at least "
                        f"{MIN_POSITIVES} of each are needed to set the lesion-first rule")
    names = np.asarray(groups if groups is not None else ["all"] * len(y)).astype(str)
    parts = [names == g for g in sorted(set(names.tolist()))]
    bound = [g & mal for g in parts if (g & mal).sum() >= MIN_POSITIVES] or [mal]
    needed = [math.ceil(malignant_recall * int(g.sum()) - 1e-9) for g in bound]
    mean_over = lambda hits, among: (float(np.mean([hits[g & among].mean() for g in parts if (g & among).any()]))  # noqa: E731
                                     if among.any() else 0.0)
    if lesion_threshold is not None:
        candidates = np.array([lesion_threshold])
    else:  # 0 calls nothing normal; each score a lesion threshold could sit at (rounded down, as it is stored)
        values = np.unique(np.floor(s * 1e6) / 1e6)
        if len(values) > MAX_CANDIDATES:
            values = np.unique(np.quantile(values, np.linspace(0, 1, MAX_CANDIDATES), method="lower"))
        candidates = np.concatenate([[0.0], values])
    best = None
    for t_l in candidates:
        found = s >= t_l
        q_found = [np.sort(q[g & found])[::-1] for g in bound]
        if any(len(f) < k for f, k in zip(q_found, needed)):
            break  # higher lesion thresholds find fewer cancers still
        called_normal = ~found
        if lesion_threshold is None and any(called_normal[g & lesion].mean() > max_lesions_called_normal
                                            for g in parts if (g & lesion).any()):
            break
        t_m = rounded_down(min(float(f[k - 1]) if k else 1.0 for f, k in zip(q_found, needed)))
        benign_called_benign = mean_over(found & (q < t_m), ben)
        normal_called_normal = mean_over(called_normal, nor)
        value = normal_called_normal + benign_called_benign
        if best is None or value > best[0] + 1e-12:
            best = (value, float(t_l), t_m)
    if best is None:
        raise BusiError(f"{where}: no lesion threshold keeps {malignant_recall:.0%} of the cancers found")
    _, t_l, t_m = best
    called = np.where(s < t_l, n, np.where(q >= t_m, m, b))
    share = lambda hit, among: round(float(hit[among].mean()), 4) if among.any() else None  # noqa: E731
    return {"rule": LESION_FIRST, "class": POSITIVE, "threshold": t_m, "target_recall": malignant_recall,
            "lesion_threshold": rounded_down(t_l), "fitted_jointly": lesion_threshold is None,
            "max_lesions_called_normal": max_lesions_called_normal,
            "where_fitted": {"malignant_recall": share(called == m, mal), "normal_recall": share(called == n, nor),
                             "benign_called_benign": share(called == b, ben),
                             "lesions_called_normal": share(called == n, lesion)},
            "fitted_on": int(len(labels)), "fitted_on_positives": int(mal.sum()), "fitted_on_lesions": int(lesion.sum()),
            "fitted_on_normals": int(nor.sum()), "fitted_where": where,
            **({"bounds_held_per": "group"} if groups is not None else {})}


def cross_fitted(probs: torch.Tensor, lesion_scores: torch.Tensor, labels: torch.Tensor, classes, malignant_recall: float,
                 clusters=None, folds: int = 5, seed: int = 0, n_boot: int = 1000, **fit) -> dict:
    """What the joint rule promises on new patients like these: fitted on the other folds of patients (grouped and
    stratified), judged on each fold in turn, so every image is decided by a rule that never saw it; the malignant
    recall, normal recall, specificity and lesions called normal of those out-of-fold decisions, the recall with a 95%
    bootstrap interval over patients (images when none are known). fit: fit_joint_rule's other arguments."""
    from sklearn.model_selection import StratifiedGroupKFold

    from .metrics import cluster_resamples
    classes = list(classes)
    m, b = classes.index(POSITIVE), classes.index("benign")
    n = classes.index("normal") if "normal" in classes else -1
    unit = "patients" if clusters is not None else "images"
    clusters = np.asarray([str(c) for c in clusters] if clusters is not None else np.arange(len(labels)).astype(str))
    y = labels.numpy()
    k = max(2, min(folds, len(set(clusters[y == m].tolist()))))
    called = np.full(len(y), -1)
    for train, test in StratifiedGroupKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y, clusters):
        try:
            rule = fit_joint_rule(probs[train], lesion_scores[train], labels[train], classes, malignant_recall, **fit)
        except BusiError:  # too few malignant images left to fit on: this fold's images stay undecided
            continue
        called[test] = decide(probs[test], classes, rule, lesion_scores[test]).numpy()
    done = called >= 0
    mal, ben, nor = done & (y == m), done & (y == b), done & (y == n)
    share = lambda hit, among: round(float(hit[among].mean()), 4) if among.any() else None  # noqa: E731
    decided = np.flatnonzero(done)
    recalls = []
    for pick in cluster_resamples(clusters[done], n_boot, seed):
        rows = decided[pick]
        rows = rows[y[rows] == m]
        if len(rows):
            recalls.append(float((called[rows] == m).mean()))
    return {"folds": k, "images_decided": int(done.sum()), "malignant_recall": share(called == m, mal),
            "recall_ci": [round(float(np.quantile(recalls, q)), 4) for q in (0.025, 0.975)] if recalls else None,
            "normal_recall": share(called == n, nor), "specificity": share(called != m, ben),
            "lesions_called_normal": share(called == n, mal | ben),
            "ci_method": f"the rule fitted on {k - 1} of {k} folds of {unit} and applied to the fold left out; 95% "
                         f"bootstrap over {len(set(clusters[done].tolist()))} {unit} of those decisions"}


def rule_tradeoff(probs: torch.Tensor, lesion_scores: torch.Tensor, labels: torch.Tensor, classes, groups,
                  recalls=(0.8, 0.85, 0.9, 0.95, 0.98), max_lesions_called_normal: float = MAX_LESIONS_CALLED_NORMAL,
                  per_group_bounds: bool = True) -> list[dict]:
    """For each malignant-recall target, the joint rule fitted on every image and what it does per group (held-out
    hospital): the trade-off between cancers found and normal scans and benign lesions spared."""
    out = []
    for r in recalls:
        try:
            rule = fit_joint_rule(probs, lesion_scores, labels, classes, r, max_lesions_called_normal,
                                  groups=groups if per_group_bounds else None)
        except BusiError:
            continue
        figures = lesion_rule_figures(probs, lesion_scores, labels, classes, rule, groups)
        out.append({"target_recall": r, "threshold": rule["threshold"], "lesion_threshold": rule["lesion_threshold"],
                    "per_group": {g: {k: f["lesion_first"][k] for k in ("sensitivity", "specificity", "normal_recall",
                                                                         "lesions_called_normal", "accuracy")}
                                  for g, f in figures.items()}})
    return out


def rule_outcomes(predicted: torch.Tensor, y: torch.Tensor, m: int, b: int, n: int) -> dict:
    """Shares of hard decisions: cancers called malignant, benign lesions not, normal scans called normal (and called
    malignant), lesions called normal, and accuracy (n: -1 where there is no normal class)."""
    mal, ben, nor = y == m, y == b, y == n
    share = lambda hit, among: round(float(hit[among].float().mean()), 4) if among.any() else None  # noqa: E731
    return {"sensitivity": share(predicted == m, mal), "specificity": share(predicted != m, ben),
            "normal_recall": share(predicted == n, nor), "normal_called_malignant": share(predicted == m, nor),
            "lesions_called_normal": share(predicted == n, mal | ben), "accuracy": share(predicted == y, y >= 0)}


def outcome_intervals(called: torch.Tensor, y: torch.Tensor, m: int, b: int, n: int, clusters, n_boot: int = 1000,
                      seed: int = 0) -> dict:
    """95% percentile intervals of rule_outcomes' shares, from a bootstrap that resamples whole clusters (patients,
    duplicate groups); a share with no image to be measured on in any resample has none."""
    from .metrics import cluster_resamples
    boots = [rule_outcomes(called[pick], y[pick], m, b, n)
             for pick in map(torch.from_numpy, cluster_resamples(clusters, n_boot, seed))]
    return {k: [round(float(np.quantile(v, q)), 4) for q in (0.025, 0.975)]
            for k in boots[0] if (v := [f[k] for f in boots if f[k] is not None])} if boots else {}


def lesion_rule_figures(probs: torch.Tensor, lesion_scores: torch.Tensor, labels: torch.Tensor, classes, rule: dict,
                        groups=None, clusters=None, n_boot: int = 0, seed: int = 0) -> dict:
    """Per group (e.g. held-out source): what the lesion-first rule does, and the classifier's own sensitivity-first
    threshold (fitted on the same images for the same recall) beside it. With n_boot, the rule's figures get 95%
    intervals from a bootstrap over clusters (patients or duplicate groups; images when none are given)."""
    from sklearn.metrics import roc_auc_score
    classes = list(classes)
    m, b = classes.index(POSITIVE), classes.index("benign")
    n = classes.index("normal") if "normal" in classes else -1
    groups = np.asarray(groups if groups is not None else ["all"] * len(labels))
    unit = "clusters (patients, duplicate groups)" if clusters is not None else "images"
    clusters = np.asarray(clusters if clusters is not None else np.arange(len(labels))).astype(str)
    alone = fit_threshold(probs, labels, classes, rule["target_recall"])
    out = {}
    for name in sorted(set(groups.tolist())):
        idx = torch.from_numpy(np.flatnonzero(groups == name))
        p, s, y = probs[idx], lesion_scores[idx], labels[idx]
        called = decide(p, classes, rule, s)
        figures = {"lesion_first": rule_outcomes(called, y, m, b, n),
                   "classifier_alone": {**rule_outcomes(decide(p, classes, alone), y, m, b, n),
                                        "threshold": alone["threshold"]}}
        if n_boot:
            figures["lesion_first"]["ci"] = outcome_intervals(called, y, m, b, n, clusters[idx.numpy()], n_boot, seed)
            figures["lesion_first"]["ci_method"] = (f"95% percentile bootstrap ({n_boot} resamples) over "
                                                    f"{len(set(clusters[idx.numpy()]))} {unit}")
        lesion = (y == m) | (y == b)
        if (y[lesion] == m).any() and (y[lesion] == b).any():
            figures["malignant_vs_benign_auroc"] = round(float(roc_auc_score(
                (y[lesion] == m).numpy(), lesion_given(p[lesion], m, b).numpy())), 4)
        if (y == n).any():
            figures["normal_vs_lesion_auroc"] = {
                "lesion_score": round(float(roc_auc_score(lesion.numpy(), s.numpy())), 4),
                "classifier_p_normal": round(float(roc_auc_score((y == n).numpy(), p[:, n].numpy())), 4)}
        out[name] = {"images": int(len(idx)), **figures}
    return out


def basis(probs: torch.Tensor, lesion_score: float | None, classes, operating_point: dict | None, predicted: int
          ) -> dict:
    """The figure one image's decision rests on, against the threshold it was compared with: what a caption, a report
    or a table shows beside the decision so that the two never seem to disagree (a scan called 'malignant' at
    p(malignant) 24% under the lesion-first rule was judged on p(malignant | lesion), not on p(malignant))."""
    classes = list(classes)
    said = classes[predicted]
    if operating_point and operating_point.get("rule") == LESION_FIRST:
        t_l = operating_point["lesion_threshold"]
        if said == "normal":
            return {"figure": "lesion score", "value": round(float(lesion_score), 4), "threshold": t_l,
                    "text": f"normal: no lesion found (lesion score {lesion_score:.2f} < {t_l:.2f})"}
        m, b = classes.index(POSITIVE), classes.index("benign")
        q = float(lesion_given(probs[None], m, b)[0])
        t_m = operating_point["threshold"]
        sign = ">=" if said == POSITIVE else "<"
        found = ("lesion found" if lesion_score is None or lesion_score >= t_l else
                 f"judged as a lesion: unlike the images it trained on (lesion score {lesion_score:.2f})")
        return {"figure": "p(malignant | lesion)", "value": round(q, 4), "threshold": t_m,
                "text": f"{said}: {found}, p(malignant | lesion) {q:.0%} {sign} {t_m:.0%}"}
    if operating_point and operating_point.get("class") in classes:
        k = classes.index(operating_point["class"])
        t, p = operating_point["threshold"], float(probs[k])
        sign = ">=" if said == operating_point["class"] else "<"
        return {"figure": f"p({operating_point['class']})", "value": round(p, 4), "threshold": t,
                "text": f"{said}: p({operating_point['class']}) {p:.0%} {sign} {t:.0%}"}
    return {"figure": f"p({said})", "value": round(float(probs[predicted]), 4), "threshold": None,
            "text": f"{said}: p({said}) {float(probs[predicted]):.0%}, the most probable class"}


def describe(operating_point: dict | None, brief: bool = False) -> str:
    """The rule in words; brief (a lesion-first rule): what it decides, without how it was fitted."""
    if not operating_point:
        return "argmax (no operating point)"
    if operating_point.get("rule") == LESION_FIRST and "lesion_recall" in operating_point:  # last release's fit
        decides = (f"'normal' when no lesion is outlined (lesion score below {operating_point['lesion_threshold']:.3f}, "
                   f"set to find {operating_point['lesion_recall']:.0%} of {operating_point['fitted_on_lesions']} "
                   f"lesions); otherwise 'malignant' when p(malignant)/(p(malignant)+p(benign)) is at least "
                   f"{operating_point['threshold']:.3f} (set for {operating_point['target_recall']:.0%} recall on "
                   f"{operating_point['fitted_on_positives']} malignant images), else 'benign'")
        return decides if brief else f"{decides}; both on {operating_point.get('fitted_where', 'validation images')}"
    if operating_point.get("rule") == LESION_FIRST:
        familiar = (" and the scan looks like the images the model trained on (one flagged unlike them is judged as "
                    "a lesion)" if operating_point.get(FAMILIAR_ONLY) else "")
        decides = (f"'normal' when no lesion is found (lesion score below {operating_point['lesion_threshold']:.3f})"
                   f"{familiar}; otherwise 'malignant' when p(malignant)/(p(malignant)+p(benign)) is at least "
                   f"{operating_point['threshold']:.3f}, else 'benign'")
        if brief:
            return decides
        cap = operating_point.get("max_lesions_called_normal")
        return (f"{decides}. Both thresholds were fitted together on "
                f"{operating_point.get('fitted_where', 'validation images')}: at least "
                f"{operating_point['target_recall']:.0%} of {operating_point['fitted_on_positives']} malignant images "
                f"called malignant (a cancer with no lesion found counts as missed)"
                + (f", at most {cap:.0%} of the lesions called normal" if cap is not None and operating_point.get(
                    "fitted_jointly", True) else "")
                + ", and as many normal scans called normal and benign lesions benign as that allows")
    where = operating_point.get("fitted_where", "validation images")
    return (f"'{operating_point['class']}' whenever its probability is at least {operating_point['threshold']:.3f} "
            f"(set for {operating_point['target_recall']:.0%} recall on {operating_point['fitted_on']} {where}"
            + (f", {operating_point['fitted_on_positives']} of them malignant)" if "fitted_on_positives" in operating_point
               else ")"))


def metrics_at(probs: torch.Tensor, labels: torch.Tensor, classes, operating_point: dict,
               lesion_scores: torch.Tensor | None = None) -> dict:
    """Accuracy, per-class recall/precision and the confusion matrix of the operating point's decisions."""
    extra = {"lesion_threshold": operating_point["lesion_threshold"]} if "lesion_threshold" in operating_point else {}
    return {"threshold": operating_point["threshold"], "class": operating_point["class"], **extra,
            **decision_metrics(decide(probs, classes, operating_point, lesion_scores), labels, classes)}


def decision_metrics(predicted: torch.Tensor, labels: torch.Tensor, classes) -> dict:
    """Accuracy, per-class recall/precision and confusion matrix of hard decisions (rows: true class)."""
    k = len(classes)
    confusion = torch.bincount(labels * k + predicted, minlength=k * k).view(k, k)
    per_class = {}
    for i, c in enumerate(classes):
        called, actual = int(confusion[:, i].sum()), int(confusion[i].sum())
        per_class[c] = {"recall": round(int(confusion[i, i]) / actual, 6) if actual else None,
                        "precision": round(int(confusion[i, i]) / called, 6) if called else None}
    return {"accuracy": round(float((predicted == labels).float().mean()), 6) if len(labels) else None,
            "per_class": per_class, "confusion_matrix": confusion.tolist()}


def fit_with_ci(probs: torch.Tensor, labels: torch.Tensor, classes, target_recall: float, clusters=None,
                n_boot: int = 1000, seed: int = 0, where: str = "these images") -> dict:
    """fit_threshold on every image, and the recall that threshold can promise on new images of the same kind: the
    threshold refitted on bootstrap resamples of patients (or images), each judged on the malignant images its
    resample left out; their 2.5-97.5% range is the interval, their median the expected recall.

    Refuses (BusiError) with fewer than MIN_POSITIVES malignant images or patients."""
    if POSITIVE not in classes:
        raise BusiError(f"the model has no '{POSITIVE}' class to set a threshold for")
    k = list(classes).index(POSITIVE)
    given_clusters = clusters is not None  # patients: the interval resamples them, however many images each has
    clusters = np.asarray([str(c) for c in clusters] if given_clusters else np.arange(len(labels)).astype(str))
    positive = (labels == k).numpy()
    n_pos, n_pos_clusters = int(positive.sum()), len(set(clusters[positive].tolist()))
    if min(n_pos, n_pos_clusters) < MIN_POSITIVES:
        raise BusiError(f"{where}: {n_pos} malignant image(s) of {n_pos_clusters} patient(s): at least {MIN_POSITIVES} "
                        "are needed to set a threshold that promises a recall")
    point = fit_threshold(probs, labels, classes, target_recall)
    names, inverse = np.unique(clusters, return_inverse=True)
    rng = np.random.default_rng(seed)
    recalls = []
    for _ in range(n_boot):
        picked = rng.integers(0, len(names), len(names))
        inside = np.isin(inverse, picked)
        left_out = ~inside & positive
        bag = torch.from_numpy(np.concatenate([np.flatnonzero(inverse == g) for g in picked]))
        fitted = fit_threshold(probs[bag], labels[bag], classes, target_recall)
        if fitted is None or not left_out.any():
            continue
        recalls.append(float((probs[torch.from_numpy(left_out), k] >= fitted["threshold"]).float().mean()))
    negatives = labels != k
    unit = "patients" if given_clusters else "images"
    point.update({
        "fitted_on_patients": len(names) if given_clusters else None,
        "expected_recall": round(float(np.median(recalls)), 4) if recalls else None,
        "recall_ci": [round(float(np.quantile(recalls, 0.025)), 4), round(float(np.quantile(recalls, 0.975)), 4)]
        if recalls else None,
        "ci_method": f"threshold refitted on {len(recalls)} bootstrap resamples of "
                     f"{unit}, recall measured on the malignant images "
                     "each left out; 2.5-97.5% range",
        "others_called_malignant": round(float((probs[negatives, k] >= point["threshold"]).float().mean()), 4)
        if negatives.any() else None})
    return point
