"""medblip-node on bad input and faults, with a real Orthanc as the PACS: a CT series, a mislabelled series, a
localizer-only study, a missing slice, a non-image object, an association aborted mid-series, a sender that
never releases, a full spool. The node keeps serving, answers what it can (with --report-failures a
'not processed' SR names the reason), loses nothing it acknowledged, and logs no tag value."""

from __future__ import annotations

import io
import shutil
import threading
import time

import pytest

import dicom_fixtures as fx
from node_study import CT_IMAGE, FakeStudy, NodeProcess, echo, send
from orthanc import Orthanc, free_port, skip_reason, wait_for

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")
pytest.importorskip("SimpleITK")
if skip_reason():
    pytest.skip(skip_reason(), allow_module_level=True)
pytestmark = pytest.mark.slow  # a node process or two, Orthanc restarts: about a minute

QUIET_S = 1.5


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bundle):
    root = tmp_path_factory.mktemp("node-faults")
    port, full_port = free_port(), free_port()
    orthanc = Orthanc(root / "orthanc", {"medblip": ["MEDBLIP", "127.0.0.1", port]}).start()
    node = full = None
    try:
        studies = {}
        try:
            for tag, edits in (("ct", {"Modality": "CT", "SOPClassUID": CT_IMAGE}), ("mislabel", {"Modality": "CT"}),
                               ("loc", {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}), ("gap", {}),
                               ("abort", {}), ("hold", {}), ("full", {}), ("late", {})):
                s = FakeStudy(root / "studies", tag)
                s.add_series("s1", 4, root, **edits)
                studies[tag] = s
            studies["late"].add_series("s2", 9, root)
            for tag, syntax in (("rle", "1.2.840.10008.1.2.5"), ("jpegls", "1.2.840.10008.1.2.4.80")):
                s = FakeStudy(root / "studies", tag)
                plain = s.add_series("plain", 4, root)
                s.series = [fx.transcode(plain, s.root / "s1", syntax)]  # only the compressed copy is sent
                shutil.rmtree(plain)
                studies[tag] = s
        except fx.Missing as e:
            pytest.skip(f"{e} is not installed")
        fx.files(studies["gap"].series[0])[20].unlink()
        node = NodeProcess(root / "node", tiny_bundle, port, "--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
                           "--report-failures", quiet_s=QUIET_S)
        full = NodeProcess(root / "node-full", tiny_bundle, full_port, "--send-to",
                           f"ORTHANC@127.0.0.1:{orthanc.dicom_port}")
        full.cmd[full.cmd.index("--min-free-mb") + 1] = str(10**12)  # more than any disk: the spool is "full"
        node.launch()
        full.launch()
        node.wait_listening()
        full.wait_listening()
        yield {"orthanc": orthanc, "node": node, "full": full, "studies": studies}
    finally:
        for p in (node, full):
            if p is not None:
                p.terminate()
        orthanc.stop()


def _srs(orthanc, study, n=1, timeout_s=30.0):
    return wait_for(lambda: (lambda got: got if len(got) >= n else None)(
        [s for s in orthanc.sr_instances() if s["tags"].get("StudyInstanceUID") == study.study_uid]), timeout_s) or []


def _texts(orthanc, iid) -> list[str]:
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(orthanc.file(iid)))
    return [i.TextValue for i in ds.ContentSequence[-1].ContentSequence[0].ContentSequence if i.ValueType == "TEXT"]


def test_ct_is_refused_at_negotiation_and_the_node_goes_on(setup):
    node, study = setup["node"], setup["studies"]["ct"]
    statuses = send(study.series[0], node.port)
    assert set(statuses) == {-1}  # no presentation context for CT Image Storage
    assert wait_for(lambda: "refused: 1 SOP class not accepted" in node.stderr(), 5)
    assert echo(node.port) == 0


def test_non_image_object_is_refused(setup):
    node = setup["node"]
    assert send([fx.pydicom_file("test-SR.dcm")], node.port) == [-1]
    assert echo(node.port) == 0


@pytest.mark.parametrize("tag, code", [("mislabel", "rule_modality"), ("loc", "rule_image_type"),
                                       ("gap", "slice_gap")])
