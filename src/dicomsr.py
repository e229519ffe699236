"""DICOM out: one Comprehensive SR per DICOM input (`medq predict --dicom-sr DIR`), built with highdicom.

The report is a TID 1500 Measurement Report, which viewers and PACS (OHIF, dcmqrscp, ...) already parse: per class
one measurement group (TID 1501) whose finding type is the class, with its Probability (DCM 122157), the run's
operating threshold (DCM 122411 Threshold Value) where the class's call is p ≥ threshold, and the decision (the JSON
line's: medq.metrics.decisions at the same thresholds) as a qualitative evaluation named by the class, valued Present
or Absent (SNOMED CT); every group names the source image (its SOP Class/Instance UID) and the algorithm (run name,
model kind and the first 12 hex digits of the model file's sha256). Study, series and patient attributes are copied
from the source by highdicom, so the SR files into the source's study; the SR is a new series, preliminary and
unverified.

Class codes: SNOMED CT from pydicom's dictionary when a concept's meaning is the class name (NORMAL → 17621005
"Normal"), otherwise the private coding scheme ``99MEDQ`` (value = the class name), declared in the file's Coding
Scheme Identification Sequence as medq's own.

Patient attributes never reach a log or an error message: errors name the file and the failure's type, with any
patient value in the text replaced by ``<patient attribute>``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from medq import artifacts
from medq.errors import MedqError

PRIVATE_SCHEME = "99MEDQ"
PATIENT_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "OtherPatientIDs",
                      "PatientAge", "PatientAddress", "IssuerOfPatientID", "AccessionNumber")
# The Patient and General Study modules' type 2 attributes the SR copies from its source (PS3.3 C.7.1.1, C.7.2.1).
TYPE_2_STUDY_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                           "StudyDate", "StudyTime", "ReferringPhysicianName")
SR_SERIES_NUMBER = 9901  # a number outside the range modalities usually use, so the SR series sorts after the images
DISCLAIMER = "medq research result, not a medical device: not for diagnostic use"


@dataclass(frozen=True)
class ModelIdentity:
    """What made the probabilities: written as the SR's algorithm identification."""

    run_name: str
    model: str  # fp32 | int8 | keras | the --model-file kind
    sha256: str
    medq_version: str = ""

    @property
    def algorithm_name(self) -> str:
        return f"medq run {self.run_name}"

    @property
    def algorithm_version(self) -> str:
        return f"{self.model} sha256:{self.sha256[:12]}" + (f" medq {self.medq_version}" if self.medq_version else "")


def class_code(name: str):
    """SNOMED CT concept whose meaning is ``name`` (pydicom's dictionary), else medq's private code for it."""
    from pydicom.sr.codedict import codes
    import highdicom as hd

    keyword = "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]+", name) if part)
    try:
        code = getattr(codes.SCT, keyword)
    except AttributeError:
        code = None
    if code is not None and _plain(code.meaning) == _plain(name):
        return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)
    return hd.sr.CodedConcept(name, PRIVATE_SCHEME, name)


