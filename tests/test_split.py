import numpy as np
import pytest

from busi.errors import BusiError
from busi.split import group_ids, kfold, train_test


def _toy(n=300, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.choice(3, size=n, p=[0.55, 0.3, 0.15])
    groups = np.arange(n)
    for start in range(0, n - 4, 7):  # chains of near-duplicates sharing a label, as in BUSI
        groups[start:start + 3] = start
        labels[start:start + 3] = labels[start]
    return labels, groups


def test_group_ids():
    ids = group_ids(["a", "b", "c", "d"], [["b", "d"], ["x", "c"]])
    assert ids[1] == ids[3] and len(set(ids.tolist())) == 3


def test_train_test_keeps_groups_on_one_side_and_stratifies():
    labels, groups = _toy()
    train, test = train_test(labels, groups, 0.3, seed=1)
    assert set(groups[train]).isdisjoint(groups[test])
    assert len(set(train) | set(test)) == len(labels) and not set(train) & set(test)
    assert abs(len(test) / len(labels) - 0.3) < 0.05
    for c in range(3):
        assert abs((labels[test] == c).mean() - (labels == c).mean()) < 0.06
    again = train_test(labels, groups, 0.3, seed=1)
    assert np.array_equal(again[1], test)
    assert not np.array_equal(train_test(labels, groups, 0.3, seed=2)[1], test)


def test_kfold_every_image_out_of_fold_once_and_groups_intact():
    labels, groups = _toy()
    folds = kfold(labels, groups, 5, seed=0)
    seen = np.concatenate([te for _, te in folds])
    assert sorted(seen.tolist()) == list(range(len(labels)))
    for tr, te in folds:
        assert set(groups[tr]).isdisjoint(groups[te])


def test_too_many_folds_is_a_clear_error():
    labels, groups = _toy(40)
    with pytest.raises(BusiError, match="folds asked for, but the smallest class has only"):
        kfold(labels, groups, 30, seed=0)


@pytest.mark.parametrize("small", [False, True])
def test_several_sources_each_land_on_both_sides(small):
    """A big source (BUSI-like) pooled with a small one that holds two classes (another hospital's benign/malignant)."""
    labels, groups = _toy(300)
    rng = np.random.default_rng(1)
    n_b = 12 if small else 80
    labels_b = rng.choice(2, size=n_b)
    labels = np.concatenate([labels, labels_b])
    groups = np.concatenate([groups, 1000 + np.arange(n_b)])
    sources = np.array(["busi"] * 300 + ["hospital"] * n_b)
    train, test = train_test(labels, groups, 0.3, seed=0, sources=sources)
    assert set(groups[train]).isdisjoint(groups[test])
    for name in ("busi", "hospital"):
        share = (sources[test] == name).sum() / (sources == name).sum()
        assert 0.1 < share < 0.5, (name, share)
    folds = kfold(labels, groups, 3, seed=0, sources=sources)
    for tr, te in folds:
        assert set(groups[tr]).isdisjoint(groups[te])
        assert {"busi", "hospital"} <= set(sources[te]) and {"busi", "hospital"} <= set(sources[tr])
    if not small:  # stratified by source and class: each fold holds its share of the hospital's malignant images
        for _, te in folds:
            n = ((sources[te] == "hospital") & (labels[te] == 1)).sum()
            assert abs(n - (labels_b == 1).sum() / 3) <= 2


def test_group_ids_merge_overlapping_groupings():
    # duplicates b~d, patient P holds d and e: b, d and e must stay together
    ids = group_ids(["a", "b", "c", "d", "e"], [["b", "d"]], [["d", "e"], ["a"]])
    assert ids[1] == ids[3] == ids[4] and len(set(ids.tolist())) == 3


def test_source_folds_hold_out_each_source_and_keep_cross_source_copies_out_of_training():
    from busi.split import source_folds
    sources = np.array(["a"] * 6 + ["b"] * 4)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 0, 1])
    groups = np.arange(10)
    groups[7] = groups[1]  # b's image 7 is a copy of a's image 1
    folds = source_folds(sources, labels, groups, ["benign", "malignant", "normal"])
    (train_a, test_a), (train_b, test_b) = folds
    assert set(test_a) == set(range(6)) and set(train_a) == {6, 8, 9}  # the copy of a test image does not train
    assert set(test_b) == set(range(6, 10)) and 1 not in train_b and set(train_b) == {0, 2, 3, 4, 5}


def test_source_folds_refuse_one_source_and_a_source_nobody_can_judge():
    from busi.split import source_folds
    with pytest.raises(BusiError, match="needs two or more --data folders"):
        source_folds(["a"] * 4, [0, 1, 0, 1], np.arange(4), ["benign", "malignant"])
    with pytest.raises(BusiError, match="source a holds only benign, malignant, which no other source has"):
        source_folds(["a"] * 4 + ["b"] * 2, [0, 1, 0, 1, 2, 2], np.arange(6), ["benign", "malignant", "normal"])


def test_a_class_too_small_to_keep_a_fifth_aside_is_named(capsys):
    """128 images whose 'normal' class holds 2: a stratified 20% part is half the folder (finetune once did it
    silently)."""
    labels = np.array([0] * 63 + [1] * 63 + [2] * 2)
    train, test = train_test(labels, np.arange(128), 0.2, 0, class_names=["benign", "malignant", "normal"],
                             part="validation part")
    assert len(test) == 64
    assert "'normal' has 2 image(s)" in capsys.readouterr().err
    train, test = train_test(np.array([0] * 64 + [1] * 64), np.arange(128), 0.2, 0)
    assert 0.15 <= len(test) / 128 <= 0.25 and not capsys.readouterr().err  # enough of every class: no warning
