"""Fit an OOD profile on a trusted cohort and write it into a copy of the bundle (medblip-profile; callable from
an evaluation command as `fit_cohort_profile` + `write_profile_bundle`)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np

from ..bundle.reader import Bundle
from ..bundle.writer import BundleWriter
from ..errors import MedblipError, ScanError
from .ood import ARTIFACT, FILE, OodProfile, pooled


def cohort_features(pipe, scans: list, stream=None) -> tuple[np.ndarray, Counter]:
    """Every scan of `scans` (files, folders, CSVs: as medblip-infer takes them) through `pipe` (a
    runtime.pipeline.Pipeline, its conform step included) -> (features [n, d] of those that read, error counts)."""
    from ..runtime.scan_inputs import expand_scans

    stream = stream or sys.stderr
    items = expand_scans(scans)
    feats, errors = [], Counter()
    for k, item in enumerate(items, start=1):
        try:
            prepared = pipe.prepare(item.scan())
        except (ScanError, OSError) as e:
            errors[getattr(e, "code", "unreadable")] += 1
            continue
        feats.append(pooled(pipe.visual_tokens(prepared.volume))[0])
        del prepared
        if k % 10 == 0 or k == len(items):
            stream.write(f"profile: {k}/{len(items)} scans read, {sum(errors.values())} failed\n")
            stream.flush()
    return (np.stack(feats) if feats else np.zeros((0, 0))), errors


def write_profile_bundle(src: str | Path, out: str | Path, profile: OodProfile, cohort: dict | None = None) -> dict:
    """A copy of bundle `src` at `out` (may be `src` itself: replaced atomically) carrying `profile` as artifact
    `ood_profile`, hashed in its manifest like every other file. Returns the new manifest."""
    bundle = Bundle.open(src, verify=True)
    with BundleWriter(Path(out)) as writer:
        writer.copy_from(bundle, skip=(ARTIFACT,))
        profile.save(writer.path(FILE))
        writer.add(ARTIFACT, FILE, **profile.meta(), **({"cohort": cohort} if cohort else {}))
        manifest = {k: v for k, v in bundle.manifest.items() if k not in ("schema_version", "artifacts")}
        return writer.commit(manifest)


def fit_cohort_profile(pipe, scans: list, stream=None) -> tuple[OodProfile, dict]:
    """Features of a cohort through `pipe` -> (the fitted profile, a summary for the manifest and the user)."""
    feats, errors = cohort_features(pipe, scans, stream)
    if len(feats) == 0:
        raise MedblipError(f"no scan of the cohort could be read ({dict(errors)})", code="too_few_scans")
    profile = OodProfile.fit(feats)
    summary = {"scans": int(len(feats)), "failed": dict(errors), "conform": str(pipe.qc.conform)}
    return profile, summary
