"""The pipeline's own Prometheus series, exported by Ray's metrics agent beside Ray's (names get a `ray_` prefix).

- medblip_stage_ms{stage}: per-request latency of upload, load, preprocess, vision (the request's
  share of its batch), llm and total, in milliseconds.
- medblip_vision_batch_size: scans per vision call.
- medblip_requests_total{status}: answered requests by HTTP status.
- medblip_errors_total{code}: refused or failed requests by the project's error code.
"""

from __future__ import annotations

STAGE_MS_BOUNDS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
BATCH_BOUNDS = [1, 2, 3, 4, 6, 8, 12, 16, 32]


class ServeMetrics:
    def __init__(self):
        from ray.util.metrics import Counter, Histogram

        self.stage_ms = Histogram("medblip_stage_ms", description="Per-request latency of each stage (ms).",
                                  boundaries=STAGE_MS_BOUNDS, tag_keys=("stage",))
        self.batch = Histogram("medblip_vision_batch_size", description="Scans per vision batch.",
                               boundaries=BATCH_BOUNDS)
        self.requests = Counter("medblip_requests_total", description="Answered requests by HTTP status.",
                                tag_keys=("status",))
        self.errors = Counter("medblip_errors_total", description="Refused or failed requests by error code.",
                              tag_keys=("code",))

    def row(self, timings_ms: dict) -> None:
        for stage, ms in timings_ms.items():
            self.stage_ms.observe(float(ms), tags={"stage": stage})

    def answered(self, status: int, code: str | None = None) -> None:
        self.requests.inc(tags={"status": str(status)})
        if code is not None:
            self.errors.inc(tags={"code": code})
