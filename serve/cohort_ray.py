"""`medblip-infer --engine ray`: the same cohort run on a Ray cluster with Ray Data.

Stages, streamed (Ray Data holds only the blocks in flight, not the cohort):
  scans (driver) -> read + preprocess (tasks, any node, 1 CPU each) -> model (actor pool: one Pipeline
  per actor, vision batched up to max_batch, LLM per scan) -> rows back to the driver, in input order

The driver does what the local runner does with the rows (`runtime/cohort.RunOutput`): stdout or
--out, whole rows with fsync, --resume (scans already in --out are matched by a hashing pass on
the cluster, before anything is read for the model), error rows, the final count line. Rows are
the local runner's rows: the same reader (`read_scan`), the same error rows, the same `scan_row`.

Readers run where Ray puts them, so on a multi-node cluster every scan path must be readable at
the same path on every node (a shared file system). A reader stuck in a read past --timeout gives
the scan a `timeout` row; its thread is abandoned in the worker process (as in the local runner).
Nothing from a row is logged: Ray Data's own progress output is off.
"""

from __future__ import annotations

import json
import pickle
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MedblipError
from ..qc.options import QcOptions
from ..runtime.cohort import (InferOptions, RunOutput, check_options, expand_inputs, prepare_or_error, scan_row,
                              timeout_row)
from ..runtime.pipeline import elapsed_ms
from ..runtime.results_io import abspath, digest_or_none, exception_row
from ..runtime.scan_inputs import ScanItem
from . import ray_cluster


@dataclass
class RayOptions:
    address: str | None = None  # join this cluster; None: start a local one on 127.0.0.1
    actors: int | None = None  # model actors [default: one per GPU with cuda, else 1]
    threads: int | None = None  # compute threads per actor [default: half the cluster's CPUs, the rest read]
    max_batch: int = 4


# ------------------------------------------------------------------ stages (run on the cluster)


def _item(rec: dict) -> ScanItem:
    """The record's scan (pickled: a DICOM series found in a folder carries its file list)."""
    return pickle.loads(rec["item"])


def _hash(rec: dict) -> dict:
    return {"i": rec["i"], "sha": digest_or_none(_item(rec).scan()) or ""}


def _read(rec: dict, spec: dict, timeout_s: float, qc: dict | None = None) -> dict:
    """One scan -> its volume [1,S,S,S] float32, or its error row (JSON text); never raises."""
    from ..preprocess import PreprocessSpec
    from ..runtime.pipeline import read_scan

    from ..qc.options import QcOptions

    item, sha, spec = _item(rec), rec["sha"] or None, PreprocessSpec(**spec)
    qc = QcOptions.from_dict(qc) if qc else None
    done, abandoned, box = threading.Event(), threading.Event(), {}

    def read():
        try:
            box["result"] = prepare_or_error(lambda: read_scan(item.scan(), spec, sha, lambda: not abandoned.is_set(), qc),
                                             item, sha)
        except BaseException as e:  # noqa: BLE001 -- an error row, never a failed task
            box["result"] = ("error", exception_row(e, item.name, item.path))
        done.set()

    threading.Thread(target=read, name="medblip-read", daemon=True).start()
    out = {"i": rec["i"], "text": rec["text"], "row": "", "meta": "", "timeout": False,
           "volume": np.zeros((0,), np.float32)}
    if not done.wait(timeout_s):
        abandoned.set()  # a read that never returns: its thread is left behind, and skips the torch work
        out.update(row=json.dumps(timeout_row(item, timeout_s)), timeout=True)
        return out
    kind, value = box.pop("result")
    if kind == "error":
        out["row"] = json.dumps(value)
        return out
    out["meta"] = json.dumps({"name": value.name, "sha256": value.sha256, "warnings": value.warnings,
                              "timings_ms": value.timings_ms, "orientation": value.orientation,
                              "series": value.series, "qc": value.qc, "conform": value.conform})
    out["volume"] = value.volume[0].numpy()  # [1,S,S,S]
    return out


class _Model:
    """An actor holding one Pipeline: a batch of read scans -> their rows (JSON text), volumes dropped."""

    def __init__(self, bundle: str, backend: str, device: str, precision, threads: int, huge_pages: bool,
                 question, conform: str | None = None, strict_qc: bool = False):
        from ..runtime.pipeline import Pipeline

        self.pipe = Pipeline.from_bundle(bundle, backend=backend, device=device, precision=precision,
                                         threads=threads, huge_pages=huge_pages, conform=conform,
                                         strict_qc=strict_qc)
        self.question = question

    def __call__(self, batch: dict) -> dict:
        import time

        import torch

        from ..runtime.pipeline import PreparedScan

        rows = list(batch["row"])
        todo = [k for k, row in enumerate(rows) if not row]
        if todo:
            volumes = torch.cat([torch.from_numpy(np.ascontiguousarray(batch["volume"][k]))[None] for k in todo])
            t0 = time.perf_counter()
            visual = self.pipe.visual_tokens(volumes)  # [B,Q,d]
            share = elapsed_ms(t0, len(todo))
            for n, k in enumerate(todo):
                meta = json.loads(batch["meta"][k])
                prepared = PreparedScan(meta["name"], meta["sha256"], volumes[n : n + 1], meta["warnings"],
                                        meta["timings_ms"], meta["orientation"], meta["series"],
                                        meta.get("qc"), meta.get("conform"))
                rows[k] = json.dumps(scan_row(self.pipe, prepared, visual[n : n + 1], share, str(batch["text"][k]),
                                              self.question))
        return {"i": batch["i"], "row": np.array(rows, dtype=object), "timeout": batch["timeout"]}


