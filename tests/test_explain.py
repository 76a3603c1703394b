"""--explain on tiny random bundles: the map's grid and affine, its placement in the scan's own voxels for flipped,
permuted and anisotropic storage, the deletion curve, both LLM families, DICOM input and the command line."""

from __future__ import annotations

import json
import subprocess

import nibabel as nib
import numpy as np
import pytest

from explain_scans import sensitise
from medblip_edge.explain.checks import blank_in_file, share_inside
from medblip_edge.explain.grid import ModelGrid, to_nibabel
from medblip_edge.explain.occlusion import curve_area, deletion_curve, occlusion_map, pipeline_margin
from medblip_edge.explain.run import Explainer, ExplainOptions, map_image
from medblip_edge.explain.storage import write_variants
from medblip_edge.explain.target import class_index, margin_numpy
from medblip_edge.model.prompts import LABELS
from medblip_edge.preprocess import open_scan
from medblip_edge.runtime.pipeline import Pipeline

TEXT = "The subject is a 74 year old female. MMSE 23. "


@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    """The tiny bundle's torch pipeline, sensitised (explain_scans.sensitise): its own copy of the weights."""
    p = Pipeline.from_bundle(tiny_bundle, backend="torch", huge_pages=False)
    sensitise(p.vision.model)
    return p


@pytest.fixture(scope="module")
def scans(tmp_path_factory, mni_path):
    """Variants the loader resizes (197x233x189 -> 189x224x181 and the like)."""
    return write_variants(mni_path, tmp_path_factory.mktemp("variants"))


@pytest.fixture(scope="module")
def padded_scans(tmp_path_factory, mni_path):
    """Variants whose longest axis is 224: the loader only pads them (offsets 13 to 17 voxels), no resize."""
    return write_variants(mni_path, tmp_path_factory.mktemp("padded"), crop_to=224)


def explain(pipe, path, out, text="", **opts):
    row = pipe(path, text)
    prepared = pipe.prepare(path)
    ex = Explainer(pipe, ExplainOptions(out=out, **opts))
    return row, prepared, ex, ex(open_scan(path), prepared.volume, row, text)


