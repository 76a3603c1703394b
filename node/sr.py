"""A result row -> a DICOM Comprehensive 3D SR (TID 1500 measurement report) in the source study, with highdicom.

What the document holds (IHE AI Results, see docs/guides/pacs-node.md):
- patient and study modules copied from the source series; its evidence (Current Requested Procedure
  Evidence) references every instance of the series that was run;
- an observer device (TID 1004) whose Device UID is derived from the bundle manifest's SHA-256, so it
  changes when the bundle changes;
- one measurement group (TID 1501): the finding as a coded concept (codes.py), each class's probability
  (DCM 122157, UCUM "1") qualified by the class's finding code, the algorithm (TID 4019: name, version,
  manifest SHA-256 as a parameter), and comments: the free-form answer, the qc warnings of the row, and
  a random-weights notice where the bundle has random weights;
- the IHE contributing-equipment item (purpose "Processing Algorithm", added with pydicom);
- VerificationFlag UNVERIFIED, PreliminaryFlag PRELIMINARY, and a series description saying it is not
  a diagnosis.
A study that could not be run gets, on request, a "not processed" SR: no finding, the reason's code.

UIDs are derived from the job's key (study + series + bundle), so writing the same job twice gives the same
SOP Instance UID and a PACS stores it once.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from .. import __version__
from ..preprocess.dicom_files import quiet_pydicom
from ..quiet import detached_logs, quiet_warnings
from . import codes

MANUFACTURER = "medblip-edge"
ALGORITHM = "MedBLIP"
NOT_DIAGNOSIS = "AI result, not a diagnosis"
RANDOM_NOTICE = "RANDOM WEIGHTS: this model was not trained; its output means nothing"
# Patient and study attributes highdicom reads from the first evidence dataset (Type 2: may be empty).
_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate",
          "StudyTime", "ReferringPhysicianName")


def uid_from(*parts: str) -> str:
    """A DICOM UID under the 2.25 root (ISO/IEC 9834-8) from a SHA-256 of `parts`: the same parts, the same UID."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


@dataclass(frozen=True)
class AlgorithmInfo:
    """Who made the result: the bundle's name, its manifest's SHA-256 and whether it has random weights."""

    bundle_name: str
    manifest_sha256: str
    random_weights: bool
    version: str = __version__

    @property
    def device_uid(self) -> str:
        return uid_from("medblip-device", self.manifest_sha256)


@dataclass
class Report:
    """What one SR says. `row`: medblip-infer's row (None for a not-processed report, then `reason` is its code)."""

    job_key: str
    evidence: list  # pydicom Datasets (headers) of the instances the row was computed from
    algorithm: AlgorithmInfo
    row: dict | None = None
    reason: str | None = None
    extra_comments: list[str] = field(default_factory=list)

    @property
    def sop_instance_uid(self) -> str:
        return uid_from("medblip-sr", self.job_key, self.algorithm.manifest_sha256)

    @property
    def series_instance_uid(self) -> str:
        return uid_from("medblip-sr-series", self.job_key, self.algorithm.manifest_sha256)


def _evidence(datasets: list) -> list:
    """Copies of the evidence headers with the Type 2 patient/study attributes highdicom reads present."""
    out = []
    for ds in datasets:
        ds = ds.copy()
        for key in _TYPE2:
            if key not in ds:
                setattr(ds, key, None)
        out.append(ds)
    return out


def _comment(text: str):
    from highdicom.sr import RelationshipTypeValues, TextContentItem

    return TextContentItem(name=codes.COMMENT.concept(), value=text[:1024] or "-",
                           relationship_type=RelationshipTypeValues.CONTAINS)


def _probability(label: str, p: float):
    """TID 300 measurement: Probability (unit 1) of one class, qualified by that class's finding code."""
    from highdicom.sr import CodeContentItem, ContentSequence, Measurement, RelationshipTypeValues

    m = Measurement(name=codes.PROBABILITY.concept(), value=round(float(p), 6), unit=codes.UNIT_ONE.concept())
    item = m[0]
    if "ContentSequence" not in item:
        item.ContentSequence = ContentSequence()
    item.ContentSequence.append(CodeContentItem(name=codes.FINDING.concept(), value=codes.FINDINGS[label].concept(),
                                                relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD))
    return m


