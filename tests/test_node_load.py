"""A small load run: 4 senders send 5 studies each at once to one medblip-node; every study is answered exactly once
in a real Orthanc. Prints the time from a study's last instance to its SR acknowledged (the node's metric)."""

from __future__ import annotations

import threading
import time
import urllib.request

import pytest

import dicom_fixtures as fx
from node_study import FakeStudy, NodeProcess, send
from orthanc import Orthanc, free_port, skip_reason, wait_for

pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")
pytest.importorskip("SimpleITK")
if skip_reason():
    pytest.skip(skip_reason(), allow_module_level=True)

SENDERS, STUDIES_EACH = 4, 5


@pytest.mark.slow
def test_four_senders_five_studies_each_answered_once(tmp_path, tiny_bundle):
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", {"medblip": ["MEDBLIP", "127.0.0.1", port]}).start()
    node = NodeProcess(tmp_path / "node", tiny_bundle, port, "--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
                       "--metrics-port", "0", quiet_s=2.0)
    try:
        try:
            studies = [[FakeStudy(tmp_path / "studies", f"load{i}x{j}") for j in range(STUDIES_EACH)]
                       for i in range(SENDERS)]
            for row in studies:
                for s in row:
                    s.add_series("s1", 4, tmp_path)
        except fx.Missing as e:
            pytest.skip(f"{e} is not installed")
        listening = node.start()
        statuses: dict[int, list] = {}

        def sender(i):
            statuses[i] = [send(s.series[0], port) for s in studies[i]]

        t0 = time.monotonic()
        threads = [threading.Thread(target=sender, args=(i,)) for i in range(SENDERS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        sent_s = time.monotonic() - t0
        assert all(set(st) == {0} for per in statuses.values() for st in per)
        n = SENDERS * STUDIES_EACH
        want = {s.study_uid for row in studies for s in row}
        srs = wait_for(lambda: (lambda got: got if len(got) >= n else None)(orthanc.sr_instances()), 400) or []
        time.sleep(3)  # nothing more arrives
        srs = orthanc.sr_instances()
        got = [s["tags"]["StudyInstanceUID"] for s in srs]
        assert sorted(got) == sorted(want), node.stderr()[-3000:]  # each study once, none twice
        with urllib.request.urlopen(listening["metrics"], timeout=10) as r:
            values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in r.read().decode().splitlines()
                      if line and not line.startswith("#")}
        assert values["medblip_node_studies_run_total"] == n
        assert values["medblip_node_instances_received_total"] == n * 47
        print(f"load: {n} studies of 47 instances from {SENDERS} senders sent in {sent_s:.1f} s, all answered in "
              f"{time.monotonic() - t0:.1f} s; last instance -> SR acknowledged: mean "
              f"{values['medblip_node_result_seconds_sum'] / n:.1f} s")
    finally:
        node.terminate()
        orthanc.stop()
