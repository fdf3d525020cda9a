"""Results as DICOM for the hospital's viewer: per source image a Structured Report (TID 1500 measurement report: the
class probabilities, the decision and its rule, the model, the shift flag, the lesion outline and its size) and, where
a lesion was outlined, a Segmentation of it; both filed in the source's study by its UIDs, their own UIDs derived
from the source and the model so that writing them again makes the same objects (a PACS keeps them once)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from . import __version__
from .errors import BusiError

MANUFACTURER = "busi (open source)"
# Standard codes only (SNOMED CT, DICOM's DCM, UCUM): a viewer, a registry or the standard's validator reads every
# concept without a private dictionary. Coded: the decision (a Finding with the class's SNOMED code), the probability
# of cancer, a loop's frames scored, the lesion's size and probability. What no standard code says without ambiguity
# (every class's probability, the rule, the figure the decision rests on, a loop's frames per class, the shift flag)
# is said in words, as the algorithm's parameters, in a form said_in reads back.
CLASS_CODES = {"normal": ("17621005", "SCT", "Normal"), "benign": ("30807003", "SCT", "Benign"),
               "malignant": ("21594007", "SCT", "Malignant")}
STANDARD = {"decision": ("121071", "DCM", "Finding"), "p_malignant": ("111047", "DCM", "Probability of cancer"),
            "probability": ("122157", "DCM", "Probability"), "frames": ("121140", "DCM", "Number of Frames"),
            "breast-us": ("47079000", "SCT", "Ultrasonography of breast"), "width": ("103355008", "SCT", "Width"),
            "depth": ("131197000", "SCT", "Depth"), "area": ("42798000", "SCT", "Area")}
DECIDED_ON, PROBABILITIES, FRAMES_CALLED, UNLIKE = ("decided on: ", "probabilities: ", "frames called: ",
                                                    "unlike the model's training images: ")


def _code(value: str):
    """The standard code of one of busi's concepts (STANDARD) or classes (CLASS_CODES)."""
    from highdicom.sr import CodedConcept
    code, scheme, name = STANDARD.get(value) or CLASS_CODES[value]
    return CodedConcept(value=code, scheme_designator=scheme, meaning=name)


def model_key(path: str | Path) -> str:
    """What distinguishes one model's results from another's: the checkpoint's content, hashed."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:32]


def uid(*parts: str) -> str:
    """A UID determined by its parts (2.25 form): the same source, kind and model always give the same object."""
    from pydicom.uid import generate_uid
    return generate_uid(prefix="2.25.", entropy_srcs=[str(p) for p in parts])  # prefix None would ignore the parts


def result_uids(study: str, image: str, model: str) -> dict[str, str]:
    """The SOP Instance and Series UIDs busi's SR and SEG of an image (its Study and SOP Instance UIDs) get with this
    model: known before the image is fetched, so a rerun can skip what is stored."""
    return {"sr": uid(image, "sr", model), "seg": uid(image, "seg", model),
            "sr_series": uid(study, "sr-series", model), "seg_series": uid(study, "seg-series", model)}


def lesion_mask(row: dict, rows: int, columns: int) -> np.ndarray | None:
    """The outlined lesion of a prediction row as a rows x columns boolean mask of the source frame (None: none)."""
    import cv2
    polygon = (row.get("lesion") or {}).get("polygon")
    if not polygon:
        return None
    mask = np.zeros((rows, columns), np.uint8)
    cv2.fillPoly(mask, [np.asarray(polygon, np.int32)], 1)
    return mask.astype(bool) if mask.any() else None


def segmentation(source, mask: np.ndarray, uids: dict, model_name: str, frame: int | None = None):
    """A binary DICOM Segmentation of the lesion on source (its frame, for a cine loop), referencing it."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    algorithm = hd.AlgorithmIdentificationSequence(name=f"busi {model_name}", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    lesion = hd.seg.SegmentDescription(
        segment_number=1, segment_label="lesion (busi)",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm)
    frames = int(getattr(source, "NumberOfFrames", 1) or 1)
    pixel_array = mask[None]
    if frames > 1:  # a loop: one segmentation frame per source frame, the outlined one alone not empty
        pixel_array = np.zeros((frames, *mask.shape), bool)
        pixel_array[frame or 0] = mask
    seg = hd.seg.Segmentation(
        source_images=[source], pixel_array=pixel_array, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[lesion], series_instance_uid=uids["seg_series"], series_number=9701,
        sop_instance_uid=uids["seg"], instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name=model_name[:64], software_versions=__version__, device_serial_number="0",
        series_description="busi lesion outline")
    if "ImageOrientationPatient" not in seg:  # General Image: type 2C where no patient orientation is given, as in US
        seg.PatientOrientation = source.get("PatientOrientation", "")
    return seg


