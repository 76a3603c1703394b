"""The Ray Serve deployment: each replica holds one Pipeline and answers HTTP with medblip-infer's row.

Routes (all JSON):
  POST /v1/infer   multipart form: scan (file; a DICOM series as a .zip), patient_text, question, or a DICOM
                   series as multipart/related; type="application/dicom" (query: patient_text, question)
                   -> the row, or an error row + 4xx/5xx
  GET  /v1/ready   200 once this replica's bundle is loaded and verified (the route exists only then)

Per request: the upload is streamed to a temporary file, read and preprocessed on a reader thread
(`preprocess_workers` of them), then its volume joins the vision batch: `@serve.batch` gathers the
volumes that arrive within `batch_wait_ms` (at most `max_batch`) into one [B,1,S,S,S] call on the
model thread (with `max_batch` 1, the CPU default, the volume goes straight to the model thread). The LLM then runs per scan on the same model thread, so model calls never overlap
and readers never wait for the model. Each request has `timeout_s` in all; past it the client gets
504 `timeout` (work already on a thread finishes and is dropped).

The answer's Server-Timing header has each step's wall time (upload, read, vision, llm, app; ms).
Nothing about a scan is logged: Ray's access log has the method, route, status and latency only.
"""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ray import serve

from ..errors import ScanError
from ..runtime.pipeline import elapsed_ms
from ..runtime.results_io import error_row, exception_row, scrub, sha_or_none
from .config import ReplicaConfig
from .upload import RequestError, read_upload

# stable HTTP status per kind of failure (scan errors: the scan was read and refused)
STATUS_SCAN_ERROR = 422
STATUS_TIMEOUT = 504


def _grpc_on_loopback() -> None:
    """Ray Serve 2.60 binds each replica's inter-deployment gRPC server to [::] whatever the node address;
    on a node whose address is 127.0.0.1 (see ray_cluster.py) bind it to 127.0.0.1 as well."""
    import ray
    from ray.serve._private import replica as ray_replica

    add_port = ray_replica.add_port_to_grpc_server
    if getattr(add_port, "medblip_loopback", False) or ray.util.get_node_ip_address() != "127.0.0.1":
        return

    def loopback(server, address: str):
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address[len("[::]:"):]
        return add_port(server, address)

    loopback.medblip_loopback = True
    ray_replica.add_port_to_grpc_server = loopback


def default_max_batch(device: str, graph_max: int | None, asked: int | None) -> int:
    """The vision batch a replica forms: `asked` (--max-batch) capped by the graph's largest batch; by default 1 on
    CPU, where a batch of B costs B times one scan (benchmarks/serve_load.py measures it) and would only add its
    wait, and the graph's largest (at most 8) on a GPU, where one scan leaves the device mostly idle."""
    cap = int(graph_max or asked or 8)
    if asked is None:
        asked = 8 if device.startswith("cuda") else 1
    return max(1, min(asked, cap))


def _json(body: dict, status: int = 200, timing: dict | None = None):
    from starlette.responses import Response

    headers = {"Server-Timing": server_timing(timing)} if timing else None
    return Response(json.dumps(body), status_code=status, media_type="application/json", headers=headers)


def server_timing(timing: dict) -> str:
    """{"upload": 4.2, ...} (ms) -> the Server-Timing header value "upload;dur=4.2, ..." (RFC: W3C Server Timing)."""
    return ", ".join(f"{name};dur={ms:g}" for name, ms in timing.items())


