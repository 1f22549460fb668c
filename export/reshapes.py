"""Reshapes whose target shape the graph computes at run time -> constant targets.

PyTorch's exporter writes `x.view(x.shape[0], x.shape[1], heads, head_dim)` as a chain of Shape,
Gather, Unsqueeze and Concat nodes feeding the Reshape, run again on every call. A decoder step of
Flan-T5-small has about a hundred such nodes; each costs little, but a step at batch 1 is short,
and dropping them made it about 5% faster on the project's 2-core machine. ONNX's Reshape can say
the same with a constant: 0 copies the input's dimension at that position, -1 takes what is left.

Symbolic shape inference (ONNX Runtime's, without merging any dimensions) names each dimension of
the Reshape's input and output. A target is made constant only where every output dimension is
a fixed size, the input's own dimension at the same position, or the one dimension left for -1;
any other Reshape is kept as it is, and a graph the inference cannot read (or one whose weights
lie outside it, over protobuf's 2 GB) is left unchanged. Export validation then runs the graphs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import uses_external_data

log = logging.getLogger("lmcor")


def _dims(value: onnx.ValueInfoProto) -> list[int | str | None]:
    out: list[int | str | None] = []
    for d in value.type.tensor_type.shape.dim:
        out.append(d.dim_value if d.HasField("dim_value") else d.dim_param if d.HasField("dim_param") else None)
    return out


def constant_target(source: list[int | str | None], target: list[int | str | None]) -> list[int] | None:
    """The constant Reshape target that gives `target` from `source` (symbolic dimensions), or None."""
    shape, rest = [], 0
    for i, dim in enumerate(target):
        if isinstance(dim, int) and dim > 0:
            shape.append(dim)
        elif dim is not None and i < len(source) and source[i] == dim:
            shape.append(0)
        else:
            shape.append(-1)
            rest += 1
    return shape if rest <= 1 else None


def constant_reshapes(model: onnx.ModelProto) -> int:
    """Rewrite `model`'s computable Reshape targets as constants and drop the nodes that only fed
    them; returns how many Reshapes changed."""
    if any(uses_external_data(t) for t in model.graph.initializer):
        return 0  # the inference would read such values from the working folder: a graph over 2 GB is kept
    inferred = _symbolic_shapes(model)
    if inferred is None:
        return 0
    graph = inferred.graph
    shapes = {v.name: _dims(v) for v in (*graph.value_info, *graph.input, *graph.output)}
    constants = {t.name for t in model.graph.initializer} | {
        out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    changed = 0
    for node in model.graph.node:
        if node.op_type != "Reshape" or node.input[1] in constants or node.domain not in ("", "ai.onnx"):
            continue
        if any(a.name == "allowzero" and a.i for a in node.attribute):  # 0 would mean an empty dimension
            continue
        source, target = shapes.get(node.input[0]), shapes.get(node.output[0])
        if source is None or target is None or not target:
            continue
        shape = constant_target(source, target)
        if shape is None:
            continue
        name = f"{node.output[0]}/constant_shape"
        model.graph.initializer.append(numpy_helper.from_array(np.array(shape, dtype=np.int64), name))
        node.input[1] = name
        changed += 1
    if changed:
        _drop_unused(model.graph)
    return changed


def _symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """`model` with every value's symbolic shape, or None where some cannot be inferred. This runs
    the steps of ONNX Runtime's `SymbolicShapeInference.infer_shapes` itself: that function saves
    an incomplete result into the working folder before it raises. Should its internals change,
    the pass is skipped (nothing is lost but the speed-up)."""
    from onnxruntime.tools import symbolic_shape_infer

    # Its warnings ("Cannot determine if ... < 0") say nothing a user can act on: what it cannot
    # infer keeps its reshape.
    quiet = logging.getLogger(symbolic_shape_infer.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        inference = symbolic_shape_infer.SymbolicShapeInference(int_max=2**31 - 1, auto_merge=False,
                                                                guess_output_rank=False, verbose=0)
        inference._preprocess(model)
        complete = False
        while inference.run_:
            complete = inference._infer_impl()
        inference._update_output_from_vi()
    except Exception as e:  # noqa: BLE001 - an unreadable graph is left as exported
        log.debug("symbolic shape inference failed (%s): reshapes kept", e)
        return None
    finally:
        quiet.setLevel(level)
    if not complete:
        log.debug("symbolic shape inference left some shapes unknown: reshapes kept")
        return None
    return inference.out_mp_


def _drop_unused(graph: onnx.GraphProto) -> None:
    """Drop the nodes (and initializers) that no graph output depends on any more."""
    needed = {value.name for value in graph.output}
    kept = []
    for node in reversed(graph.node):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
            needed.update(_subgraph_inputs(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read from the enclosing graph (all names they use, to be safe)."""
    names: set[str] = set()
    for attribute in node.attribute:
        for sub in (*([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else []), *attribute.graphs):
            for inner in sub.node:
                names.update(inner.input)
                names.update(_subgraph_inputs(inner))
    return names


def rewrite_file(path: Path) -> int:
    """`constant_reshapes` on the graph at `path`, in place (its external data, if any, untouched)."""
    model = onnx.load(str(path), load_external_data=False)
    changed = constant_reshapes(model)
    if changed:
        onnx.save(model, str(path))
    return changed
