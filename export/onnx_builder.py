"""A small ONNX graph writer: named initializers, nodes with fresh output names, one save.

Used for graphs written op by op (fused ONNX Runtime kernels) rather than traced from PyTorch. With a
`WeightFile`, each weight goes to disk as it is made (external data), so a graph of any size is written
holding one weight in memory at a time, and graphs that share a weight (same bytes) share one copy.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_export import EXTERNAL_DATA_BYTES, OPSET

MS_DOMAIN = "com.microsoft"
IR_VERSION = 10  # ONNX Runtime 1.2x reads IR <= 10/11; the onnx package would stamp a newer one
DTYPES = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "int32": TensorProto.INT32}
INLINE_BYTES = 1024  # smaller weights stay inside the graph file
ALIGN = 4096  # external weights start on a page: ONNX Runtime can map them instead of copying


class WeightFile:
    """One external-data file for the graphs of an artifact: weights appended as they are made, page-aligned;
    a weight already in the file (same dtype, shape and bytes) is not written again."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._f = open(self.path, "wb")
        self._seen: dict[bytes, tuple[int, int]] = {}
        self.bytes_shared = 0  # bytes a second graph did not have to write

    def put(self, array: np.ndarray) -> tuple[int, int]:
        """-> (offset, length) of `array`'s bytes in the file."""
        raw = memoryview(np.ascontiguousarray(array)).cast("B")
        h = hashlib.blake2b(f"{array.dtype}{array.shape}".encode(), digest_size=20)
        h.update(raw)
        key = h.digest()
        if key in self._seen:
            self.bytes_shared += raw.nbytes
            return self._seen[key]
        offset = -(-self._f.tell() // ALIGN) * ALIGN
        self._f.seek(offset)
        self._f.write(raw)
        self._seen[key] = (offset, raw.nbytes)
        return self._seen[key]

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "WeightFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GraphWriter:
    def __init__(self, name: str, weights: WeightFile | None = None):
        self.name, self.weights = name, weights
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
        array = np.asarray(array)
        if self.weights is None or array.nbytes < INLINE_BYTES:
            self.inits.append(numpy_helper.from_array(np.array(array, order="C"), name))  # keeps 0-d scalars
            return name
        offset, length = self.weights.put(array)
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape,
                        data_location=TensorProto.EXTERNAL)
        for k, v in (("location", self.weights.path.name), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=k, value=v)
        self.inits.append(t)
        return name

    def linear(self, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None, fmt, out: str | None = None) -> str:
        """x @ weight (+ bias) in weight format `fmt` (export/quantize.py); weight [K, N] float32; out: the
        result's name (a graph output)."""
        return fmt.emit(self, x, name, np.ascontiguousarray(weight, np.float32),
                        None if bias is None else np.asarray(bias, np.float32), out)

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
        """Write `path` (and `path.data` past ~1 GiB of weights); returns the files written. With a WeightFile
        the weights are already on disk next to `path`; only the graph file is written."""
        model = self.model()
        if self.weights is not None:
            if Path(path).parent.resolve() != self.weights.path.parent.resolve():
                raise ValueError("a graph and its weight file must sit in one folder")
            onnx.save_model(model, str(path))
            return [Path(path)]
        external = sum(t.ByteSize() for t in self.inits) > EXTERNAL_DATA_BYTES
        data = path.with_name(path.name + ".data")
        onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                        location=data.name if external else None)
        return [path, data] if external else [path]