def parameters(row: dict, rule: str) -> list[str]:
    """What the report says in words, as the algorithm's parameters (DCM 111002): the rule; the figure the decision
    rests on against its threshold (before the probabilities, so that a reader sees why a scan is 'malignant' rather
    than only its class probabilities); every class's probability; a loop's frames per class; the shift flag."""
    said = [rule[:10240]]
    basis = row.get("basis")
    if basis:
        said.append(f"{DECIDED_ON}{basis['figure']} = {float(basis['value'])!r}"
                    + (f", threshold {float(basis['threshold'])!r}" if basis.get("threshold") is not None else "")
                    + f" ({basis['text']})")
    said.append(PROBABILITIES + ", ".join(f"{c} {float(p)!r}" for c, p in row["probabilities"].items()))
    if "frames" in row:
        said.append(FRAMES_CALLED + ", ".join(f"{c} {n}" for c, n in (row.get("frames_said") or {}).items()))
    if "outside_training" in row:
        said.append(UNLIKE + ("yes" if row["outside_training"] else "no"))
    return said


def structured_report(source, row: dict, uids: dict, model_name: str, rule: str, seg=None, frame: int | None = None):
    """A TID 1500 measurement report of one prediction row on source: an image group with the decision (a Finding),
    the probability of cancer and, for a loop, the frames scored; a group per class with its probability (and the
    loop's frames called that class); a region group with the outline, its size in millimetres (or pixels) and the
    lesion's probability, where a lesion was outlined. The rule, the basis and the shift flag: the parameters."""
    from highdicom.sr import (AlgorithmIdentification, CodedConcept, Comprehensive3DSR, DeviceObserverIdentifyingAttributes,
                              GraphicTypeValues, ImageRegion, Measurement, MeasurementReport,
                              MeasurementsAndQualitativeEvaluations, ObservationContext, ObserverContext,
                              PlanarROIMeasurementsAndQualitativeEvaluations, QualitativeEvaluation,
                              SourceImageForMeasurementGroup, SourceImageForRegion, TrackingIdentifier)
    from pydicom.sr.codedict import codes
    algorithm = AlgorithmIdentification(name=f"busi {model_name}", version=__version__, parameters=parameters(row, rule))
    frames = [frame + 1] if frame is not None and int(getattr(source, "NumberOfFrames", 1) or 1) > 1 else None
    unitless = CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")

    def number(concept: str, value, unit=unitless) -> Measurement:
        return Measurement(name=_code(concept), value=float(value), unit=unit)

    probabilities = row["probabilities"]
    groups = [MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=uid(uids["sr"], "image"), identifier="busi classification"),
        source_images=[SourceImageForMeasurementGroup.from_source_image(source, referenced_frame_numbers=frames)],
        algorithm_id=algorithm,
        measurements=[*([number("p_malignant", probabilities["malignant"])] if "malignant" in probabilities else []),
                      *([number("frames", row["frames"])] if "frames" in row else [])],
        qualitative_evaluations=[QualitativeEvaluation(_code("decision"), _code(row["predicted"]))])]
    lesion = row.get("lesion") or {}
    if lesion.get("polygon"):
        points = np.asarray(lesion["polygon"] + lesion["polygon"][:1], dtype=float)  # closed: ends where it began
        mm = "width_mm" in lesion
        unit = codes.UCUM.Millimeter if mm else CodedConcept(value="{pixels}", scheme_designator="UCUM", meaning="pixels")
        area_unit = codes.UCUM.SquareMillimeter if mm else CodedConcept(value="{pixels}", scheme_designator="UCUM",
                                                                         meaning="pixels")
        sizes = [("width", lesion["width_mm" if mm else "width_px"], unit),
                 ("depth", lesion["depth_mm" if mm else "depth_px"], unit),
                 ("area", lesion["area_mm2" if mm else "area_px"], area_unit),
                 ("probability", lesion["score"], unitless)]  # the lesion score: the outline's peak probability
        groups.append(PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=uid(uids["sr"], "lesion"), identifier="busi lesion"),
            referenced_region=ImageRegion(graphic_type=GraphicTypeValues.POLYLINE, graphic_data=points,
                                          source_image=SourceImageForRegion.from_source_image(
                                              source, referenced_frame_numbers=frames)),
            finding_type=codes.SCT.Lesion, algorithm_id=algorithm,
            measurements=[number(key, value, u) for key, value, u in sizes]))
    observer = ObserverContext(observer_type=codes.DCM.Device,
                               observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                                   uid=uid(uids["sr_series"], "device"), name=f"busi {model_name}"[:64],
                                   manufacturer_name=MANUFACTURER))
    report = MeasurementReport(observation_context=ObservationContext(observer_device_context=observer),
                               procedure_reported=_code("breast-us"), imaging_measurements=groups)
    return Comprehensive3DSR(
        evidence=[source, *([seg] if seg is not None else [])], content=report, series_instance_uid=uids["sr_series"],
        series_number=9702, sop_instance_uid=uids["sr"], instance_number=1, manufacturer=MANUFACTURER,
        series_description="busi classification", is_complete=True, is_final=False, is_verified=False)