def test_study_without_a_runnable_series_gets_a_not_processed_sr(setup, tag, code):
    node, orthanc, study = setup["node"], setup["orthanc"], setup["studies"][tag]
    assert set(send(study.series[0], node.port)) == {0}
    srs = _srs(orthanc, study)
    assert len(srs) == 1, node.stderr()[-3000:]
    assert "not processed" in srs[0]["tags"]["SeriesDescription"]
    assert f"Not processed: {code}" in _texts(orthanc, srs[0]["id"])
    result = node.wait_line(lambda d: d.get("event") == "result" and d.get("error", {}).get("code") == code, 5)
    assert result is not None and "label" not in result


@pytest.mark.parametrize("tag", ["rle", "jpegls"])
def test_compressed_series_are_accepted_and_answered(setup, tag):
    from medblip_edge.node.scp import decodable_syntaxes

    node, orthanc, study = setup["node"], setup["orthanc"], setup["studies"][tag]
    syntax = str(__import__("pydicom").dcmread(fx.files(study.series[0])[0]).file_meta.TransferSyntaxUID)
    if syntax not in decodable_syntaxes():
        pytest.skip(f"no decoder for {syntax} installed")
    assert set(send(study.series[0], node.port)) == {0}
    srs = _srs(orthanc, study)
    assert len(srs) == 1 and "not processed" not in srs[0]["tags"]["SeriesDescription"], node.stderr()[-2000:]


def test_aborted_association_keeps_what_was_acknowledged(setup):
    node, orthanc, study = setup["node"], setup["orthanc"], setup["studies"]["abort"]
    statuses = send(study.series[0], node.port, abort_after=30)
    assert statuses == [0] * 30
    srs = _srs(orthanc, study)  # 30 contiguous slices: still a volume, answered once
    assert len(srs) == 1
    spooled = list((node.folder / "spool" / "incoming").glob("*/*/*.dcm"))
    assert sum(1 for r in node.results() if r.get("series_received") and r.get("label")) >= 1
    assert len(spooled) >= 30
    assert echo(node.port) == 0


def test_sender_that_never_releases_is_answered_by_the_quiet_timer(setup):
    node, orthanc, study = setup["node"], setup["orthanc"], setup["studies"]["hold"]
    box, release = {}, threading.Event()
    t = threading.Thread(target=lambda: box.setdefault("s", send(study.series[0], node.port, keep_open_s=60,
                                                                  release=release)))
    t.start()
    try:
        srs = _srs(orthanc, study, timeout_s=50)
        assert len(srs) == 1 and t.is_alive()  # answered while the association is still open
    finally:
        release.set()
        t.join(30)
    assert set(box["s"]) == {0}


def test_full_spool_refuses_with_out_of_resources_and_keeps_serving(setup):
    full, study = setup["full"], setup["studies"]["full"]
    files = fx.files(study.series[0])[:3]
    assert send(files, full.port) == [0xA700] * 3
    assert echo(full.port) == 0
    assert not list((full.folder / "spool" / "incoming").glob("*/*/*.dcm"))
    assert "spool has less free space" in full.stderr()


def test_a_late_series_gets_its_own_sr(setup):
    node, orthanc, study = setup["node"], setup["orthanc"], setup["studies"]["late"]
    assert set(send(study.series[0], node.port)) == {0}
    first = _srs(orthanc, study)
    assert len(first) == 1
    assert set(send(study.series[1], node.port)) == {0}  # after the study was answered
    both = _srs(orthanc, study, n=2)
    assert len(both) == 2 and len({s["tags"]["SOPInstanceUID"] for s in both}) == 2
    time.sleep(QUIET_S + 1)
    assert len(_srs(orthanc, study, n=2)) == 2  # and nothing more


def test_no_tag_value_in_any_log(setup):
    time.sleep(0.5)
    logs = "".join(p.stderr() + p.stdout() for p in (setup["node"], setup["full"]))
    for study in setup["studies"].values():
        for secret in study.secrets():
            assert secret not in logs, f"a tag value of study {study.tag} reached the logs"
