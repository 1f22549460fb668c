"""A T5 encoder graph -> ONNX Runtime's fused operators (fp32 bundles).

ONNX Runtime's transformer optimizer turns each T5 encoder layer's attention into one `Attention`
node (query, key and value in one matrix product; scores, mask, position bias and softmax inside),
its residual adds and RMS norms into `SkipSimplifiedLayerNormalization`, and a GELU into
`FastGelu`. On the default corrector the encoder alone ran 11-16% faster on CPU on the batches
`correct` makes; a request at batch 1 took 4.6% less time in all (docs/bundle-format.md).

The optimizer computes T5's relative position bias with `RelativePositionBias`, which has a CUDA
kernel only; `_portable_position_bias` puts back the bucket arithmetic in standard operators, with
the bucket count and maximum distance of the model's own config. `_standard_rms_norm` does the same
for the norms without a residual add, which the optimizer files under ONNX's own domain. The fused
graph replaces the plain one only where it gives the plain one's outputs, all finite, on sample
inputs (padding, and distances past the model's maximum distance included); otherwise the plain
graph stays, and the log says why.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

# The fused graph's outputs may differ from the plain graph's by float rounding (a different order of
# additions); this much of the outputs' largest magnitude, or the fused graph is not kept.
RELATIVE_TOLERANCE = 1e-4
_SAMPLE_SHAPES = ((1, 5), (3, 41))  # and one past the maximum distance: `_differs`


def fuse_t5_encoder(source: Path, target: Path, config) -> bool:
    """Write the fused form of the T5 encoder graph at `source` (as exported, its shape computations
    intact: the optimizer's patterns match them) to `target`, where that form is equivalent (see the
    module's docstring). Returns whether it did. Graphs whose weights live in external files are
    left alone (the optimizer would have to load and rewrite them whole)."""
    plain = onnx.load(str(source), load_external_data=False)
    if any(t.data_location == TensorProto.EXTERNAL for t in plain.graph.initializer):
        return False
    try:
        fused = _optimized(plain, config)
    except Exception as e:  # the optimizer's pattern matching raises its own untyped errors
        log.info("%s: not fused (ONNX Runtime's optimizer failed: %s)", source.name, e)
        return False
    if not any(node.op_type == "Attention" for node in fused.graph.node):
        log.info("%s: not fused (the optimizer found no attention to fuse)", source.name)
        return False
    try:
        for node in [n for n in fused.graph.node if n.op_type == "RelativePositionBias"]:
            _portable_position_bias(fused.graph, node, config)
        for node in [n for n in fused.graph.node if n.op_type == "SimplifiedLayerNormalization" and not n.domain]:
            _standard_rms_norm(fused, node)
    except ValueError as e:
        log.info("%s: not fused (%s)", source.name, e)
        return False
    _prune(fused.graph)
    why = _differs(plain, fused, config)
    if why:
        log.info("%s: not fused (%s)", source.name, why)
        return False
    onnx.save(fused, str(target))
    return True


def _optimized(model: onnx.ModelProto, config) -> onnx.ModelProto:
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from .checkpoint import quiet_exporter

    with quiet_exporter():  # the optimizer logs its pattern search at warning level
        # heads and width 0: read from each attention's reshapes (T5's heads need not divide d_model)
        optimized = optimize_model(onnx.ModelProto.FromString(model.SerializeToString()), model_type="t5",
                                   num_heads=0, hidden_size=0, opt_level=0, optimization_options=FusionOptions("t5"))
    fused = optimized.model
    if not any(o.domain == "com.microsoft" for o in fused.opset_import):  # ONNX Runtime runs it without; onnx's tools do not
        fused.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return fused


def _standard_rms_norm(model: onnx.ModelProto, node: onnx.NodeProto) -> None:
    """Put back a norm the optimizer fused into `SimplifiedLayerNormalization`, an ONNX Runtime
    operator it files under ONNX's own domain, where `onnx.checker` (the half-precision checks) finds
    no such operator. ONNX Runtime fuses these standard operators again when it loads the graph."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attributes.get("axis", -1) != -1 or len(node.output) > 1 and any(node.output[1:]):
        raise ValueError(f"{node.name}: a SimplifiedLayerNormalization lmcor does not expand")
    graph, prefix = model.graph, f"{node.name}/standard/"
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    x, scale = node.input[:2]
    eps = prefix + "epsilon"
    graph.initializer.append(numpy_helper.from_array(np.float32(attributes.get("epsilon", 1e-5)), eps))
    if opset >= 18:  # ReduceMean's axes became an input
        graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), prefix + "axes"))
        mean = helper.make_node("ReduceMean", [prefix + "square", prefix + "axes"], [prefix + "mean"], keepdims=1)
    else:
        mean = helper.make_node("ReduceMean", [prefix + "square"], [prefix + "mean"], axes=[-1], keepdims=1)
    new = [helper.make_node("Mul", [x, x], [prefix + "square"]), mean,
           helper.make_node("Add", [prefix + "mean", eps], [prefix + "variance"]),
           helper.make_node("Sqrt", [prefix + "variance"], [prefix + "rms"]),
           helper.make_node("Div", [x, prefix + "rms"], [prefix + "normed"]),
           helper.make_node("Mul", [prefix + "normed", scale], [node.output[0]])]
    for n, made in enumerate(new):
        made.name = f"{prefix}{made.op_type}_{n}"
    _replace(graph, node, new)


