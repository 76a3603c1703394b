"""What the numbers were measured on: CPU, cores, RAM, GPU, library versions, date, and how busy the machine was
while they were measured (the one machine capture of every suite)."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

from .timing import Clock

# CPU features that decide which fast matmul paths exist (AMX/VNNI for int8 and bf16).
_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16",
          "amx_int8", "asimd", "sve", "bf16", "i8mm")


def _cpuinfo() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model, flags = platform.processor() or platform.machine(), set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "cpu model") and value.strip():
            model = value.strip()
        elif key in ("flags", "Features"):
            flags.update(value.split())
    return {"model": model, "flags": [f for f in _FLAGS if f in flags]}


def _gpu() -> dict | None:
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    driver = None
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except Exception:  # no nvidia-smi on the PATH: the driver stays unknown, the rest is still true
        pass
    return {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1), "driver": driver,
            "cuda": torch.version.cuda, "capability": f"{props.major}.{props.minor}"}


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("transformers", "onnx", "onnxruntime", "tensorrt", "nibabel", "numpy", "matplotlib", "psutil"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # optional packages: absent is worth recording
            out[mod] = None
    return out


def machine_info() -> dict:
    """One dict: cpu {model, flags}, cores, ram_gib, gpu (or None), versions, threads, date (UTC, ISO)."""
    import psutil

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "cpu": _cpuinfo(),
        "cores": {"logical": psutil.cpu_count(logical=True), "physical": psutil.cpu_count(logical=False),
                  "usable": affinity},
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": _gpu(),
        "os": f"{platform.system()} {platform.release()}",
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


class OtherLoad:
    """CPU time that other processes used while measuring: timings on a shared machine include their contention.

    `start()` then `stop()` -> {other_cpu_s, wall_s, other_busy_fraction (of all usable cores)}.
    """

    def start(self) -> "OtherLoad":
        import psutil

        self._proc = psutil.Process()
        self._clock, self._sys, self._own = Clock(), self._busy(), self._own_cpu()
        return self

    @staticmethod
    def _busy() -> float:
        import psutil

        t = psutil.cpu_times()
        return t.user + t.system + getattr(t, "nice", 0.0) + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)

    def _own_cpu(self) -> float:
        c = self._proc.cpu_times()
        return c.user + c.system + c.children_user + c.children_system

    def stop(self) -> dict:
        wall = self._clock.elapsed_s()
        other = max(0.0, (self._busy() - self._sys) - (self._own_cpu() - self._own))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return {"other_cpu_s": round(other, 1), "wall_s": round(wall, 1),
                "other_busy_fraction": round(other / (wall * cores), 3) if wall > 0 else 0.0}


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the OS has none)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


class MachineWatch:
    """`with MachineWatch() as w:` -> w.info: `machine_info()` plus the load averages at the start and the end
    and the CPU time other processes took meanwhile (timings on a shared machine include their contention)."""

    def __enter__(self) -> "MachineWatch":
        self.info = {**machine_info(), "load_average_start": load_average()}
        self._others = OtherLoad().start()
        return self

    def __exit__(self, *exc) -> None:
        self.info["other_processes"] = self._others.stop()
        self.info["load_average_end"] = load_average()