@pytest.mark.parametrize("variant", [pytest.param("flipped", marks=pytest.mark.slow), "anisotropic"])
def test_map_is_in_the_scans_grid(pipe, scans, tmp_path, variant):
    row, prepared, ex, block = explain(pipe, scans[variant], tmp_path, TEXT)
    src, out = nib.load(scans[variant]), nib.load(block["files"]["nifti"])
    assert out.shape == src.shape
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-5)
    assert int(out.header["sform_code"]) == int(src.header["sform_code"])
    data = out.get_fdata()
    assert np.isfinite(data).all() and data.max() > 0 and data.min() >= 0
    # the peak is the map's largest voxel, and its world position is that voxel under the scan's affine
    peak = block["peak"]
    assert data[tuple(peak["voxel"])] == data.max()
    np.testing.assert_allclose(peak["world_mm"], (src.affine @ [*peak["voxel"], 1])[:3], atol=0.01)
    # shares of the LLM's relevance: image, patient text, question
    assert sum(block["share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert block["share"]["image"] > 0 and block["share"]["patient_text"] > 0
    assert block["text_tokens"] and all("token" not in t for t in block["text_tokens"])  # rows never carry text
    assert block["target"] == {"class": row["label"], "given": False, "margin": pytest.approx(
        margin_numpy([row["log_likelihoods"][k] for k in LABELS], class_index(row["label"])), abs=1e-3)}
    png = open(block["files"]["png"], "rb").read(8)
    assert png == b"\x89PNG\r\n\x1a\n"
    assert "mm" in block["resolution"] and block["refined"]


def test_nothing_comes_back_from_the_padding(scans):
    """A map that is nonzero only in the model input's padding maps to zero everywhere in the scan."""
    from medblip_edge.preprocess import load_scan

    shape = load_scan(open_scan(scans["anisotropic"])).array.shape
    grid = ModelGrid(tuple(shape), 224, 32)
    outside = (~grid.inside()).astype(np.float32)
    assert outside.sum() > 0  # this scan is padded (it is far from cubic)
    back = grid.voxels_to_scan(outside)
    assert back.shape == shape and float(np.abs(back).max()) == 0.0
    assert float(grid.voxels_to_scan(grid.inside().astype(np.float32)).min()) == 1.0


def change_inside_box(pipe, path, mask_ijk, box_index, tmp_path, volume):
    """Blank `mask_ijk` in the scan's own file to its minimum -> (model input of the blanked file, the fraction of
    the model input's change, against `volume` (the file's model input), that lies inside patch `box_index`)."""
    changed, _ = blank_in_file(pipe, path, mask_ijk, tmp_path)
    return changed, share_inside(volume, changed, box_index, 32)


def overlay_patches(pipe, path, tmp_path, k: int = 5):
    """The overlay (NIfTI map, one value per patch) of `path`: its k top patches among those at least half filled
    with the head (a random model's peak may sit in the air) -> (row, prepared scan, [(patch index, the scan
    voxels the overlay marks for it, nibabel order)]). Each mark is checked to be exactly the grid's patch."""
    from medblip_edge.preprocess import load_scan

    row, prepared, _, block = explain(pipe, path, tmp_path, refine=False, montage=False)
    overlay = nib.load(block["files"]["nifti"]).get_fdata()
    grid = ModelGrid(tuple(load_scan(open_scan(path)).array.shape), 224, 32)
    filled = prepared.volume[0, 0].reshape(7, 32, 7, 32, 7, 32).gt(0.05).float().mean(dim=(1, 3, 5)).numpy()
    raw = np.asarray(nib.load(path).dataobj)
    out = []
    for value in np.unique(overlay[overlay > 0])[::-1]:
        mask = overlay == value
        zyx = np.argwhere(np.transpose(mask, (2, 1, 0)))[0]
        index = tuple(int(grid.patch_of(a)[zyx[a]]) for a in range(3))
        assert np.array_equal(mask, to_nibabel(grid.patch_mask(index)))  # the overlay's mark is the model's patch
        if filled[index] >= 0.5 and raw[mask].max() < raw.max():  # (blanking the maximum would rescale the scan)
            out.append((index, mask))
        if len(out) == k:
            break
    return row, prepared, out


@pytest.mark.parametrize("variant", ["flipped", pytest.param("permuted", marks=pytest.mark.slow),
                                     pytest.param("anisotropic", marks=pytest.mark.slow)])
def test_placement(pipe, padded_scans, tmp_path, variant):
    """Blanking, in the scan's own file, the voxels the overlay marks as a top patch lowers the margin exactly as
    occluding that patch in the model input does (these scans are padded, not resized: no interpolation blurs
    the marks' faces); the same marks mirrored (an orientation mistake) would change other places."""
    path = padded_scans[variant]
    row, prepared, candidates = overlay_patches(pipe, path, tmp_path)
    target = class_index(row["label"])
    flats = [int(np.ravel_multi_index(i, (7, 7, 7))) for i, _ in candidates]
    drops, base = occlusion_map(pipe, prepared.volume, "", target, 32, only=flats)
    pick = int(np.argmax(np.abs(drops.ravel()[flats])))  # of the five, the one that moves the margin most
    index, mask = candidates[pick]
    occluded_drop = float(drops.ravel()[flats[pick]])
    changed, inside = change_inside_box(pipe, path, mask, index, tmp_path, prepared.volume)
    blanked_drop = base - float(pipeline_margin(pipe, changed, "", target)[0])
    assert abs(occluded_drop) > 0.01, "the sensitised model should respond to a patch of the head"
    assert blanked_drop == pytest.approx(occluded_drop, rel=1e-3, abs=1e-5)
    assert inside == pytest.approx(1.0, abs=1e-6)
    for axis in range(3):
        wrong = np.flip(mask, axis)
        if (wrong & mask).sum() < 0.5 * mask.sum():
            assert change_inside_box(pipe, path, wrong, index, tmp_path, prepared.volume)[1] < 0.1


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["flipped", "permuted", "anisotropic"])
def test_placement_through_the_resize(pipe, scans, tmp_path, variant):
    """Scans the loader resizes: the overlay's marks are the model's patches, and blanking them puts at least
    90 % of the model input's change inside that patch (the rest is the trilinear resize mixing marked and
    unmarked voxels at the patch's faces, about one model voxel deep); mirrored marks put almost none there."""
    path = scans[variant]
    _, prepared, candidates = overlay_patches(pipe, path, tmp_path, k=2)
    for index, mask in candidates:
        assert change_inside_box(pipe, path, mask, index, tmp_path, prepared.volume)[1] >= 0.9
        for axis in range(3):
            wrong = np.flip(mask, axis)
            if (wrong & mask).sum() < 0.5 * mask.sum():
                assert change_inside_box(pipe, path, wrong, index, tmp_path, prepared.volume)[1] < 0.1


@pytest.mark.slow
def test_deletion_beats_random_order(pipe, scans):
    """Removing patches in the order of relevance lowers the margin faster than in random orders."""
    volume = pipe.prepare(scans["as_is"]).volume
    row = pipe(scans["as_is"])
    target = class_index(row["label"])
    ex = Explainer(pipe, ExplainOptions(out=".", montage=False))
    rel = ex.relevance(volume, "", target, False)
    order = np.argsort(-rel.patches.ravel())
    ours = curve_area(deletion_curve(pipe, volume, order, "", target, 32, steps=6))
    rng = np.random.default_rng(0)
    random = [curve_area(deletion_curve(pipe, volume, rng.permutation(343), "", target, 32, steps=6))
              for _ in range(3)]
    assert ours < np.mean(random), (ours, random)


@pytest.mark.slow
def test_gpt2_family_and_text(tmp_path, mni_path):
    """The BioMedLM (GPT-2) path: its margin equals the row's, its shares add up; the token text only on request."""
    from medblip_edge.export.run import ExportOptions, export_bundle

    bundle = tmp_path / "b"
    export_bundle(ExportOptions(out=bundle, preset="tiny-biomedlm", onnx=False), quiet=True)
    pipe = Pipeline.from_bundle(bundle, backend="torch", huge_pages=False)
    row, _, _, block = explain(pipe, mni_path, tmp_path / "maps", TEXT, include_text=True, montage=False)
    want = margin_numpy([row["log_likelihoods"][k] for k in LABELS], class_index(row["label"]))
    assert block["target"]["margin"] == pytest.approx(want, abs=1e-3)
    assert sum(block["share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert all(isinstance(t["token"], str) for t in block["text_tokens"])


def test_dicom_series_gets_the_niftis_map(tiny_bundle, tmp_path):
    """A DICOM series and the same image written as NIfTI by SimpleITK give the same map at the same world place."""
    sitk = pytest.importorskip("SimpleITK")
    import dicom_fixtures as fx

    img = fx.marked_mni()
    series = fx.write_series(img, tmp_path / "SE01")
    nifti = tmp_path / "same.nii.gz"
    sitk.WriteImage(img, str(nifti))
    pipe = Pipeline.from_bundle(tiny_bundle, backend="torch", huge_pages=False)
    blocks = [explain(pipe, p, tmp_path / "maps", montage=False)[3] for p in (series, nifti)]
    a, b = (nib.load(bl["files"]["nifti"]) for bl in blocks)
    assert a.shape == b.shape
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-3)
    np.testing.assert_allclose(a.get_fdata(), b.get_fdata(), rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(blocks[0]["peak"]["world_mm"], blocks[1]["peak"]["world_mm"], atol=0.01)


def test_command_line(tiny_bundle, infer_cmd, tmp_path, mni_path):
    out = tmp_path / "rows.jsonl"
    run = subprocess.run([*infer_cmd, str(mni_path), "--bundle", str(tiny_bundle), "--backend", "torch", "--out",
                          str(out), "--explain", "--explain-class", "NC", "--patient-text", "secret words 77. "],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    row = json.loads(out.read_text())
    block = row["explanation"]
    assert block["target"]["class"] == "NC" and block["target"]["given"]
    for f in block["files"].values():
        assert (tmp_path / "explanations").resolve() in __import__("pathlib").Path(f).resolve().parents
    assert "secret" not in out.read_text() + run.stderr  # no patient text in rows or logs
    bad = subprocess.run([*infer_cmd, str(mni_path), "--bundle", str(tiny_bundle), "--out", str(tmp_path / "r.csv"),
                          "--explain"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("error [usage]") and len(bad.stderr.splitlines()) == 1


def test_occlusion_batches_equal_single_passes(pipe, scans):
    """Occlusion in batches through the pipeline's backends: each patch's drop equals that patch removed alone."""
    volume = pipe.prepare(scans["as_is"]).volume
    drops, base = occlusion_map(pipe, volume, "", 0, 32, only=[0, 171, 200], batch=3)
    # the corner patch is padding: nothing to remove (a batch of 3 and a single pass may round differently: the
    # CPU's kernels are chosen by batch size, 1.3e-6 seen on an Intel Xeon with AMX)
    assert drops.ravel()[0] == pytest.approx(0.0, abs=1e-5)
    for flat in (171, 200):
        d, h, w = np.unravel_index(flat, (7, 7, 7))
        v = volume.clone()
        v[:, :, d * 32:(d + 1) * 32, h * 32:(h + 1) * 32, w * 32:(w + 1) * 32] = float(volume.min())
        assert drops.ravel()[flat] == pytest.approx(base - pipeline_margin(pipe, v, "", 0)[0], abs=1e-5)
    assert set(np.flatnonzero(drops)) <= {0, 171, 200}  # patches not asked for stay 0


def test_occlusion_on_onnx_runtime_matches_torch(mni_path):
    """Occlusion is forward passes only: on ONNX Runtime it gives the PyTorch backend's drops."""
    from bundles import tiny_onnx_bundle

    bundle = tiny_onnx_bundle("tiny", "none")
    ort = Pipeline.from_bundle(bundle, backend="ort", huge_pages=False)
    ref = Pipeline.from_bundle(bundle, backend="torch", huge_pages=False)
    assert ort.chosen == {"vision": "ort", "llm": "ort"}
    volume = ort.prepare(mni_path).volume
    only = [100, 171, 200, 250]
    got, base = occlusion_map(ort, volume, "", 0, 32, only=only)
    want, want_base = occlusion_map(ref, volume, "", 0, 32, only=only)
    assert base == pytest.approx(want_base, abs=1e-4)
    np.testing.assert_allclose(got.ravel()[only], want.ravel()[only], atol=2e-5)
    assert np.abs(want.ravel()[only]).max() > 1e-4  # the drops compared are not all zero


@pytest.mark.slow
def test_occlusion_method_on_onnx_runtime(tmp_path, mni_path):
    """The whole occlusion method on ONNX Runtime (343 forward passes), with its rank correlation to relevance."""
    from bundles import tiny_onnx_bundle

    pipe = Pipeline.from_bundle(tiny_onnx_bundle("tiny", "none"), backend="ort", huge_pages=False)
    row, _, _, block = explain(pipe, mni_path, tmp_path, method="occlusion", montage=False)
    assert pipe.chosen["vision"] == "ort" and block["method"] == "occlusion"
    assert -1.0 <= block["occlusion"]["rank_correlation_with_relevance"] <= 1.0
    assert nib.load(block["files"]["nifti"]).shape == nib.load(mni_path).shape


def test_map_header_carries_no_free_text(tmp_path):
    """The map copies the scan's geometry, not its header's free text or extensions (they may name a patient)."""
    from medblip_edge.preprocess import load_scan

    img = nib.Nifti1Image(np.arange(960, dtype=np.float32).reshape(10, 12, 8), np.diag([2, 2, 3, 1.0]))
    img.header["descrip"] = b"Patient Jane Roe"
    img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"comment naming her"))
    nib.save(img, tmp_path / "s.nii.gz")
    scan = open_scan(tmp_path / "s.nii.gz")
    out = map_image(scan, load_scan(scan), np.ones((10, 12, 8), np.float32))
    nib.save(out, tmp_path / "m.nii.gz")
    back = nib.load(tmp_path / "m.nii.gz")
    assert b"Jane" not in bytes(back.header["descrip"]) and len(back.header.extensions) == 0
    np.testing.assert_array_equal(back.affine, img.affine)
    assert back.get_data_dtype() == np.float32 and back.shape == (10, 12, 8)
