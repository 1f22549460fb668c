"""fp16/bf16 bundles (export/half.py): T5-safe conversion, validation, the manifest's precision, the CPU
refusal of bf16, the CLI, and the GPU check's dry run."""

import json
import logging
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_requests
from lmcor.cli import main
from lmcor.export import export_corrector
from lmcor.export.half import T5_FP32_MATMULS, bfloat16_bits, convert
from lmcor.runtime.bundle import MANIFEST_NAME, PRECISIONS, Manifest, load_manifest
from lmcor.runtime.errors import BundleError
from lmcor.runtime.sessions import cuda_device_count
from onnx import TensorProto, helper, numpy_helper

from lmcor import Corrector

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def half_bundles(checkpoints, tmp_path_factory) -> dict[str, Path]:
    """fp16 through the CLI (the tiny T5 v1.1: gated, untied), bf16 through the API (the tiny T5: tied)."""
    root = tmp_path_factory.mktemp("half")
    assert main(["export", str(checkpoints["t5v11"]), str(root / "fp16"), "--precision", "fp16"]) == 0
    export_corrector(checkpoints["t5"], root / "bf16", precision="bf16")
    return {"fp16": root / "fp16", "bf16": root / "bf16"}


def test_cli_export_fp16_end_to_end(half_bundles):
    manifest = json.loads((half_bundles["fp16"] / MANIFEST_NAME).read_text())
    assert manifest["precision"] == "fp16" and manifest["validation"]["validated_on"] == "cpu"
    # the fp32 graphs it was converted from were validated exactly first: recorded too, as for bf16
    assert manifest["validation"]["fp32_graphs"]["greedy_token_agreement"] == 1.0
    assert Corrector.load(half_bundles["fp16"]).correct("she go to school", ["She goes to school."], max_new_tokens=8) is not None


def test_cli_export_refuses_half_precision_classifiers(checkpoints, tmp_path):
    assert main(["export", str(checkpoints["t5"]), str(tmp_path / "c"), "--kind", "classifier", "--precision", "fp16"]) == 2


def test_fp16_runs_on_cpu_within_its_recorded_agreement(half_bundles, checkpoints, bundles):
    import torch
    from lmcor.export.validate import validate_corrector
    from lmcor.runtime.request import Request
    from transformers import T5ForConditionalGeneration

    v = load_manifest(half_bundles["fp16"]).validation
    assert v["max_abs_logit_diff"] <= v["tolerance"] and v["greedy_token_agreement"] >= v["min_greedy_token_agreement"]
    assert v["fp32_matmuls"] == 4  # the gated-gelu wo of 2 encoder + 2 decoder layers stay fp32
    model = T5ForConditionalGeneration.from_pretrained(checkpoints["t5v11"], dtype=torch.float32).eval()
    requests = [Request(r["source"], tuple(r["candidates"])) for r in make_requests(16, seed=5)]
    report = validate_corrector(model, half_bundles["fp16"], requests=requests, max_new_tokens=12, exact=False)
    assert report.greedy_token_agreement >= v["min_greedy_token_agreement"]
    assert report.max_abs_logit_diff <= v["tolerance"]
    # through the runtime (batched, drafts on), against the fp32 bundle of the same checkpoint
    half = Corrector.load(half_bundles["fp16"]).correct_batch(requests, max_new_tokens=12, fallback_below=0)
    full = Corrector.load(bundles["t5v11"]).correct_batch(requests, max_new_tokens=12, fallback_below=0)
    same = sum(a.token_ids == b.token_ids for a, b in zip(half, full))
    assert same >= v["min_greedy_token_agreement"] * len(requests) and any(a.token_ids for a in half)


def test_bf16_export_writes_a_valid_graph_and_cpu_refuses_it(half_bundles):
    manifest = load_manifest(half_bundles["bf16"])
    assert manifest.precision == "bf16"
    assert manifest.validation["validated_on"] in ("not run: no CUDA", "cuda")
    assert manifest.validation["fp32_graphs"]["greedy_token_agreement"] == 1.0
    for role in ("encoder", "decoder", "cross"):
        path = half_bundles["bf16"] / manifest.files[role]
        onnx.checker.check_model(str(path))
        graph = onnx.load(str(path)).graph
        assert any(t.data_type == TensorProto.BFLOAT16 for t in graph.initializer)
        assert all(v.type.tensor_type.elem_type != TensorProto.BFLOAT16 for v in (*graph.input, *graph.output))
    with pytest.raises(BundleError, match=r"bf16 bundle runs on CUDA only.*--providers CUDAExecutionProvider") as e:
        Corrector.load(half_bundles["bf16"], providers=["CPUExecutionProvider"])
    assert "\n" not in str(e.value)