def _spread() -> dict:
    """Readers spread over the nodes. Given as a function, which also keeps Ray Data from fusing the reading
    into the model actors (it fuses a task stage into the next actor stage when their resources match)."""
    return {"scheduling_strategy": "SPREAD"}


# ------------------------------------------------------------------ the run (driver)


def _quiet_ray_data():
    import logging

    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows come back in input order, as the local runner writes them
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _plan(opts: InferOptions, ray_opts: RayOptions, cluster, manifest: dict) -> tuple[int, dict, int, int]:
    """-> (actors, per-actor resources, compute threads per actor, batch size)."""
    batch = max(1, min(ray_opts.max_batch, int(manifest.get("max_batch") or ray_opts.max_batch)))
    if opts.device.startswith("cuda"):
        if cluster.gpus() < 1:
            raise MedblipError("--device cuda: the Ray cluster has no GPU", code="backend_unavailable")
        threads = ray_opts.threads or 1
        return ray_opts.actors or cluster.gpus(), {"num_gpus": 1, "num_cpus": threads}, threads, batch
    actors = ray_opts.actors or 1
    threads = ray_opts.threads or max(1, int(cluster.cpus()) // (2 * actors))
    return actors, {"num_cpus": threads}, threads, batch


def run_infer_ray(opts: InferOptions, ray_opts: RayOptions) -> int:
    """Run every scan on a Ray cluster; returns the number of scans whose row is an error (resumed rows included)."""
    from ..bundle.reader import Bundle

    check_options(opts)
    if ray_opts.max_batch < 1 or (ray_opts.actors is not None and ray_opts.actors < 1):
        raise MedblipError("--max-batch and --ray-actors must be at least 1", code="usage")
    items = expand_inputs(opts)
    bundle = Bundle.open(opts.bundle, verify=True)  # a bad bundle fails here, before Ray starts
    out = RunOutput(opts, len(items))
    try:
        with ray_cluster.connected(ray_opts.address, log_to_driver=False) as cluster:
            import ray.data

            _quiet_ray_data()
            actors, resources, threads, batch = _plan(opts, ray_opts, cluster, bundle.manifest)
            print(f"ray: {actors} model actor{'s' if actors != 1 else ''} x {threads} thread"
                  f"{'s' if threads != 1 else ''}, vision batch {batch}", file=sys.stderr, flush=True)
            records = [{"i": i, "item": pickle.dumps(item), "sha": "",
                        "text": item.patient_text if item.patient_text is not None else opts.patient_text}
                       for i, item in enumerate(items)]
            blocks = lambda n: max(1, min(n, 200))  # noqa: E731 -- a block per scan for small runs
            if out.index is not None:  # --resume: match rows by name + SHA-256, hashed on the cluster
                hashed = ray.data.from_items(records, override_num_blocks=blocks(len(records))).map(_hash)
                shas = {r["i"]: r["sha"] for r in hashed.iter_rows()}
                todo = []
                for rec in records:
                    rec["sha"] = shas[rec["i"]]
                    item = items[rec["i"]]
                    found = out.index.reserve(abspath(item.path), item.name, rec["sha"] or None, item.series)
                    if found is None:
                        todo.append(rec)
                    else:
                        out.resumed(rec["i"], found)
                records = todo
            if records:
                model = {"bundle": str(Path(opts.bundle).resolve()), "backend": opts.backend, "device": opts.device,
                         "precision": opts.precision, "threads": threads, "huge_pages": opts.huge_pages,
                         "question": opts.question, "conform": opts.conform, "strict_qc": opts.strict_qc}
                ds = (ray.data.from_items(records, override_num_blocks=blocks(len(records)))
                      .map(_read, fn_kwargs={"spec": bundle.manifest["preprocess"], "timeout_s": opts.timeout_s,
                                                "qc": QcOptions.for_bundle(bundle.manifest, opts.conform,
                                                                           opts.strict_qc).as_dict()},
                           num_cpus=1, ray_remote_args_fn=_spread)
                      .map_batches(_Model, fn_constructor_kwargs=model, batch_size=batch, batch_format="numpy",
                                   compute=ray.data.ActorPoolStrategy(size=actors), **resources))
                for r in ds.iter_rows():
                    i = int(r["i"])
                    out.emit(i, items[i], json.loads(r["row"]), timeout=bool(r["timeout"]))
    finally:
        out.close()
    return out.finish()