class MedblipReplica:
    """One replica: a verified Pipeline, a reader pool and one model thread."""

    def __init__(self, config: dict):
        from ..runtime.pipeline import Pipeline
        from .metrics import ServeMetrics

        _grpc_on_loopback()
        self.config = ReplicaConfig(**config)
        c = self.config
        self.pipe = Pipeline.from_bundle(c.bundle, backend=c.backend, device=c.device, precision=c.precision,
                                         verify=True, threads=c.threads, huge_pages=c.huge_pages)
        self.readers = ThreadPoolExecutor(c.preprocess_workers, thread_name_prefix="medblip-read")
        self.model = ThreadPoolExecutor(1, thread_name_prefix="medblip-model")
        max_batch = default_max_batch(c.device, getattr(self.pipe.vision, "max_batch", None), c.max_batch)
        self.max_batch = max_batch
        self._vision.set_max_batch_size(max_batch)
        self._vision.set_batch_wait_timeout_s(c.batch_wait_ms / 1000.0)
        self.metrics = ServeMetrics()
        self.ready = {"ready": True, "bundle": Path(c.bundle).name, "backend": self.pipe.chosen,
                      "precision": self.pipe.precision, "random_weights": self.pipe.bundle.random_weights,
                      "max_batch": max_batch, "batch_wait_ms": c.batch_wait_ms}

    # -- routes -------------------------------------------------------------------------

    async def __call__(self, request):
        path, method = request.url.path.rstrip("/"), request.method
        if path == "/v1/infer":
            if method != "POST":
                return self._refuse(RequestError(405, "method_not_allowed", "use POST for /v1/infer"))
            return await self._infer(request)
        if path == "/v1/ready":
            return _json(self.ready)
        return self._refuse(RequestError(404, "not_found", "no such route; POST /v1/infer or GET /v1/ready"))

    def _refuse(self, e: RequestError):
        self.metrics.answered(e.status, e.code)
        return _json({"error": e.as_json()}, e.status)

    async def _infer(self, request):
        t0 = time.perf_counter()
        try:
            upload = await asyncio.wait_for(read_upload(request, int(self.config.max_body_mb * 2**20)),
                                            self.config.timeout_s)
        except RequestError as e:
            return self._refuse(e)
        except asyncio.TimeoutError:
            return self._refuse(RequestError(STATUS_TIMEOUT, "timeout", "the upload took longer than the "
                                             f"server's {self.config.timeout_s:g} s limit"))
        upload_ms = elapsed_ms(t0)
        timing = {"upload": upload_ms}  # wall time per step of this request, queues and batch waits included
        try:
            left = self.config.timeout_s - upload_ms / 1000.0
            row, status = await asyncio.wait_for(self._row(upload, timing), max(left, 0.001))
        except asyncio.TimeoutError:
            row, status = error_row(upload.name, sha_or_none(upload.path), "timeout",
                                    f"not answered within the server's {self.config.timeout_s:g} s limit: "
                                    f"{upload.name}"), STATUS_TIMEOUT
        finally:
            upload.cleanup()
        if status == 200:
            self.metrics.row({"upload": upload_ms, **row["timings_ms"]})
        self.metrics.answered(status, row["error"]["code"] if "error" in row else None)
        timing["app"] = elapsed_ms(t0)
        return _json(row, status, timing)

    async def _row(self, upload, timing: dict) -> tuple[dict, int]:
        """The upload's row (status 200), or its error row and status. `timing` gets each step's wall time."""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            prepared = await loop.run_in_executor(self.readers, self.pipe.prepare, upload.path)
            timing["read"] = elapsed_ms(t0)
        except Exception as e:  # noqa: BLE001 -- never take the replica down; the message names no path
            status = STATUS_SCAN_ERROR if isinstance(e, ScanError) else 503 if isinstance(e, MemoryError) else 500
            return exception_row(e, upload.name, upload.path, lambda: sha_or_none(upload.path)), status
        try:
            t0 = time.perf_counter()
            visual, share = await self._visual(prepared.volume)
            prepared.timings_ms["vision"] = share
            timing["vision"] = elapsed_ms(t0)
            t0 = time.perf_counter()
            row = await loop.run_in_executor(self.model, self.pipe.answer, prepared, visual, upload.patient_text,
                                             upload.question)
            timing["llm"] = elapsed_ms(t0)
        except ScanError as e:  # --strict-qc: out of distribution
            return error_row(upload.name, prepared.sha256, e.code, str(e)), STATUS_SCAN_ERROR
        except Exception as e:  # noqa: BLE001 -- whatever it is, the model failed on a scan that was read
            return error_row(upload.name, prepared.sha256, "internal_error",
                             scrub(f"unexpected {type(e).__name__} in the model: {e}", upload.path)), 500
        row["timings_ms"]["total"] = round(sum(row["timings_ms"].values()), 3)
        return row, 200

    async def _visual(self, volume):
        """[1,1,S,S,S] -> (visual tokens [1,Q,d], this scan's share of its vision call in ms). With batches of
        one, straight to the model thread: Serve's batcher would still hold each scan for the batch wait."""
        if self.max_batch == 1:
            return (await self._vision_call([volume]))[0]
        return await self._vision(volume)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _vision(self, volumes: list) -> list:
        return await self._vision_call(volumes)

    async def _vision_call(self, volumes: list) -> list:
        """volumes: B x [1,1,S,S,S] -> B x (visual tokens [1,Q,d], this scan's share of the call in ms)."""
        import torch

        t0 = time.perf_counter()
        batch = volumes[0] if len(volumes) == 1 else torch.cat(volumes, dim=0)  # [B,1,S,S,S]
        visual = await asyncio.get_running_loop().run_in_executor(self.model, self.pipe.visual_tokens, batch)
        share = elapsed_ms(t0, len(volumes))
        self.metrics.batch.observe(len(volumes))
        return [(visual[i : i + 1], share) for i in range(len(volumes))]