@pytest.mark.skipif(cuda_device_count() > 0, reason="checks the export on a machine without CUDA")
def test_a_bf16_export_without_cuda_says_its_atol_is_not_applied(checkpoints, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lmcor"):
        export_corrector(checkpoints["t5"], tmp_path / "bf16", precision="bf16", atol=0.5)
    assert "atol 0.5 is not applied: bf16 graphs are validated on CUDA" in caplog.text


def test_t5_feed_forward_output_and_residual_stream_stay_fp32(half_bundles):
    manifest = load_manifest(half_bundles["fp16"])
    graph = onnx.load(str(half_bundles["fp16"] / manifest.files["decoder"])).graph
    kinds = {t.name: t.data_type for t in graph.initializer}
    views = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Transpose"}  # unfolded: wo.weight.T
    for node in graph.node:
        if node.op_type == "MatMul" and T5_FP32_MATMULS.search(node.name):
            weights = [kinds[views.get(name, name)] for name in node.input if views.get(name, name) in kinds]
            assert weights and all(k == TensorProto.FLOAT for k in weights), node.name
    # no fp16 -> fp32 -> fp16 round trips: each tensor is cast at most once to each type
    casts = [(n.input[0], next(a.i for a in n.attribute if a.name == "to")) for n in graph.node if n.op_type == "Cast"]
    assert len(casts) == len(set(casts))


def test_a_rotary_embeddings_angles_stay_fp32_through_the_views_of_inv_freq():
    """inv_freq as a weight, expanded and cast before the angles' product: only that kept product reads
    it, so no view of it goes to half precision (fp16 keeps 11 bits of 0.001)."""
    from lmcor.export.half import ROTARY_MATMULS

    inv_freq = numpy_helper.from_array(np.array([[[1.0], [0.1], [0.01], [0.001]]], np.float32), "inv_freq")
    shape = numpy_helper.from_array(np.array([1, 4, 1], np.int64), "shape")
    w = numpy_helper.from_array(np.ones((5, 5), np.float32), "w")
    nodes = [helper.make_node("Expand", ["inv_freq", "shape"], ["expanded"], name="/model/rotary_emb/Expand"),
             helper.make_node("Cast", ["expanded"], ["cast"], name="/model/rotary_emb/Cast", to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["cast", "positions"], ["angles"], name="/model/rotary_emb/MatMul"),
             helper.make_node("MatMul", ["angles", "w"], ["y"], name="/model/layers.0/q_proj/MatMul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("positions", TensorProto.FLOAT, [1, 1, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5])], [inv_freq, shape, w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    report = convert(model, TensorProto.FLOAT16, keep=ROTARY_MATMULS)
    assert (report.half_nodes, report.kept_fp32) == (1, 1)
    kinds = {t.name: t.data_type for t in model.graph.initializer}
    assert kinds["inv_freq"] == TensorProto.FLOAT and not any("inv_freq" in n and n != "inv_freq" for n in kinds)
    assert TensorProto.FLOAT16 in kinds.values()  # q_proj's weight
    onnx.checker.check_model(model)


def test_converter_keeps_non_matmul_arithmetic_fp32():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="/q/MatMul"),
             helper.make_node("Add", ["h", "x"], ["r"], name="/Add"),
             helper.make_node("MatMul", ["r", "w"], ["y"], name="/DenseReluDense/wo/MatMul")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    report = convert(model, TensorProto.FLOAT16, keep=T5_FP32_MATMULS)
    assert (report.half_nodes, report.kept_fp32) == (1, 1)
    onnx.checker.check_model(model)
    ops = {n.name: n for n in model.graph.node}
    assert ops["/Add"].input[0] == "h"  # the residual add reads an fp32 cast of the product
    import onnxruntime as ort

    x = rng.normal(size=(3, 8)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, (x @ w + x) @ w, rtol=2e-2, atol=2e-2)


def test_conversion_infers_types_without_serializing_the_weights(monkeypatch):
    """Shape inference serializes the model it is given: past 2 GiB of weights protobuf cannot, so the
    converter sets their values aside meanwhile (a 0.5B-parameter LLM failed to convert)."""
    w = np.ones((512, 512), dtype=np.float32)  # 1 MiB
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="/q/MatMul")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 512])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 512])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    infer = onnx.shape_inference.infer_shapes
    seen = []

    def inferring(m, *args, **kwargs):
        seen.append(m.ByteSize())
        return infer(m, *args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", inferring)
    report = convert(model, TensorProto.FLOAT16)
    assert seen and max(seen) < 64 * 1024 and report.half_nodes == 1
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]).astype(np.float32), w)


