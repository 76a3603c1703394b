"""Which series of a study the node runs: selection rules over a few header attributes of each series.

A rules file is JSON; every key is optional and missing keys take the default (a 3D T1 brain series):

    {"modality": "^MR$",
     "image_type": "ORIGINAL", "image_type_exclude": "LOCALIZER|SCOUT|SURVEY|PROJECTION|MPR|MIP",
     "series_description": "(?i)t1|mprage|mp-rage|spgr|bravo|tfe|flash",
     "series_description_exclude": "(?i)localizer|scout|survey|dwi|diffusion|flair|t2|swi|perfusion|post",
     "mr_acquisition_type": ["3D"],
     "min_slices": 64, "max_slices": 2048,
     "max_pixel_spacing_mm": 1.5, "max_slice_thickness_mm": 2.0}

Regular expressions are searched (`re.search`) in the attribute's text (ImageType's values joined by `\\`).
A rule on an attribute the series does not carry passes, except `modality` (a series with no
Modality is never run): scanners leave SeriesDescription and MRAcquisitionType out often enough that
refusing on absence would refuse good series. `null` turns a rule off. Slices count frames (a
multi-frame file counts its frames). Of the series that pass, the one with the most slices is run
first (ties: the lower series number, then the first received); if it cannot be read the next is tried.

Reasons a series is skipped have stable codes (rule_modality, rule_image_type, rule_description,
rule_acquisition_type, rule_slices, rule_spacing, rule_thickness, unreadable_header). Nothing here
reads or reports a tag's value beyond the pass/fail of each rule.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MedblipError
from ..preprocess.dicom_files import quiet_pydicom

DEFAULT_RULES = {
    "modality": "^MR$",
    "image_type": "ORIGINAL",
    "image_type_exclude": "LOCALIZER|SCOUT|SURVEY|PROJECTION|MPR|MIP",
    "series_description": "(?i)t1|mprage|mp-rage|spgr|bravo|tfe|flash",
    "series_description_exclude": "(?i)localizer|scout|survey|dwi|diffusion|flair|t2|swi|perfusion|post",
    "mr_acquisition_type": ["3D"],
    "min_slices": 64,
    "max_slices": 2048,
    "max_pixel_spacing_mm": 1.5,
    "max_slice_thickness_mm": 2.0,
}
_REGEX_KEYS = ("modality", "image_type", "image_type_exclude", "series_description", "series_description_exclude")
_NUMBER_KEYS = ("min_slices", "max_slices", "max_pixel_spacing_mm", "max_slice_thickness_mm")
_TAGS = ["Modality", "ImageType", "SeriesDescription", "MRAcquisitionType", "SeriesNumber", "NumberOfFrames",
         "PixelSpacing", "SliceThickness", "SharedFunctionalGroupsSequence"]


def load_rules(path: str | Path | None) -> dict:
    """The default rules, overridden by a JSON file's keys; raises MedblipError(bad_rules) on an unknown key or a bad
    value (a regular expression that does not compile, a negative limit)."""
    rules = dict(DEFAULT_RULES)
    if path is None:
        return rules
    try:
        given = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise MedblipError(f"--rules: cannot read {Path(path).name} as JSON ({type(e).__name__})",
                           code="bad_rules") from None
    if not isinstance(given, dict):
        raise MedblipError("--rules: the file must hold one JSON object", code="bad_rules")
    unknown = sorted(set(given) - set(DEFAULT_RULES))
    if unknown:
        raise MedblipError(f"--rules: unknown key(s) {', '.join(unknown)}; known: {', '.join(DEFAULT_RULES)}",
                           code="bad_rules")
    rules.update(given)
    for key in _REGEX_KEYS:
        if rules[key] is not None:
            try:
                re.compile(rules[key])
            except (re.error, TypeError):
                raise MedblipError(f"--rules: {key} is not a regular expression", code="bad_rules") from None
    for key in _NUMBER_KEYS:
        v = rules[key]
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            raise MedblipError(f"--rules: {key} must be a number >= 0 or null", code="bad_rules")
    acq = rules["mr_acquisition_type"]
    if acq is not None and (not isinstance(acq, list) or not all(isinstance(a, str) for a in acq)):
        raise MedblipError("--rules: mr_acquisition_type must be a list of strings or null", code="bad_rules")
    return rules


@dataclass
class SeriesInfo:
    """What the rules look at, for one received series (from its first file, and its file/frame count)."""

    key: str  # the spool's folder name for the series (a hash of its UID)
    files: list[Path]
    position: int  # 1-based order of arrival in the study
    number: int | None = None
    slices: int = 0
    attrs: dict = field(default_factory=dict)


@quiet_pydicom()
def describe(key: str, files: list[Path], position: int) -> SeriesInfo:
    """Read the first file's selection attributes (no pixels); frames counted over every file."""
    import pydicom

    info = SeriesInfo(key, files, position)
    try:
        ds = pydicom.dcmread(files[0], stop_before_pixels=True, specific_tags=_TAGS)
    except Exception:  # noqa: BLE001 -- a damaged file: the series is skipped with a code
        info.attrs["unreadable"] = True
        return info
    frames = int(ds.get("NumberOfFrames") or 1) if "NumberOfFrames" in ds else 1
    info.slices = frames if len(files) == 1 else len(files) * frames
    try:
        info.number = int(ds.get("SeriesNumber")) if ds.get("SeriesNumber") not in (None, "") else None
    except (TypeError, ValueError):
        info.number = None
    spacing = ds.get("PixelSpacing")
    thickness = ds.get("SliceThickness")
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and spacing is None:
        measures = shared[0].get("PixelMeasuresSequence")
        if measures:
            spacing, thickness = measures[0].get("PixelSpacing"), measures[0].get("SliceThickness", thickness)
    image_type = ds.get("ImageType")
    info.attrs = {
        "modality": str(ds.get("Modality") or "") or None,
        "image_type": "\\".join(str(v) for v in image_type) if image_type else None,
        "series_description": str(ds.get("SeriesDescription") or "") or None,
        "mr_acquisition_type": str(ds.get("MRAcquisitionType") or "") or None,
        "pixel_spacing": max(float(v) for v in spacing) if spacing else None,
        "slice_thickness": float(thickness) if thickness not in (None, "") else None,
    }
    return info


