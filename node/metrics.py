"""The node's Prometheus metrics, on their own registry, served on 127.0.0.1:--metrics-port at /metrics.

- medblip_node_instances_received_total: instances written to the spool and acknowledged
- medblip_node_instances_refused_total{code}: C-STOREs answered with a failure status (spool_full, spool_error)
- medblip_node_studies_received_total: studies (or late series) whose quiet timer ended and were queued
- medblip_node_studies_run_total: of those, studies that got a diagnosis
- medblip_node_studies_failed_total{code}: studies with no diagnosis, by the code of their last series' failure
- medblip_node_queue_depth: studies waiting for the quiet timer or the model, the running one included
- medblip_node_outbox_depth: results waiting for their destination's acknowledgement
- medblip_node_send_failures_total: failed sending attempts (each retry counts)
- medblip_node_result_seconds: from a study's last instance received to its SR acknowledged
"""

from __future__ import annotations


class NodeMetrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.instances = Counter("medblip_node_instances_received", "Instances spooled and acknowledged.", registry=r)
        self.refused = Counter("medblip_node_instances_refused", "C-STOREs refused, by code.", ["code"], registry=r)
        self.studies = Counter("medblip_node_studies_received", "Studies queued after their quiet timer.", registry=r)
        self.run = Counter("medblip_node_studies_run", "Studies that got a diagnosis.", registry=r)
        self.failed = Counter("medblip_node_studies_failed", "Studies without a diagnosis, by code.", ["code"],
                              registry=r)
        self.queue = Gauge("medblip_node_queue_depth", "Studies waiting or running.", registry=r)
        self.outbox = Gauge("medblip_node_outbox_depth", "Results waiting to be acknowledged.", registry=r)
        self.send_failures = Counter("medblip_node_send_failures", "Failed sending attempts.", registry=r)
        self.latency = Histogram("medblip_node_result_seconds", "Last instance received to SR acknowledged (s).",
                                 buckets=[1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 1800], registry=r)

    def serve(self, port: int) -> int:
        """Start the /metrics HTTP server on 127.0.0.1:port (0: any free port); -> the port."""
        from prometheus_client import start_http_server

        server, _thread = start_http_server(port, addr="127.0.0.1", registry=self.registry)
        self.server = server
        return server.server_address[1]