def test_bfloat16_bits_round_to_nearest_even():
    values = np.array([1.0, 1.00390625, 1.01171875, -2.5, 3.0e38], dtype=np.float32)
    # 1 + 2^-8 is a tie: to even (1.0); 1 + 3 * 2^-8 rounds up to 1 + 2^-6
    assert bfloat16_bits(values).tolist() == [0x3F80, 0x3F80, 0x3F82, 0xC020, 0x7F62]


def _manifest(precision) -> dict:
    return {"format_version": 3, "kind": "classifier", "architecture": "bert", "max_input_tokens": 8,
            "precision": precision, "opset": 17, "files": {"model": "m.onnx", "tokenizer": "t.json"}, "labels": ["a", "b"]}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_manifest_accepts_known_precisions(precision):
    assert Manifest.from_json(_manifest(precision), "lmcor.json").precision == precision


@pytest.mark.parametrize("precision", ["fp8", "FP16", "float16", ""])
def test_manifest_rejects_unknown_precisions(precision):
    with pytest.raises(BundleError, match="precision"):
        Manifest.from_json(_manifest(precision), "lmcor.json")


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": os.environ.get("PYTHON", "python")}
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for stage in ("env", "bundles", "kernels", "tokens", "encoder", "latency"):
        assert f"{stage}: timeout" in run.stdout
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(report) == {"env", "bundles", "kernels", "tokens", "encoder", "latency"}
    assert (tmp_path / "gpu_check.txt").read_text().startswith("lmcor GPU check (dry run")


def test_gpu_check_stages_run_here_and_keep_what_they_measured(tmp_path, monkeypatch):
    from lmcor.bench import gpu_check

    work = tmp_path / "work"
    for stage in ("env", "bundles", "tokens", "encoder", "latency"):  # without CUDA: measured, or skipped saying why
        assert gpu_check.main([stage, "--work", str(work)]) == 0
    results = {s: json.loads((work / f"{s}.json").read_text()) for s in ("env", "bundles", "tokens", "encoder", "latency")}
    assert results["env"]["status"] == "ok" and results["bundles"]["status"] == "ok"
    assert {r["status"] for s, r in results.items() if s not in ("env", "bundles")} == {"skipped"}
    # A check that measured nothing on a GPU (no CUDA, or onnxruntime-gpu that did not load) does not pass.
    assert gpu_check.main(["report", "--work", str(work), "--out", str(tmp_path / "skipped"), "--strict"]) == 1

    def measures_then_fails(work, args, out):
        out["first"] = 1
        raise RuntimeError("the second measurement broke")

    monkeypatch.setattr(gpu_check, "stage_latency", measures_then_fails)
    assert gpu_check.main(["latency", "--work", str(work)]) == 0  # the next stages still run
    latency = json.loads((work / "latency.json").read_text())
    assert latency["first"] == 1 and latency["status"] == "failed" and "second measurement" in latency["error"]

    out = gpu_check.Recorded(work / "encoder.json")  # a stage killed at its limit after one measurement
    out["packed_triton_fp32"] = {"ms": 1.0}
    (work / "encoder.status").write_text("124\n")
    (work / "tokens.json").unlink()
    (work / "tokens.status").write_text("budget\n")
    report = tmp_path / "report"
    assert gpu_check.main(["report", "--work", str(work), "--out", str(report)]) == 0
    assert gpu_check.main(["report", "--work", str(work), "--out", str(report), "--strict"]) == 1
    merged = json.loads((report / "gpu_check.json").read_text())
    assert merged["encoder"]["status"] == "partial" and merged["encoder"]["reason"] == "cut short: timed out"
    assert merged["encoder"]["packed_triton_fp32"] == {"ms": 1.0}
    assert merged["tokens"]["status"] == "no result" and "time budget" in merged["tokens"]["reason"]
    assert set(gpu_check.failures(merged)) == {"kernels", "tokens", "encoder", "latency"}  # kernels: never ran here
    # the kernel tests' pytest killed at its limit, before its report
    (work / "kernels.pytest").write_text("124\n")
    assert gpu_check.main(["kernels", "--work", str(work)]) == 0
    assert json.loads((work / "kernels.json").read_text())["reason"] == "pytest timed out before its report"