def _comments(report: Report) -> list[str]:
    out = []
    if report.algorithm.random_weights:
        out.append(RANDOM_NOTICE)
    row = report.row or {}
    if report.row is None:
        out.append(f"Not processed: {report.reason}")
    elif row.get("task") == "ask" and row.get("answer") is not None:
        out.append(f"Question: {row.get('question', '')}")
        out.append(f"Answer: {row['answer']}")
    cal = row.get("calibrated")
    if cal:  # a bundle calibrated by medblip-eval: the calibrated reading beside the model's own
        probs = ", ".join(f"{k} {v:.4f}" for k, v in cal["probabilities"].items())
        out.append(f"Calibrated ({cal['calibration']}): {cal['label']}; {probs}")
    out.extend(f"QC warning: {w}" for w in row.get("warnings") or [])
    out.extend(report.extra_comments)
    return out


def _group(report: Report):
    from highdicom.sr import AlgorithmIdentification, MeasurementsAndQualitativeEvaluations, TrackingIdentifier

    alg = report.algorithm
    algorithm_id = AlgorithmIdentification(name=ALGORITHM, version=alg.version,
                                           parameters=[f"bundle {alg.bundle_name}",
                                                       f"manifest sha256 {alg.manifest_sha256}"])
    row = report.row
    measurements = []
    finding = None
    if row is not None:
        finding = codes.FINDINGS[row["label"]].concept()
        measurements = [_probability(label, p) for label, p in row["probabilities"].items()]
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=uid_from("medblip-track", report.job_key),
                                               identifier="MedBLIP result"),
        finding_type=finding, algorithm_id=algorithm_id, measurements=measurements or None)
    container = group[0]
    for text in _comments(report):
        container.ContentSequence.append(_comment(text))
    return group


def _contributing_equipment(ds, alg: AlgorithmInfo) -> None:
    """IHE AIR's Contributing Equipment item naming the algorithm (highdicom refuses its purpose code)."""
    from pydicom.dataset import Dataset

    purpose = Dataset()
    purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = (
        codes.PROCESSING_ALGORITHM.value, codes.PROCESSING_ALGORITHM.scheme, codes.PROCESSING_ALGORITHM.meaning)
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = [purpose]
    item.Manufacturer = MANUFACTURER
    item.ManufacturerModelName = ALGORITHM
    item.SoftwareVersions = alg.version
    item.DeviceUID = alg.device_uid
    seq = list(ds.get("ContributingEquipmentSequence") or [])
    ds.ContributingEquipmentSequence = [*seq, item]


def series_description(report: Report) -> str:
    what = "not processed" if report.row is None else "MedBLIP"
    text = f"{what}: {NOT_DIAGNOSIS}"
    return ("RANDOM WEIGHTS " + text) if report.algorithm.random_weights else text


def build_sr(report: Report):
    """The report -> a highdicom Comprehensive3DSR (a pydicom Dataset). Logs nothing (highdicom's logs detached)."""
    with quiet_pydicom(), detached_logs("highdicom"), quiet_warnings(r"highdicom"):
        return _build(report)


def _build(report: Report):
    from highdicom.sr import (Comprehensive3DSR, DeviceObserverIdentifyingAttributes, MeasurementReport,
                              ObservationContext, ObserverContext)
    from pydicom.sr.codedict import codes as dcm

    alg = report.algorithm
    evidence = _evidence(report.evidence)
    device = ObserverContext(observer_type=dcm.cid270.Device,
                             observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
                                 uid=alg.device_uid, name=ALGORITHM, manufacturer_name=MANUFACTURER,
                                 model_name=f"{ALGORITHM} {alg.bundle_name}"[:64]))
    content = MeasurementReport(observation_context=ObservationContext(observer_device_context=device),
                                procedure_reported=codes.BRAIN_MRI.concept(), imaging_measurements=[_group(report)])
    sr = Comprehensive3DSR(evidence=evidence, content=content[0], series_instance_uid=report.series_instance_uid,
                           series_number=9901 if report.row is not None else 9902,
                           sop_instance_uid=report.sop_instance_uid, instance_number=1,
                           manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
                           series_description=series_description(report)[:64])
    sr.SoftwareVersions = alg.version
    sr.ManufacturerModelName = ALGORITHM
    _contributing_equipment(sr, alg)
    return sr