def check(info: SeriesInfo, rules: dict) -> str | None:
    """None if the series passes every rule, else the first failing rule's code."""
    a = info.attrs
    if a.get("unreadable"):
        return "unreadable_header"
    if rules["modality"] is not None and (a["modality"] is None or not re.search(rules["modality"], a["modality"])):
        return "rule_modality"
    it = a["image_type"]
    if it is not None and ((rules["image_type"] is not None and not re.search(rules["image_type"], it)) or
                           (rules["image_type_exclude"] is not None and re.search(rules["image_type_exclude"], it))):
        return "rule_image_type"
    d = a["series_description"]
    if d is not None and ((rules["series_description"] is not None and not re.search(rules["series_description"], d))
                          or (rules["series_description_exclude"] is not None
                              and re.search(rules["series_description_exclude"], d))):
        return "rule_description"
    acq = a["mr_acquisition_type"]
    if acq is not None and rules["mr_acquisition_type"] is not None and acq not in rules["mr_acquisition_type"]:
        return "rule_acquisition_type"
    lo, hi = rules["min_slices"], rules["max_slices"]
    if (lo is not None and info.slices < lo) or (hi is not None and info.slices > hi):
        return "rule_slices"
    if rules["max_pixel_spacing_mm"] is not None and a["pixel_spacing"] is not None \
            and a["pixel_spacing"] > rules["max_pixel_spacing_mm"]:
        return "rule_spacing"
    if rules["max_slice_thickness_mm"] is not None and a["slice_thickness"] is not None \
            and a["slice_thickness"] > rules["max_slice_thickness_mm"]:
        return "rule_thickness"
    return None


def select(series: list[SeriesInfo], rules: dict) -> tuple[list[SeriesInfo], list[tuple[SeriesInfo, str]]]:
    """-> (series that pass, best first; [(series, code)] of those skipped, in arrival order)."""
    passed, skipped = [], []
    for s in series:
        code = check(s, rules)
        if code is None:
            passed.append(s)
        else:
            skipped.append((s, code))
    passed.sort(key=lambda s: (-s.slices, s.number if s.number is not None else 1 << 30, s.position))
    return passed, skipped


def label(s: SeriesInfo) -> str:
    """How logs name a series: its number and arrival position, never a tag's text."""
    number = f"series {s.number}" if s.number is not None else "series (no number)"
    return f"{number} (#{s.position} received)"
