"""Silencing third-party loggers and warnings is scoped: the caller's logging and warnings are as they were after
every call, whatever ran in between (quiet.py; the quantizers, the ONNX export and the DICOM reader use it)."""

from __future__ import annotations

import logging
import threading
import warnings

import numpy as np
import pytest

import dicom_fixtures as fx
from medblip_edge.quiet import detached_logs, quiet_logs, quiet_warnings


def test_logs_are_quiet_inside_and_restored_after_nested_and_threaded_use():
    root, ort = logging.getLogger(), logging.getLogger("onnxruntime")
    before = (root.level, ort.level)
    barrier, seen = threading.Barrier(4), []

    def user():
        with quiet_logs("", "onnxruntime"):
            barrier.wait()  # all four inside at once: the first out must not undo the others' silence
            seen.append((root.level, ort.level))
            barrier.wait()

    threads = [threading.Thread(target=user) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [(logging.ERROR, logging.ERROR)] * 4
    assert (root.level, ort.level) == before
    with quiet_logs("onnxruntime"), quiet_logs("onnxruntime"):
        assert ort.level == logging.ERROR
    assert ort.level == before[1]


def test_warnings_filter_is_removed_after_the_block():
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        marker = list(warnings.filters)
        with quiet_warnings(r"test_quiet"):
            warnings.warn("inside", UserWarning)
        warnings.warn("outside", UserWarning)
        assert warnings.filters == marker
    assert [str(w.message) for w in caught] == ["outside"]
    assert warnings.filters == before


def test_detached_logger_propagates_again_after_the_block():
    logger = logging.getLogger("pydicom")
    assert logger.propagate
    with detached_logs("pydicom"):
        assert not logger.propagate
    assert logger.propagate


def test_a_dicom_read_leaves_logging_and_warnings_as_they_were(tmp_path):
    import pydicom

    from medblip_edge.preprocess.dicom import load_dicom

    try:
        src = fx.pydicom_file("MR_small.dcm")
    except fx.Missing as e:
        pytest.skip(str(e))
    ds = pydicom.dcmread(src)
    ds.Rows = ds.Columns = 4
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    for k in range(3):
        ds.ImagePositionPatient = [0, 0, k]
        ds.PixelData = np.full(16, k + 1, np.int16).tobytes()
        ds.save_as(tmp_path / f"IM{k}")
    filters, propagate = list(warnings.filters), logging.getLogger("pydicom").propagate
    assert load_dicom(tmp_path).array.shape == (3, 4, 4)
    assert warnings.filters == filters and logging.getLogger("pydicom").propagate == propagate


def test_quantizing_leaves_the_root_logger_as_it_was(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from medblip_edge.export.quantize import DynamicInt8

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(tmp_path / "g.onnx"))
    root = logging.getLogger()
    before = root.level
    root.setLevel(logging.INFO)
    try:
        DynamicInt8()(tmp_path / "g.onnx", tmp_path / "q.onnx")
        assert root.level == logging.INFO and (tmp_path / "q.onnx").stat().st_size > 0
    finally:
        root.setLevel(before)