def _items(dataset):
    """Every content item of an SR, depth first."""
    for item in getattr(dataset, "ContentSequence", []):
        yield item
        yield from _items(item)


def said_in(sr) -> dict:
    """What a busi SR (a highdicom Comprehensive3DSR read back) says: {"decision", "probabilities": {class: p},
    "measured": {what: value}} with the decision's basis ("decided on: FIGURE", "threshold of FIGURE"), a loop's
    "frames scored", "frames called CLASS" and "answering frame (from 1)", the shift flag and the "lesion score"."""
    import re
    group = sr.content.get_image_measurement_groups()[0]
    code_of = {tuple(v[:2]): k for k, v in CLASS_CODES.items()}
    decision = next(item.ConceptCodeSequence[0] for item in group[0].ContentSequence if item.ValueType == "CODE"
                    and (item.ConceptNameCodeSequence[0].CodeValue,
                         item.ConceptNameCodeSequence[0].CodingSchemeDesignator) == STANDARD["decision"][:2])
    probabilities, measured = {}, {}
    for m in group.get_measurements():
        if (m.name.value, m.name.scheme_designator) == STANDARD["frames"][:2]:
            measured["frames scored"] = float(m.value)
            referenced = group.source_images[0].referenced_frame_numbers
            if referenced:
                measured["answering frame (from 1)"] = float(referenced[0])
    texts = {item.TextValue for item in _items(group[0]) if item.ValueType == "TEXT"}
    for text in texts:
        said = re.match(rf"{DECIDED_ON}(.+?) = ([-+0-9.eE]+)(?:, threshold ([-+0-9.eE]+))?", text)
        if said:
            measured[f"decided on: {said[1]}"] = float(said[2])
            if said[3]:
                measured[f"threshold of {said[1]}"] = float(said[3])
        elif text.startswith(PROBABILITIES):
            probabilities = {c: float(p) for c, p in (x.rsplit(" ", 1) for x in text[len(PROBABILITIES):].split(", "))}
        elif text.startswith(FRAMES_CALLED) and text != FRAMES_CALLED:
            measured.update({f"frames called {c}": float(n) for c, n in (x.rsplit(" ", 1) for x in
                                                                        text[len(FRAMES_CALLED):].split(", "))})
        elif text.startswith(UNLIKE):
            measured["unlike training images"] = float(text.endswith("yes"))
    for region in sr.content.get_planar_roi_measurement_groups():
        for m in region.get_measurements():
            if (m.name.value, m.name.scheme_designator) == STANDARD["probability"][:2]:
                measured["lesion score"] = float(m.value)
    return {"decision": code_of[(decision.CodeValue, decision.CodingSchemeDesignator)], "probabilities": probabilities,
            "measured": measured}