def test_gpu_check_fails_where_a_correctness_target_is_missed():
    """CUDA fp32 tokens not identical to the CPU's, or packed fp32 states off transformers': the strict
    report fails, naming them, and every target's line says met or MISSED."""
    from lmcor.bench import gpu_check

    results = {"tokens": {"status": "ok", "cuda_fp32": {"met": False, "must": True, "target": "identical on 100%"},
                          "cuda_fp16": {"identical_to_cpu_fp32": 0.9}},
               "encoder": {"status": "ok", "packed_triton_fp32": {"equal": True, "equal_within": 1e-4,
                                                                  "met": False, "target": ">= 2.0x"}}}
    assert gpu_check.failures(results) == ["tokens.cuda_fp32"]  # a speed target missed is no failure
    assert gpu_check.targets(results) == ["tokens.cuda_fp32: MISSED (identical on 100%)",
                                          "encoder.packed_triton_fp32: MISSED (>= 2.0x)",
                                          "encoder.packed_triton_fp32: equal to transformers' (within 0.0001)"]
    results["tokens"]["cuda_fp32"]["met"] = True
    results["encoder"]["packed_triton_fp32"]["equal"] = False
    assert gpu_check.failures(results) == ["encoder.packed_triton_fp32"]


def test_validation_fails_on_non_finite_logits(half_bundles, bundles, checkpoints, monkeypatch):
    """NaN is what a half-precision overflow gives: it fails the tolerance (max() and > let it pass,
    and the manifest recorded a clean difference)."""
    import numpy as np
    from transformers import AutoModelForSeq2SeqLM

    from lmcor.export import validate
    from lmcor.runtime.errors import ExportError

    assert validate.logit_difference(np.array([1.0, -np.inf]), np.array([1.5, -np.inf])) == 0.5
    assert validate.logit_difference(np.array([1.0, 2.0]), np.array([1.0, np.nan])) == np.inf
    assert validate.logit_difference(np.array([1.0, 2.0]), np.array([1.0, np.inf])) == np.inf
    real = validate._onnx_logits

    def poisoned(corrector, ids, decoder_ids):
        out = real(corrector, ids, decoder_ids).copy()
        out[-1] = np.nan
        return out

    monkeypatch.setattr(validate, "_onnx_logits", poisoned)
    model = AutoModelForSeq2SeqLM.from_pretrained(checkpoints["t5v11"]).eval()  # the fp16 bundle's
    with pytest.raises(ExportError, match="not finite numbers .* overflows fp16's range .* export bf16"):
        validate.validate_half(model, half_bundles["fp16"], "fp16")
    # fp32, where large weights' own rounding may widen the tolerance: no rounding explains a NaN
    with pytest.raises(ExportError, match="not finite numbers"):
        validate.validate_corrector(model, bundles["t5v11"], own_rounding=True)


def test_a_weight_past_fp16s_range_is_named_not_an_activation():
    """Such a weight would be infinite in the graph: refused by its name before any run (it was numpy's
    overflow warning, then a refusal that blamed an activation)."""
    import warnings

    import numpy as np
    from onnx import TensorProto, numpy_helper

    from lmcor.export.half import _half_initializer
    from lmcor.runtime.errors import ExportError

    big = numpy_helper.from_array(np.array([[1.0, -7e4]], dtype=np.float32), "wi.weight")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ExportError, match="the weight 'wi.weight' holds 7e\\+04, past fp16's range"):
            _half_initializer(big, "wi.weight_half", TensorProto.FLOAT16)
        kept = _half_initializer(big, "wi.weight_half", TensorProto.BFLOAT16)  # bf16: fp32's range
    assert kept.data_type == TensorProto.BFLOAT16
