"""Train/test splits and k folds, stratified by class (and source) and grouped so near-duplicates never straddle a split."""
from __future__ import annotations

import math
import sys

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from .errors import BusiError


def group_ids(paths: list[str], *groupings: list[list[str]]) -> np.ndarray:
    """One integer per image, shared by images that must stay on one side of a split: members of one duplicate group
    or one patient (groupings may overlap: a patient's scan copied into another patient's group joins both)."""
    index = {p: i for i, p in enumerate(paths)}
    parent = np.arange(len(paths))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i
    for groups in groupings:
        for g in groups:
            members = [index[p] for p in g if p in index]
            for m in members[1:]:
                a, b = root(members[0]), root(m)
                parent[max(a, b)] = min(a, b)
    return np.array([root(i) for i in range(len(paths))])


def _max_folds(labels: np.ndarray, groups: np.ndarray) -> int:
    return min(len(np.unique(groups[labels == c])) for c in np.unique(labels))


def strata(labels, groups, sources, n_folds: int) -> np.ndarray:
    """What to stratify by: source and class together when every source's class has a group for each of n_folds
    (so every source lands on both sides), else class alone (a small source then falls where the groups allow)."""
    labels = np.asarray(labels)
    if sources is None or len(set(sources)) < 2:
        return labels
    source_ids = np.unique(np.asarray(sources, dtype=str), return_inverse=True)[1]
    both = source_ids * (int(labels.max()) + 1) + labels
    return both if _max_folds(both, np.asarray(groups)) >= n_folds else labels


def kfold(labels, groups, n_folds: int, seed: int, grouped: bool = True, sources=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs; every image is in exactly one test fold."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    if not grouped:
        groups = np.arange(len(labels))
    limit = _max_folds(labels, groups)
    if n_folds > limit:
        kind = "duplicate groups" if grouped else "images"
        raise BusiError(f"{n_folds} folds asked for, but the smallest class has only {limit} {kind}: use --folds {limit} or fewer")
    by = strata(labels, groups, sources, n_folds)
    if grouped:
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        return [(tr, te) for tr, te in splitter.split(np.zeros(len(labels)), by, groups)]
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in splitter.split(np.zeros(len(labels)), by)]


def train_test(labels, groups, test_size: float, seed: int, grouped: bool = True, sources=None, class_names=None,
               part: str = "test part") -> tuple[np.ndarray, np.ndarray]:
    """A stratified (grouped) split with about test_size of the images in the test part.

    StratifiedGroupKFold only makes equal folds, so we cut into n folds and take round(test_size * n)
    of them as the test part: 20 folds give 5% steps, and fewer folds are used on tiny datasets.
    With several sources, source and class are stratified together when each has groups enough for the
    coarsest split that still approximates test_size.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    if not grouped:
        groups = np.arange(len(labels))
    n_folds = min(20, _max_folds(labels, groups))
    if n_folds < 2:
        raise BusiError("too few images (or duplicate groups) per class to make a train/test split")
    coarsest = min(n_folds, max(2, math.ceil(1 / min(test_size, 1 - test_size))))
    by = strata(labels, groups, sources, coarsest)
    if by is not labels:
        n_folds = min(20, _max_folds(by, groups))
    k = min(n_folds - 1, max(1, round(test_size * n_folds)))
    folds = kfold(labels, groups, n_folds, seed, grouped, sources if by is not labels else None)
    test = np.sort(np.concatenate([te for _, te in folds[:k]]))
    train = np.setdiff1d(np.arange(len(labels)), test)
    if len(test) >= (2 * test_size + 0.1) * len(labels):  # a class too small to cut finely: 20% became 50%, unsaid
        counts = {c: len(np.unique(groups[labels == c])) for c in np.unique(labels)}
        small = min(counts, key=counts.get)
        name = class_names[small] if class_names is not None else f"class {small}"
        print(f"busi: warning: '{name}' has {counts[small]} image(s) (or patient and duplicate groups): too few to "
              f"keep {test_size:.0%} aside as the {part} stratified by class, so it holds {len(test)} of "
              f"{len(labels)} images ({len(test) / len(labels):.0%}); add images of '{name}', leave its folder out, "
              "or keep no part aside (size 0)", file=sys.stderr)
    return train, test


def source_folds(sources, labels, groups, classes) -> list[tuple[np.ndarray, np.ndarray]]:
    """Hospital-out folds: each source in turn is the test part, the others train (a source never seen in training).

    Images of the training sources that share a near-duplicate group with the held-out source are left out of that
    fold's training part, so a copy of a test scan filed under another source cannot leak into training.
    """
    sources, labels, groups = np.asarray(sources, dtype=str), np.asarray(labels), np.asarray(groups)
    names = sorted(set(sources.tolist()))
    if len(names) < 2:
        raise BusiError("--split source holds out one whole source at a time: it needs two or more --data folders "
                        f"(got one: {names[0] if names else 'none'})")
    folds = []
    for name in names:
        test = np.flatnonzero(sources == name)
        train = np.flatnonzero((sources != name) & ~np.isin(groups, groups[test]))
        shared = set(labels[test].tolist()) & set(labels[train].tolist())
        if not shared:
            held = ", ".join(classes[c] for c in sorted(set(labels[test].tolist())))
            raise BusiError(f"--split source: source {name} holds only {held}, which no other source has: a model "
                            "trained on the others could not be judged on it")
        folds.append((train, test))
    return folds