def results_for(source, row: dict, model: str, model_name: str, rule: str, frame: int | None = None) -> list:
    """[SEG (where a lesion was outlined), SR] of one prediction row on a source dataset: the SEG first, as the SR
    cites it."""
    for needed in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if needed not in source:
            raise BusiError(f"{getattr(source, 'filename', 'a DICOM image')}: no {needed}; results cannot be filed "
                            "with its study")
    source = _with_type2(source)
    uids = result_uids(source.StudyInstanceUID, source.SOPInstanceUID, model)
    mask = lesion_mask(row, int(source.Rows), int(source.Columns))
    # A SEG of one frame of a loop needs the loop's Frame of Reference (highdicom, DICOM's multi-frame SEG): without
    # one the SR's outline, drawn on the frame, is the lesion's only record
    loop_without_frame_of_reference = (int(getattr(source, "NumberOfFrames", 1) or 1) > 1
                                       and "FrameOfReferenceUID" not in source)
    try:
        seg = (segmentation(source, mask, uids, model_name, frame)
               if mask is not None and not loop_without_frame_of_reference else None)
        return [*([seg] if seg is not None else []), structured_report(source, row, uids, model_name, rule, seg, frame)]
    except (ValueError, TypeError, AttributeError, KeyError) as e:  # what highdicom says of a header it cannot use
        raise BusiError(f"{getattr(source, 'filename', 'a DICOM image')}: its results could not be written as DICOM "
                        f"({str(e).splitlines()[0][:160]})") from None


# Patient and study attributes DICOM requires present though they may be empty (type 2): scanners and exports leave
# some out, and highdicom copies them into what it writes
TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
         "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _with_type2(source):
    missing = [k for k in TYPE2 if k not in source]
    if not missing:
        return source
    import copy
    source = copy.copy(source)  # the caller's dataset stays as read
    for keyword in missing:
        setattr(source, keyword, "")
    return source


def write(objects: list, folder: str | Path) -> list[Path]:
    """Each object as <SOPInstanceUID>.dcm in folder (a name that says nothing about the patient), written under a
    temporary name first: a PACS import or a person watching the folder never reads half a file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for ds in objects:
        target = folder / f"{ds.SOPInstanceUID}.dcm"
        partial = folder / f".{ds.SOPInstanceUID}.partial"
        ds.save_as(partial, enforce_file_format=True)
        partial.replace(target)
        written.append(target)
    return written


def write_for_rows(rows: list[dict], checkpoint_path: str | Path, config: dict, folder: str | Path) -> dict:
    """busi predict --dicom-out: the SR (and SEG) of every prediction row made from a DICOM file, into folder.
    -> {"files": paths written, "not_dicom": images that are not DICOM (no study to file a result in), "failed": one
    line per image whose results could not be written}."""
    import pydicom
    from .folders import is_dicom_file
    from .operating import describe
    model, name = model_key(checkpoint_path), config["arch"]
    rule = describe(config.get("operating_point"))
    files, not_dicom, failed = [], [], []
    for row in rows:
        if "error" in row:
            continue
        if not is_dicom_file(Path(row["path"])):
            not_dicom.append(row["path"])
            continue
        source = pydicom.dcmread(row["path"], stop_before_pixels=True)
        try:
            files += write(results_for(source, row, model, name, rule, row.get("frame")), folder)
        except BusiError as e:  # the rest of the folder still gets its results
            failed.append(str(e))
    return {"files": files, "not_dicom": not_dicom, "failed": failed}