def _plain(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def decisions(probabilities: dict[str, float], task: str,
              thresholds: float | Mapping[str, float]) -> dict[str, tuple[bool, float | None]]:
    """class → (present, threshold or None), by the run's decision rule (:func:`medq.metrics.decisions`) at
    ``thresholds`` (per thresholded class, as a prediction record's ``thresholds``; a number: every class). The
    threshold is stated where the class's call is ``p ≥ threshold``: each label (multi-label), the positive class
    (binary; the other class is present iff it is not); multiclass calls the class whose probability exceeds its
    threshold by the most, so no class's call is a threshold of its own."""
    from medq.metrics import decisions as rule

    names = list(probabilities)
    thresholded = names[1:] if task == "binary" else names
    cut = {c: float(thresholds if isinstance(thresholds, (int, float)) else thresholds[c]) for c in thresholded}
    per_column = np.array([cut.get(c, 0.0) for c in names])
    called = rule(task, np.array([[probabilities[c] for c in names]], dtype=np.float64), per_column)[0]
    if task == "multilabel":
        return {c: (bool(called[k]), cut[c]) for k, c in enumerate(names)}
    index = int(called)  # binary: True → the positive class (the second)
    return {c: (k == index, cut[c] if task == "binary" and c in cut else None) for k, c in enumerate(names)}


def redact(text: str, source: Any) -> str:
    """``text`` with every patient attribute value of ``source`` replaced (for messages and logs)."""
    for keyword in PATIENT_ATTRIBUTES:
        value = str(source.get(keyword, "") or "").strip()
        if len(value) >= 2:
            text = text.replace(value, "<patient attribute>")
    return text


def read_source(path: Path):
    """The source's header (no pixel data); a file that is not a DICOM image is a MedqError naming it."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on damaged files
        raise MedqError(f"{path}: not readable as DICOM for the SR ({type(exc).__name__})") from None
    missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID") if k not in ds]
    if missing:
        raise MedqError(f"{path}: no {', '.join(missing)}; an SR can only reference a complete DICOM image")
    for keyword in TYPE_2_STUDY_ATTRIBUTES:  # required in every image, but may be empty: exporters leave some out
        if keyword not in ds:
            setattr(ds, keyword, None)
    return ds


def build_sr(source: Any, probabilities: dict[str, float], task: str, thresholds: float | Mapping[str, float],
             model: ModelIdentity):
    """The Comprehensive SR (a pydicom Dataset) for one source image header and its class probabilities."""
    import highdicom as hd
    from highdicom.coding_schemes import CodingSchemeIdentificationItem
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    algorithm = hd.sr.AlgorithmIdentification(name=model.algorithm_name, version=model.algorithm_version)
    image = hd.sr.SourceImageForMeasurementGroup.from_source_image(source)
    groups = []
    for name, (present, cut) in decisions(probabilities, task, thresholds).items():
        measurements = [hd.sr.Measurement(name=codes.DCM.Probability, value=float(probabilities[name]),
                                          unit=codes.UCUM.NoUnits, algorithm_id=algorithm)]
        if cut is not None:
            measurements.append(hd.sr.Measurement(name=codes.DCM.ThresholdValue, value=float(cut),
                                                  unit=codes.UCUM.NoUnits, algorithm_id=algorithm))
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"medq {name}"),
            finding_type=class_code(name), algorithm_id=algorithm, measurements=measurements,
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(  # the class itself: Present / Absent
                class_code(name), codes.SCT.Present if present else codes.SCT.Absent)],
            source_images=[image]))
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name=model.algorithm_name, manufacturer_name="medq", model_name=model.model))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=codes.SCT.ImagingProcedure, imaging_measurements=groups)
    private = CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME, name="medq class names",
        responsible_organization="medq (class names of the run, not a standard terminology)")
    return hd.sr.ComprehensiveSR(
        evidence=[source], content=report[0], series_instance_uid=generate_uid(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="medq", is_complete=True,
        is_final=False, is_verified=False, series_description=DISCLAIMER[:64], coding_schemes=[private],
        manufacturer_model_name=model.algorithm_name[:64], software_versions=model.algorithm_version[:64])


def sr_target(directory: Path, path: Path, root: Path | None, used: set[Path]) -> Path:
    """``<dir>/<sub-folders under the input folder>/<stem>.sr.dcm``; a name already used gets ``-2``, ``-3``..."""
    parent = path.parent.relative_to(root) if root is not None else Path()
    base = directory / parent / path.stem
    target, n = base.with_name(base.name + ".sr.dcm"), 2
    while target in used:
        target, n = base.with_name(f"{base.name}-{n}.sr.dcm"), n + 1
    used.add(target)
    return target


def write_sr(path: Path, target: Path, probabilities: dict[str, float], task: str,
             thresholds: float | Mapping[str, float], model: ModelIdentity) -> Path:
    """Build the SR for DICOM file ``path`` and write it atomically to ``target``."""
    source = read_source(path)
    try:
        sr = build_sr(source, probabilities, task, thresholds, model)
    except Exception as exc:  # noqa: BLE001 - highdicom validates the source's attributes; never echo patient data
        text = redact(" ".join(str(exc).split())[:200], source)
        raise MedqError(f"{path}: no DICOM SR could be built ({type(exc).__name__}: {text})") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    with artifacts.atomic_path(target) as tmp:
        sr.save_as(tmp, enforce_file_format=True)
    return target


def plan_targets(directory: Path, items: Sequence[tuple[Path, Path | None]]) -> dict[Path, Path]:
    """input path → its SR file, for the DICOM inputs among ``items`` ((path, folder argument) in input order)."""
    from medq.data.decode import is_dicom

    used: set[Path] = set()
    return {path: sr_target(directory, path, root, used) for path, root in items if path.is_file() and is_dicom(path)}
