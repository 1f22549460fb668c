"""Reshape targets computed at run time -> constants (`export/reshapes.py`): same results on every
shape, fewer nodes, and graphs it cannot read left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from lmcor.export.reshapes import constant_reshapes, constant_target, rewrite_file
from onnx import helper


def test_constant_target_copies_kept_dimensions_and_leaves_one_for_minus_one():
    assert constant_target(["b", "n", 384], ["b", "n", 6, 64]) == [0, 0, 6, 64]
    assert constant_target(["b", 6, "n", 64], ["b", "n", 384]) == [0, -1, 384]  # "n" moved: -1
    assert constant_target(["b", "n", 6, 64], ["b*n", 384]) == [-1, 384]
    assert constant_target(["b", "n", 384], ["n", "b", 384]) is None  # two dimensions unknown
    assert constant_target(["b", "n"], [None, 4]) == [-1, 4]


class _Heads(torch.nn.Module):
    """Split into heads and back, as attention does; the output depends on both dynamic axes."""

    def forward(self, x):
        heads = x.view(x.shape[0], x.shape[1], 4, 8).transpose(1, 2)  # (batch, heads, length, 8)
        scores = torch.matmul(heads, heads.transpose(2, 3)).softmax(-1)
        return torch.matmul(scores, heads).transpose(1, 2).reshape(x.shape[0], x.shape[1], 32)


def _export(tmp_path):
    path = tmp_path / "heads.onnx"
    torch.onnx.export(_Heads(), (torch.zeros(2, 3, 32),), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch", 1: "length"}, "y": {0: "batch", 1: "length"}},
                      opset_version=18, dynamo=False)
    return path


def _run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_exported_reshapes_become_constant_and_give_the_same_results_on_every_shape(tmp_path):
    path = _export(tmp_path)
    before = onnx.load(str(path))
    rewritten = tmp_path / "rewritten.onnx"
    model = onnx.load(str(path))
    assert constant_reshapes(model) == 2
    onnx.save(model, str(rewritten))
    constants = {t.name for t in model.graph.initializer}
    assert all(n.input[1] in constants for n in model.graph.node if n.op_type == "Reshape")
    assert not any(n.op_type == "Shape" for n in model.graph.node)  # they only fed the targets
    assert len(model.graph.node) < len(before.graph.node)
    rng = np.random.default_rng(0)
    for batch, length in ((1, 1), (2, 3), (5, 17), (3, 64)):
        x = rng.standard_normal((batch, length, 32)).astype(np.float32)
        np.testing.assert_array_equal(_run(rewritten, x), _run(path, x))


def test_rewrite_file_changes_the_graph_in_place_and_only_once(tmp_path):
    path = _export(tmp_path)
    assert rewrite_file(path) == 2
    assert rewrite_file(path) == 0  # nothing left to do
    x = np.ones((2, 5, 32), dtype=np.float32)
    assert _run(path, x).shape == (2, 5, 32)


def _graph(nodes, inputs, outputs, initializers=()):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(initializers)),
                              opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("custom", 1)])
    return model


def test_allowzero_reshapes_and_unreadable_graphs_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # ONNX Runtime's own inference saves what it could not finish here
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 6])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 2, 3])
    shape_nodes = [helper.make_node("Shape", ["x"], ["s"], start=0, end=1),
                   helper.make_node("Constant", [], ["tail"], value=onnx.numpy_helper.from_array(np.array([2, 3]))),
                   helper.make_node("Concat", ["s", "tail"], ["target"], axis=0)]
    allowzero = _graph([*shape_nodes, helper.make_node("Reshape", ["x", "target"], ["y"], allowzero=1)], [x], [y])
    assert constant_reshapes(allowzero) == 0
    plain = _graph([*shape_nodes, helper.make_node("Reshape", ["x", "target"], ["y"])], [x], [y])
    assert constant_reshapes(plain) == 1  # the same graph without allowzero
    unreadable = _graph([helper.make_node("Mystery", ["x"], ["m"], domain="custom"), *shape_nodes,
                         helper.make_node("Reshape", ["m", "target"], ["y"])], [x], [y])
    nodes = len(unreadable.graph.node)
    assert constant_reshapes(unreadable) == 0
    assert len(unreadable.graph.node) == nodes
    assert list(tmp_path.iterdir()) == []  # nothing left in the working folder


def test_a_graph_with_external_weights_is_left_alone(tmp_path):
    path = _export(tmp_path)
    model = onnx.load(str(path))
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(300, dtype=np.float32), "weight"))
    onnx.save(model, str(path), save_as_external_data=True, location="heads.data", size_threshold=0)
    assert rewrite_file(path) == 0


@pytest.mark.parametrize("arch", ["t5", "t5v11"])
def test_exported_t5_graphs_compute_no_reshape_target(bundles, arch):
    for name in ("encoder_model.onnx", "decoder.onnx", "decoder_cross.onnx"):
        model = onnx.load(str(bundles[arch] / name), load_external_data=False)
        constants = {t.name for t in model.graph.initializer} | {
            o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
        reshapes = [n for n in model.graph.node if n.op_type == "Reshape"]
        assert reshapes and all(n.input[1] in constants for n in reshapes), name


def test_exported_causal_lm_computes_only_the_reshape_targets_it_must(gpt2_bundle):
    """GPT-2's Conv1D unflattens (batch * length, width) to (batch, length, width): two dimensions
    the target cannot copy, so that one stays computed; every other target is constant."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(gpt2_bundle / "model.onnx"), load_external_data=False)
    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=False).graph
    dims = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in (*inferred.value_info, *inferred.input, *inferred.output)}
    constants = {t.name for t in model.graph.initializer} | {
        o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    reshapes = [n for n in model.graph.node if n.op_type == "Reshape"]
    computed = [n for n in reshapes if n.input[1] not in constants]
    assert len(computed) < len(reshapes)
    assert all(constant_target(dims[n.input[0]], dims[n.output[0]]) is None for n in computed)
