"""torch -> ONNX with the dynamo exporter, then an ONNX Runtime run checked against PyTorch before it counts."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..quiet import quiet_logs

OPSET = 20
EXTERNAL_DATA_BYTES = 1 << 30  # past ~1 GiB of weights keep them outside the protobuf (hard limit 2 GiB)


def param_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_onnx(module: torch.nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
                dynamic_shapes: dict) -> list[Path]:
    """Write `path` (and `path.data` when large); returns the files written."""
    external = param_bytes(module) > EXTERNAL_DATA_BYTES
    with warnings.catch_warnings(), quiet_logs("torch.onnx"), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module.eval(), args, dynamo=True, opset_version=OPSET, input_names=input_names,
                                    output_names=output_names, dynamic_shapes=dynamic_shapes, verbose=False,
                                    optimize=True, report=False)
        program.save(str(path), external_data=external)
    files = [path]
    data = path.with_name(path.name + ".data")
    if data.exists():
        files.append(data)
    return files


def io_spec(session) -> dict:
    """Inputs/outputs of an ONNX Runtime session: name -> {shape, dtype}."""
    def one(x):
        return {"shape": [d if isinstance(d, int) else str(d) for d in x.shape], "dtype": x.type}

    return {"inputs": {i.name: one(i) for i in session.get_inputs()},
            "outputs": {o.name: one(o) for o in session.get_outputs()}}
