"""busi split: a hospital's labelled folder cut into two parts by patient (adapt and test), stratified, reproducibly."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np

from .errors import BusiError
from .folders import scan
from .meta import check_columns, read_meta
from .split import group_ids, train_test

PARTS = ("adapt", "test")


def run_split(data: str | Path, out: str | Path, test_size: float = 0.5, seed: int = 0, meta: str | Path | None = None,
              id_column: str = "ID", patient_column: str | None = None, overwrite: bool = False,
              progress: bool = True) -> dict:
    """Copy data's images (and their masks) into out/adapt/<class>/ and out/test/<class>/: each patient's images on one
    side (with --patient-column; near-duplicate images are kept together too), each class in both parts in proportion,
    the same cut for the same seed. The meta CSV's rows follow their images (out/adapt.csv, out/test.csv); what was
    done is in out/split.json. Everything is checked before anything is written, and the parts appear only complete."""
    from .audit import audit
    if not 0 < test_size < 1:
        raise BusiError(f"--test-size must be between 0 and 1, got {test_size}")
    if patient_column and not meta:
        raise BusiError("--patient-column needs --meta FILE.csv")
    if meta:
        check_columns(meta, [id_column, patient_column])
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise BusiError(f"{out}: already holds files; pass --overwrite or another --out")
    dataset = scan(data)
    paths = [s.path for s in dataset.samples]
    rows = {}
    if meta:
        rows, notes = read_meta(meta, id_column, [patient_column] if patient_column else [], paths)
        missing = [p for p in paths if p not in rows]
        if patient_column and missing:
            raise BusiError(f"{meta}: {len(missing)} image(s) have no row, so their patient is unknown (first: "
                            f"{missing[0]}); add them or leave --patient-column out")
    patients = {}
    if patient_column:
        for p in paths:
            patients.setdefault(rows[p][patient_column], []).append(p)
    report = audit(dataset, progress=progress)
    together = group_ids(paths, report["duplicate_groups"], list(patients.values()))
    labels = np.array([s.label for s in dataset.samples])
    adapt_idx, test_idx = train_test(labels, together, test_size, seed)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for part, idx in zip(PARTS, (adapt_idx, test_idx)):
        for i in idx:
            sample = dataset.samples[i]
            for file in [sample.path, *sample.mask_paths]:
                target = tmp / part / file
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(dataset.file(file), target)
        for cls in dataset.classes:  # a class with no image on this side still gets its folder, said in split.json
            (tmp / part / cls).mkdir(parents=True, exist_ok=True)
    if meta:
        with open(meta, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header, all_rows = reader.fieldnames, list(reader)
        stems = {Path(p).stem: part for part, idx in zip(PARTS, (adapt_idx, test_idx)) for p in (paths[i] for i in idx)}
        for part in PARTS:
            with open(tmp / f"{part}.csv", "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=header)
                w.writeheader()
                w.writerows(r for r in all_rows if stems.get(r[id_column].strip()) == part)
    summary = {"data": str(Path(data).resolve()), "test_size": test_size, "seed": seed,
               "grouped_by": ("patients (" + patient_column + ") and near-duplicate images" if patient_column
                              else "near-duplicate images (no --patient-column: patients unknown)"),
               "skipped": dataset.skipped,
               **{part: {"images": int(len(idx)),
                         "patients": len({rows[paths[i]][patient_column] for i in idx}) if patient_column else None,
                         "classes": {c: int((labels[idx] == k).sum()) for k, c in enumerate(dataset.classes)}}
                  for part, idx in zip(PARTS, (adapt_idx, test_idx))}}
    (tmp / "split.json").write_text(json.dumps(summary, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return summary
