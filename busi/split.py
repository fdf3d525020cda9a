"""Train/test splits and k folds, stratified by class and grouped so near-duplicates never straddle a split."""
from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from .errors import BusiError


def group_ids(paths: list[str], duplicate_groups: list[list[str]]) -> np.ndarray:
    """One integer per image: shared by the members of a duplicate group, unique otherwise."""
    index = {p: i for i, p in enumerate(paths)}
    ids = np.arange(len(paths))
    for g in duplicate_groups:
        members = [index[p] for p in g if p in index]
        ids[members] = min(members, default=0)
    return ids


def _max_folds(labels: np.ndarray, groups: np.ndarray) -> int:
    return min(len(np.unique(groups[labels == c])) for c in np.unique(labels))


def kfold(labels, groups, n_folds: int, seed: int, grouped: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train, test) index pairs; every image is in exactly one test fold."""
    labels, groups = np.asarray(labels), np.asarray(groups)
    limit = _max_folds(labels, groups if grouped else np.arange(len(labels)))
    if n_folds > limit:
        kind = "duplicate groups" if grouped else "images"
        raise BusiError(f"{n_folds} folds asked for, but the smallest class has only {limit} {kind}: use --folds {limit} or fewer")
    if grouped:
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        return [(tr, te) for tr, te in splitter.split(np.zeros(len(labels)), labels, groups)]
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in splitter.split(np.zeros(len(labels)), labels)]


def train_test(labels, groups, test_size: float, seed: int, grouped: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """A stratified (grouped) split with about test_size of the images in the test part.

    StratifiedGroupKFold only makes equal folds, so we cut into n folds and take round(test_size * n)
    of them as the test part: 20 folds give 5% steps, and fewer folds are used on tiny datasets.
    """
    labels, groups = np.asarray(labels), np.asarray(groups)
    n_folds = min(20, _max_folds(labels, groups if grouped else np.arange(len(labels))))
    if n_folds < 2:
        raise BusiError("too few images (or duplicate groups) per class to make a train/test split")
    k = min(n_folds - 1, max(1, round(test_size * n_folds)))
    folds = kfold(labels, groups, n_folds, seed, grouped)
    test = np.sort(np.concatenate([te for _, te in folds[:k]]))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test
