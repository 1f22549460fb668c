"""ONNX Runtime sessions as lmcor opens and runs them (`runtime/sessions.py`)."""

import numpy as np
import onnx
import pytest
from lmcor.runtime import core
from lmcor.runtime.sessions import open_session, run
from onnx import TensorProto, helper


def _denormal_graph(tmp_path):
    graph = helper.make_graph([helper.make_node("Mul", ["x", "y"], ["z"])], "denormal",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None]) for n in ("x", "y")],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [None])])
    path = tmp_path / "mul.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _flushes() -> bool:
    """Whether this thread's arithmetic flushes denormals to zero."""
    return np.float32(1e-20) * np.float32(1e-20) == 0


@pytest.mark.skipif(core.built() is None, reason="the calling thread's mode is set through the compiled core")
def test_runs_flush_denormals_and_the_callers_mode_is_kept(tmp_path):
    """Softmax weights below float32's normal range are tens of times slower to multiply on x86: lmcor's
    runs flush them to zero (a result float32 cannot tell apart), in ONNX Runtime's pool and in the
    calling thread while it runs; before and after, the caller's own arithmetic keeps its mode
    (ONNX Runtime would leave the thread that creates a session flushing for good)."""
    assert not _flushes()
    session = open_session(_denormal_graph(tmp_path), threads=2)
    assert not _flushes()
    x = np.full(1 << 22, 1e-20, dtype=np.float32)  # x * x = 1e-40, a denormal; split over the pool's threads
    (z,) = run(session, None, {"x": x, "y": x})
    assert not z.any()
    assert not _flushes()


def test_cuda_sessions_multiply_fp32_in_full_precision():
    """ONNX Runtime's CUDA provider defaults to TF32 for fp32 products (10 mantissa bits): lmcor turns
    it off, so that an fp32 bundle gives the CPU's tokens on a GPU."""
    from lmcor.runtime.sessions import with_options

    assert with_options(["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        ("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
