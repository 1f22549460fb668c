"""int8 export: each row of a MatMul's input is quantized on its own (export/quantize.py)."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_requests
from lmcor.export import export_corrector
from lmcor.export.quantize import quantize
from lmcor.runtime.bundle import MANIFEST_NAME
from onnx import TensorProto, helper, numpy_helper
from test_drafts import _decode, _oracle

from lmcor import Corrector

K, N = 48, 24


@pytest.fixture(scope="module")
def matmul(tmp_path_factory):
    """An fp32 graph y = x @ W (x: batch x tokens x K) and its int8 versions, per row and per tensor."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = tmp_path_factory.mktemp("matmul")
    weight = np.random.default_rng(0).normal(size=(K, N)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "tokens", N])],
        [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, root / "fp32.onnx")
    assert quantize(root / "fp32.onnx", root / "rows.onnx") == 1
    quantize_dynamic(root / "fp32.onnx", root / "tensor.onnx", weight_type=QuantType.QInt8)
    return root, weight


def _run(path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _reference(path, x: np.ndarray, saturating: bool = False) -> np.ndarray:
    """NumPy: each row scaled by 127 / max |row|, rounded half to even around 128, times the graph's
    int8 weights, scaled back. `saturating`: as ONNX Runtime's u8s8 kernel for AVX2 without VNNI sums
    (vpmaddubsw): the products of each pair of neighbouring inputs added in int16, saturated, before
    the int32 sum; a CPU with VNNI sums exactly."""
    weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    (w_int8,) = [v for v in weights.values() if v.dtype == np.int8 and v.shape == (K, N)]
    (w_scale,) = [v for name, v in weights.items() if name.endswith("_scale") and v.size == 1]
    (w_zero,) = [v for name, v in weights.items() if name.endswith("_zero_point") and v.dtype == np.int8]
    scale = np.abs(x).max(axis=-1, keepdims=True) / np.float32(127)
    q = np.clip(np.rint(x * (np.float32(127) / np.abs(x).max(axis=-1, keepdims=True))) + 128, 0, 255)
    q, w = q.astype(np.int64), w_int8.astype(np.int64) - int(w_zero)
    if saturating:  # the u8 values themselves are multiplied; their zero point's share is taken off after
        pairs = q[..., 0::2, None] * w[0::2] + q[..., 1::2, None] * w[1::2]
        sums = np.clip(pairs, -(2**15), 2**15 - 1).sum(axis=-2) - 128 * w.sum(axis=0)
    else:
        sums = (q - 128) @ w
    return sums.astype(np.float32) * (scale * w_scale)


def _rows(rng: np.random.Generator) -> np.ndarray:
    """Three requests of four tokens whose activations differ in size by 100x, as padding and
    other requests do."""
    x = rng.normal(size=(3, 4, K)).astype(np.float32)
    x[0] *= 100
    return x


def test_per_row_int8_matches_its_numpy_reference(matmul):
    root, weight = matmul
    x = _rows(np.random.default_rng(1))
    got = _run(root / "rows.onnx", x)
    exact, saturating = (_reference(root / "rows.onnx", x, saturating) for saturating in (False, True))
    assert not np.allclose(exact, saturating, rtol=1e-5, atol=1e-4)  # these rows tell the two kernels apart
    # Every element as one of the two kernels computes it, on whichever CPU this is.
    assert (np.allclose(got, exact, rtol=1e-5, atol=1e-4) or np.allclose(got, saturating, rtol=1e-5, atol=1e-4)), \
        np.abs(got - exact).max()
    fp32 = x @ weight
    # The scheme, summed exactly: within 3% of each row's own largest output, the small requests
    # included (measured: <= 1.7%; a saturated pair costs a row up to 4.1% more on AVX2 without VNNI).
    assert (np.abs(exact - fp32).max(axis=-1) / np.abs(fp32).max(axis=-1)).max() < 0.03


def test_each_row_is_computed_from_itself_alone(matmul):
    root, _ = matmul
    x = _rows(np.random.default_rng(2))
    together = _run(root / "rows.onnx", x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            assert np.array_equal(_run(root / "rows.onnx", x[b : b + 1, t : t + 1])[0, 0], together[b, t])
    # One scale per tensor: the small requests' results depend on the large one beside them.
    per_tensor = _run(root / "tensor.onnx", x)
    assert not np.array_equal(_run(root / "tensor.onnx", x[1:2]), per_tensor[1:2])


@pytest.fixture(scope="module")
def int8_bundle(checkpoints, tmp_path_factory):
    path = tmp_path_factory.mktemp("int8") / "bundle"
    export_corrector(checkpoints["t5v11"], path, precision="int8")
    return path


def test_a_bias_after_the_matmul_is_added(tmp_path):
    """ONNX Runtime fuses MatMulInteger, its scaling and a bias Add into MatMulIntegerToFloat, whose
    CPU kernel drops the bias where the activations' scale is one per row (BART's and BERT's layers
    have biases): the bias stays out of the fusion and is added."""
    rng = np.random.default_rng(1)
    weight, bias = rng.normal(size=(K, N)).astype(np.float32), rng.normal(size=N).astype(np.float32) * 10
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["product"]), helper.make_node("Add", ["product", "b"], ["y"])],
        "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "tokens", N])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "fp32.onnx")
    assert quantize(tmp_path / "fp32.onnx", tmp_path / "rows.onnx") == 1
    x = _rows(rng)
    np.testing.assert_allclose(_run(tmp_path / "rows.onnx", x), _reference(tmp_path / "rows.onnx", x) + bias,
                               rtol=1e-5, atol=1e-3)


def test_int8_corrector_decodes_alike_in_any_batch_and_with_drafts(int8_bundle):
    corrector = Corrector.load(int8_bundle)
    assert corrector.drafts_supported
    requests = make_requests(16, seed=17)
    alone = corrector.correct_batch(requests, max_new_tokens=16, batch_size=1, drafts=False)
    together = corrector.correct_batch(requests, max_new_tokens=16, batch_size=16, drafts=False)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    # Drafts accepted whole, cut part-way and always wrong (random weights copy too little to rely
    # on the candidates), all verified in one batch.
    plain, *_ = _decode(corrector, requests, max_new_tokens=16)
    assert plain == [c.token_ids for c in alone]
    got, drafted, accepted, _ = _decode(corrector, requests, _oracle(plain, np.random.default_rng(3)), max_new_tokens=16)
    assert got == plain and 0 < accepted < drafted


def test_int8_bundles_of_older_formats_decode_without_drafts(int8_bundle, tmp_path, caplog):
    old = tmp_path / "old"
    shutil.copytree(int8_bundle, old)
    manifest = json.loads((old / MANIFEST_NAME).read_text())
    (old / MANIFEST_NAME).write_text(json.dumps({**manifest, "format_version": 2}))
    corrector = Corrector.load(old)
    assert not corrector.drafts_supported
    assert "quantizes activations per tensor" in caplog.text and "re-export" in caplog.text
    got = corrector.correct_batch(make_requests(3, seed=2), max_new_tokens=8)
    assert all(c.stats.drafted_tokens == 0 for c in got)
