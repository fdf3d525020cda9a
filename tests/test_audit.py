import json
import shutil

from PIL import Image

from busi.audit import audit, summary
from busi.data import scan
from conftest import copy_busi

# Identical scans filed under two classes in busi_dev (found by `busi audit`, checked by eye).
KNOWN_CONFLICTS = [
    ("benign/benign (269).png", "normal/normal (1).png"),
    ("benign/benign (399).png", "malignant/malignant (93).png"),
    ("benign/benign (406).png", "malignant/malignant (94).png"),
    ("benign/benign (433).png", "malignant/malignant (145).png"),
    ("benign/benign (437).png", "normal/normal (34).png"),
    ("benign/benign (131).png", "malignant/malignant (51).png"),
]


def test_copies_resizes_and_crops_are_grouped_and_conflicts_found(tmp_path):
    unrelated = {"benign": [f"benign ({i}).png" for i in (1, 2, 3, 4)], "malignant": ["malignant (1).png", "malignant (2).png"],
                 "normal": ["normal (2).png", "normal (3).png"]}
    root = copy_busi(tmp_path / "d", unrelated)
    src = Image.open(root / "benign" / "benign (1).png")
    src.save(root / "malignant" / "malignant (900).png")  # identical copy under another class
    src.resize((src.width // 2, src.height // 2)).save(root / "benign" / "benign (901).png")  # resized copy
    w, h = src.size
    src.crop((w // 8, h // 10, w - w // 6, h - h // 8)).resize((w, h)).save(root / "benign" / "benign (902).png")  # zoom
    result = audit(scan(root), progress=False)
    groups = [set(g) for g in result["duplicate_groups"]]
    assert {"benign/benign (1).png", "malignant/malignant (900).png", "benign/benign (901).png",
            "benign/benign (902).png"} in groups
    assert len(groups) == 1  # the other eight real scans stay apart
    assert [set(g) for g in result["label_conflicts"]] == groups
    assert result["classes"] == {"benign": 6, "malignant": 3, "normal": 2}
    assert "label conflicts: 1" in summary(result)


def test_audit_finds_busi_dev_label_conflicts(tmp_path):
    names: dict[str, list[str]] = {}
    for pair in KNOWN_CONFLICTS:
        for rel in pair:
            cls, name = rel.split("/")
            names.setdefault(cls, []).append(name)
    for i in range(5, 11):  # bystanders that must not be pulled into any group
        names["benign"].append(f"benign ({i}).png")
        names["normal"].append(f"normal ({i + 10}).png")
    result = audit(scan(copy_busi(tmp_path / "d", names)), progress=False)
    conflicts = [set(g) for g in result["label_conflicts"]]
    for a, b in KNOWN_CONFLICTS:
        assert any({a, b} <= g for g in conflicts), (a, b)
    assert len(result["duplicate_groups"]) == len(KNOWN_CONFLICTS)


def test_audit_is_cached_by_content(kaggle_folder, tmp_path):
    first = audit(scan(kaggle_folder), progress=False)
    cached = list((tmp_path / "cache" / "audit").glob("*.json"))
    assert len(cached) == 1
    assert audit(scan(kaggle_folder), progress=False) == first
    # a changed file changes the key, so a stale result is never reused
    shutil.copy(kaggle_folder / "benign" / "benign (1).png", kaggle_folder / "benign" / "benign (2).png")
    second = audit(scan(kaggle_folder), progress=False)
    assert len(list((tmp_path / "cache" / "audit").glob("*.json"))) == 2
    assert ["benign/benign (1).png", "benign/benign (2).png"] in second["duplicate_groups"]
    json.dumps(second)


def test_unreadable_image_is_skipped_with_reason(kaggle_folder):
    (kaggle_folder / "normal" / "normal (3).png").write_bytes(b"junk")
    result = audit(scan(kaggle_folder), progress=False)
    assert "not a readable image" in result["skipped"]["normal/normal (3).png"]
    assert result["classes"]["normal"] == 7
