"""A small ONNX graph writer: named initializers, nodes with fresh output names, one save.

Used for graphs written op by op (fused ONNX Runtime kernels) rather than traced from PyTorch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_export import EXTERNAL_DATA_BYTES, OPSET

MS_DOMAIN = "com.microsoft"
IR_VERSION = 10  # ONNX Runtime 1.2x reads IR <= 10/11; the onnx package would stamp a newer one
DTYPES = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "int32": TensorProto.INT32}


class GraphWriter:
    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0
        self._const: dict[tuple, str] = {}

    def input(self, name: str, dtype: str, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, DTYPES[dtype], shape))
        return name

    def output(self, name: str, dtype: str, shape: list) -> None:
        """Declare graph output `name`: a value some node made under that name (op(..., names=[...]))."""
        self.outputs.append(helper.make_tensor_value_info(name, DTYPES[dtype], shape))

    def weight(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.array(array, order="C"), name))  # keeps 0-d scalars
        return name

    def const(self, value, dtype: str = "int64") -> str:
        """A small constant (scalar or 1-D), shared between uses."""
        arr = np.asarray(value, dtype=dtype)
        key = (dtype, arr.shape, arr.tobytes())
        if key not in self._const:
            self._const[key] = self.weight(f"const_{len(self._const)}", arr)
        return self._const[key]

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", names: list[str] | None = None,
           unused: tuple[int, ...] = (), **attrs):
        """Append one node; returns its output name (or a list of names when it has several).

        names: the outputs' names (graph outputs are named where they are made, not copied by an Identity);
        unused: positions of optional outputs not wanted (left unnamed, so the kernel skips them)."""
        self._count += 1
        tag = f"{op_type.lower()}_{self._count}"
        outs = names or ["" if i in unused else f"{tag}_out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=tag, domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)
        opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS_DOMAIN, 1)]
        return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION,
                                 producer_name="medblip-edge")

    def save(self, path: Path) -> list[Path]:
        """Write `path` (and `path.data` past ~1 GiB of weights); returns the files written."""
        model = self.model()
        external = sum(t.ByteSize() for t in self.inits) > EXTERNAL_DATA_BYTES
        data = path.with_name(path.name + ".data")
        onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=data.name if external else None)
        return [path, data] if external else [path]
