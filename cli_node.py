"""`medblip-node`: the DICOM node's command line (also `python -m medblip_edge.cli_node`)."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import click

from .cli import one_line_errors


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--bundle", "bundle_dir", required=True, type=click.Path(path_type=Path), help="Bundle folder.")
@click.option("--ae-title", default="MEDBLIP", show_default=True, help="The node's AE title (called AE title "
              "senders must use).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every "
              "interface, for a PACS on another machine).")
@click.option("--port", type=int, default=11112, show_default=True, help="DICOM port (0: any free port, said in "
              "the listening line).")
@click.option("--send-to", help="Where SRs go by C-STORE: AET@HOST:PORT (the PACS).")
@click.option("--dicomweb", help="Where SRs go by STOW-RS: a DICOMweb root URL (http://host:8042/dicom-web).")
@click.option("--rules", type=click.Path(path_type=Path), help="Series selection rules (JSON; see the PACS node "
              "guide). Default: a 3D T1 brain series.")
@click.option("--spool", type=click.Path(path_type=Path), default=Path("medblip-spool"), show_default=True,
              help="Folder for received instances, results waiting to be sent, and the ledger. Keep it across "
              "restarts: unanswered studies are answered once after a restart.")
@click.option("--quiet-s", type=float, default=10.0, show_default=True, help="A study is complete when no "
              "instance of it arrived for this long (restarted by each instance).")
@click.option("--report-failures", is_flag=True, help="Send a 'not processed' SR (no finding, the reason's code) "
              "for a study none of whose series could be run.")
@click.option("--patient-text", default="", help="Patient text put before every prompt (as medblip-infer's).")
@click.option("--question", default=None, help="Also ask this free-form question; its answer goes in the SR.")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on 127.0.0.1:PORT/metrics "
              "(0: any free port).")
@click.option("--backend", default="auto", show_default=True, help="auto, torch, ort or trt.")
@click.option("--threads", type=int, default=None, help="Compute threads of the model.")
@click.option("--retry-max-s", type=float, default=60.0, show_default=True, help="Longest wait between two tries "
              "to send a result (the wait doubles from 1 s up to this).")
@click.option("--min-free-mb", type=float, default=200.0, show_default=True, help="Refuse instances (status "
              "A700, the sender retries) while the spool's disk has less free space than this.")
@click.option("--idle-timeout-s", type=float, default=60.0, show_default=True, help="Abort an association "
              "idle this long (a sender that never releases).")
@one_line_errors
def node_main(bundle_dir, ae_title, host, port, send_to, dicomweb, rules, spool, quiet_s, report_failures,
              patient_text, question, metrics_port, backend, threads, retry_max_s, min_free_mb, idle_timeout_s):
    """A DICOM node: receive studies from a PACS, run the bundle, send the result back as a DICOM SR.

    \b
    Storage SCP for MR, Enhanced MR and Legacy Converted Enhanced MR images (and C-ECHO).
    Each instance is on disk before it is acknowledged. A study is run once no instance of
    it came for --quiet-s; the series to run is chosen by --rules; the result is a
    Comprehensive 3D SR (TID 1500) in the same study, sent by C-STORE (--send-to) and/or
    STOW-RS (--dicomweb), retried until acknowledged. Prints one JSON line when listening
    and one per study answered; logs never carry a tag value.
    SIGTERM or Ctrl-C: finish the study in progress, then stop; a second one exits at once
    (the spool stays consistent; the next start resumes it).

    \b
    Example:
      medblip-node --bundle demo-bundle --port 11112 --send-to ORTHANC@127.0.0.1:4242
    """
    from .node.service import Node, NodeOptions

    stop = threading.Event()
    signals = {"n": 0}

    def on_signal(signum, _frame):
        signals["n"] += 1
        if signals["n"] > 1:
            os.write(2, b"node: second signal: exiting now (the spool is consistent; the next start resumes it)\n")
            os._exit(128 + signum)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    node = Node(NodeOptions(bundle=str(bundle_dir), spool=str(spool), ae_title=ae_title, host=host, port=port,
                            send_to=send_to, dicomweb=dicomweb, rules=str(rules) if rules else None, quiet_s=quiet_s,
                            report_failures=report_failures, metrics_port=metrics_port, patient_text=patient_text,
                            question=question, backend=backend, threads=threads, retry_max_s=retry_max_s,
                            min_free_mb=min_free_mb, idle_timeout_s=idle_timeout_s))
    node.start()
    while not stop.wait(0.5):
        pass
    node.stop()
    sys.exit(0)


if __name__ == "__main__":
    node_main()
