"""Per-image facts from CSV files (patient, scanner): matched to images by file name, for one folder or pooled sources."""
from __future__ import annotations

import csv
from pathlib import Path

from .errors import BusiError


def resolve(spec: str, header: list[str]) -> str | None:
    """The column a spec names in this header. A spec may list alternatives, "Case,Patient": each CSV uses the first of
    them it has, so sources whose CSVs call the patient differently (BUS-BRA's Case, BUS-UCLM's Patient) pool with one
    --patient-column."""
    return next((c for c in (n.strip() for n in spec.split(",")) if c in header), None)


def _missing(columns, header: list[str]) -> list[str]:
    return [c for c in columns if c and resolve(c, header) is None]


def check_columns(path: str | Path, columns: list[str | None]) -> None:
    """The CSV exists and has every named column (None: not asked for; "A,B": either); else one line naming what it
    does have. Cheap: only the header is read, so a wrong column fails before any model or image is loaded."""
    path = Path(path)
    if not path.is_file():
        raise BusiError(f"{path}: meta CSV does not exist")
    with open(path, newline="", encoding="utf-8-sig") as f:
        header = next(csv.reader(f), [])
    if missing := _missing(columns, header):
        raise BusiError(f"{path}: no column(s) {', '.join(missing)} (it has: {', '.join(header) or 'no header'})")


def read_meta(path: str | Path, id_column: str, columns: list[str], image_paths: list[str]) -> tuple[dict, list[str]]:
    """{image path: {column: value}} for the images of the folder, matched by file stem; and warnings. A column may
    list alternatives ("Case,Patient", see resolve): the value is kept under the name as given.

    Images without a row keep their place in every pooled figure (group 'unknown'); rows naming images that are
    not in the folder are counted, never silently dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise BusiError(f"{path}: meta CSV does not exist")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if missing := _missing([id_column, *columns], header):
            raise BusiError(f"{path}: no column(s) {', '.join(missing)} (it has: {', '.join(header) or 'no header'})")
        named = {c: resolve(c, header) for c in columns}
        id_column = resolve(id_column, header)
        rows = {}
        for row in reader:
            key = (row[id_column] or "").strip()
            values = {c: (row[col] or "").strip() for c, col in named.items()}
            if key in rows and rows[key] != values:
                raise BusiError(f"{path}: '{key}' appears twice with different values")
            rows[key] = values
    stems = {Path(p).stem: p for p in image_paths}
    if len(stems) < len(image_paths):
        raise BusiError(f"{path}: two images of the folder share a file name, so '{id_column}' cannot tell them apart")
    meta = {stems[k]: v for k, v in rows.items() if k in stems}
    if rows and not meta:
        raise BusiError(f"{path}: none of its {len(rows)} row(s) names an image of the folder (its column "
                        f"'{id_column}' is matched to file names without extension, e.g. '{next(iter(stems), '')}')")
    notes = []
    if len(rows) > len(meta):
        notes.append(f"{path}: {len(rows) - len(meta)} row(s) name images that are not in the folder")
    if len(meta) < len(image_paths):
        notes.append(f"{path}: {len(image_paths) - len(meta)} image(s) have no row (grouped as 'unknown')")
    return meta, notes


def source_meta(paths: list[str], sources: list[str], files: list[str], id_column: str, columns: list[str]
                ) -> tuple[dict[str, dict[str, str]], list[str]]:
    """{image path: {column: value}} over pooled sources: each CSV describes the one source whose images it names
    most (BUS-BRA's bus_data.csv names 'bus_0001-l', BUSI's files 'benign (1)'); and warnings.

    paths and sources: every image and its source name (one folder: one name for all)."""
    out, notes = {}, []
    for file in files:
        by_source: dict[str, list[str]] = {}
        for p, s in zip(paths, sources):
            by_source.setdefault(s, []).append(p)
        matched, errors = {}, []
        for s, ps in by_source.items():
            try:
                matched[s] = read_meta(file, id_column, columns, ps)
            except BusiError as e:  # a bad column is everyone's error; a name clash only matters where it matches
                errors.append(e)
        best = max(matched, key=lambda s: len(matched[s][0]), default=None)
        if best is None or not matched[best][0]:
            if errors:
                raise errors[0]
            raise BusiError(f"{file}: its column '{id_column}' names none of the images (matched by file name without "
                            "extension)")
        rows, lines = matched[best]
        if len(by_source) > 1:
            notes.append(f"{file}: describes source {best} ({len(rows)} images)")
        notes += lines
        out.update(rows)
    return out, notes
