"""medblip-node loses nothing and answers each study exactly once: the destination down then back, `kill -9` in the
middle of a study, and a second SIGTERM while results wait to be sent, each followed by a restart on the same
spool; a real Orthanc counts the SRs."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

import dicom_fixtures as fx
from node_study import FakeStudy, NodeProcess, send
from orthanc import Orthanc, free_port, skip_reason, wait_for

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")
pytest.importorskip("SimpleITK")
if skip_reason():
    pytest.skip(skip_reason(), allow_module_level=True)
pytestmark = pytest.mark.slow  # a node process or two, Orthanc restarts: about a minute


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_bundle):
    root = tmp_path_factory.mktemp("node-resume")
    port = free_port()
    orthanc = Orthanc(root / "orthanc", {"medblip": ["MEDBLIP", "127.0.0.1", port]}).start()
    node = None
    try:
        studies = {}
        try:
            for tag in ("down", "killed", "twice"):
                s = FakeStudy(root / "studies", tag)
                s.add_series("s1", 4, root)
                studies[tag] = s
        except fx.Missing as e:
            pytest.skip(f"{e} is not installed")
        node = NodeProcess(root / "node", tiny_bundle, port, "--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
                           quiet_s=1.5)
        node.start()
        yield {"orthanc": orthanc, "node": node, "studies": studies}
    finally:
        if node is not None:
            node.terminate()
        orthanc.stop()


def _srs(orthanc, study) -> list:
    return [s for s in orthanc.sr_instances() if s["tags"].get("StudyInstanceUID") == study.study_uid]


def _done_lines(node, study_key=None) -> list[dict]:
    lines = [json.loads(x) for x in (node.folder / "spool" / "ledger.jsonl").read_text().splitlines()]
    return [e for e in lines if e["event"] == "done" and (study_key is None or e["study"] == study_key)]


def test_destination_down_then_back(setup):
    orthanc, node, study = setup["orthanc"], setup["node"], setup["studies"]["down"]
    orthanc.stop()
    assert set(send(study.series[0], node.port)) == {0}
    assert wait_for(lambda: "kept in the outbox, retrying" in node.stderr(), 30), node.stderr()[-2000:]
    assert list((node.folder / "spool" / "outbox").glob("*.dcm"))
    orthanc.start()
    assert wait_for(lambda: _srs(orthanc, study), 30)
    assert wait_for(lambda: not list((node.folder / "spool" / "outbox").glob("*.dcm")), 10)
    time.sleep(2)
    assert len(_srs(orthanc, study)) == 1


def test_kill_9_in_the_middle_of_a_study_then_restart(setup):
    orthanc, node, study = setup["orthanc"], setup["node"], setup["studies"]["killed"]
    files = fx.files(study.series[0])
    release = threading.Event()
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("s", send(files[:20], node.port, keep_open_s=30,
                                                                 release=release)))
    t.start()
    assert wait_for(lambda: len(box) == 0 and len(list((node.folder / "spool" / "incoming").glob("*/*/*.dcm")))
                    >= 20 + 47, 30)  # "down"'s 47 and these 20 are on disk
    node.kill9()  # mid-study: the sender has not finished, the quiet timer has not run
    release.set()
    t.join(30)
    node.start()
    assert set(send(files, node.port)) == {0}  # the sender retries the whole series
    assert wait_for(lambda: _srs(orthanc, study), 40), node.stderr()[-3000:]
    time.sleep(3)  # a second quiet period: nothing more comes
    assert len(_srs(orthanc, study)) == 1
    from medblip_edge.preprocess.dicom_series import uid_hash

    assert len(_done_lines(node, uid_hash(study.study_uid))) == 1


def test_second_sigterm_exits_at_once_and_the_outbox_is_resumed(setup):
    orthanc, node, study = setup["orthanc"], setup["node"], setup["studies"]["twice"]
    orthanc.stop()
    assert set(send(study.series[0], node.port)) == {0}
    assert wait_for(lambda: list((node.folder / "spool" / "outbox").glob("*.dcm")), 30)
    node.proc.send_signal(signal.SIGTERM)  # graceful: it tries to deliver the outbox for --drain-s
    time.sleep(0.5)
    t0 = time.monotonic()
    node.proc.send_signal(signal.SIGTERM)
    rc = node.proc.wait(10)
    assert time.monotonic() - t0 < 5 and rc == 128 + signal.SIGTERM
    assert "second signal: exiting now" in node.stderr()
    orthanc.start()
    listening = node.start()
    assert listening["outbox"] == 1 and listening["resumed_studies"] == 0
    assert wait_for(lambda: _srs(orthanc, study), 30)
    time.sleep(2)
    assert len(_srs(orthanc, study)) == 1


def test_no_tag_value_in_any_log(setup):
    logs = setup["node"].stderr() + setup["node"].stdout()
    for study in setup["studies"].values():
        for secret in study.secrets():
            assert secret not in logs