def _replace(graph: onnx.GraphProto, node: onnx.NodeProto, new: list[onnx.NodeProto]) -> None:
    """`new` in `node`'s place, so the graph stays in topological order."""
    at = list(graph.node).index(node)
    graph.node.remove(node)
    for offset, made in enumerate(new):
        graph.node.insert(at + offset, made)


def _prune(graph: onnx.GraphProto) -> None:
    """Drop the initializers no node reads any more (the optimizer's bias tables, now copied)."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _portable_position_bias(graph: onnx.GraphProto, node: onnx.NodeProto, config) -> None:
    """Replace a `RelativePositionBias` node (table, query length, key length -> (1, heads, q, k))
    with T5's bucketing (`T5Attention._relative_position_bucket`) in standard operators, for a
    square bias as the encoder's self-attention needs."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    stored = numpy_helper.to_array(next(t for t in graph.initializer if t.name == node.input[0]))
    # the optimizer stores the table's data transposed under its (buckets, heads) dims
    table = stored.reshape(stored.shape[1], stored.shape[0]).T
    buckets = config.relative_attention_num_buckets
    distance = getattr(config, "relative_attention_max_distance", 128)
    if table.shape[0] != buckets:
        raise ValueError(f"a position bias table of {table.shape[0]} rows for {buckets} buckets")
    prefix = f"{node.name}/portable/"
    new: list[onnx.NodeProto] = []

    def constant(name: str, value) -> str:
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), prefix + name))
        return prefix + name

    def op(kind: str, *inputs: str, **attrs) -> str:
        out = f"{prefix}{kind}_{len(new)}"
        new.append(helper.make_node(kind, list(inputs), [out], name=out, **attrs))
        return out

    zero, one = constant("zero", np.int64(0)), constant("one", np.int64(1))
    positions = op("Range", zero, op("Reshape", node.input[1], constant("scalar", np.zeros(0, np.int64))), one)
    relative = op("Sub", op("Unsqueeze", positions, constant("rows", np.array([0], np.int64))),
                  op("Unsqueeze", positions, constant("columns", np.array([1], np.int64))))  # key - query
    if attributes.get("is_bidirectional", 1):
        buckets //= 2
        side = op("Mul", op("Cast", op("Greater", relative, zero), to=TensorProto.INT64),
                  constant("half", np.int64(buckets)))
        away = op("Abs", relative)
    else:
        side = None
        away = op("Neg", op("Min", relative, zero))
    exact = buckets // 2
    exact_i = constant("exact", np.int64(exact))
    # transformers' order of float operations; the Max keeps log(0) out (Where drops those anyway)
    ratio = op("Div", op("Cast", op("Max", away, one), to=TensorProto.FLOAT), constant("exact_f", np.float32(exact)))
    scaled = op("Mul", op("Div", op("Log", ratio), constant("log_span", np.float32(math.log(distance / exact)))),
                constant("buckets_left", np.float32(buckets - exact)))
    far = op("Min", op("Add", op("Cast", scaled, to=TensorProto.INT64), exact_i),
             constant("last", np.int64(buckets - 1)))
    bucket = op("Where", op("Less", away, exact_i), away, far)
    if side is not None:
        bucket = op("Add", side, bucket)
    values = op("Gather", constant("table", np.ascontiguousarray(table)), bucket)  # (q, k, heads)
    heads_first = op("Transpose", values, perm=[2, 0, 1])
    new.append(helper.make_node("Unsqueeze", [heads_first, constant("batch", np.array([0], np.int64))],
                                [node.output[0]], name=prefix + "bias"))
    _replace(graph, node, new)


def _differs(plain: onnx.ModelProto, fused: onnx.ModelProto, config) -> str | None:
    """Why the fused graph cannot replace the plain one, or None: on sample inputs (a padded row, and
    distances past the maximum distance), its outputs must be finite and within `RELATIVE_TOLERANCE`
    of the plain graph's largest magnitude (padded positions excepted)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # a fused graph that cannot run is refused below, not printed
    inputs = {i.name: helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type) for i in plain.graph.input}
    if set(inputs) - {"input_ids", "attention_mask"} or "input_ids" not in inputs:
        return f"unexpected inputs {sorted(inputs)}"
    try:
        sessions = [ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"])
                    for m in (plain, fused)]
    except Exception as e:  # noqa: BLE001 - ONNX Runtime's untyped errors: a kernel missing on CPU
        return f"ONNX Runtime cannot load it: {str(e).splitlines()[0]}"
    rng = np.random.default_rng(0)
    far = getattr(config, "relative_attention_max_distance", 128) + 22
    worst = 0.0
    for batch, length in (*_SAMPLE_SHAPES, (2, far)):
        ids = rng.integers(0, config.vocab_size, (batch, length))
        mask = np.ones((batch, length), np.int64)
        mask[0, length - length // 3:] = 0  # a padded row
        feed = {"input_ids": ids.astype(inputs["input_ids"])}
        if "attention_mask" in inputs:
            feed["attention_mask"] = mask.astype(inputs["attention_mask"])
        else:
            mask[:] = 1
        try:
            want, got = (s.run(None, feed)[0] for s in sessions)
        except Exception as e:  # noqa: BLE001
            return f"it fails on CPU: {str(e).splitlines()[0]}"
        real = mask.astype(bool)
        if not np.isfinite(got[real]).all():
            return "it gives non-finite outputs"
        worst = max(worst, float(np.abs(want - got)[real].max() / max(np.abs(want[real]).max(), 1e-30)))
    if worst > RELATIVE_TOLERANCE:
        return f"its outputs differ from the plain graph's by {worst:.2g} of their largest magnitude"
    return None
