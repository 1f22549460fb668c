"""fp32 graph -> int8 weights, each row of the activations quantized on its own.

ONNX Runtime's dynamic quantization gives a MatMul's input one scale for the whole tensor. A
token's result then depends on every other token in the same call: the other requests of its
batch, their padding, and the draft tokens verified with it. Batched and drafted decoding would
no longer reproduce plain greedy decoding, and a request's output would change with its batch
(on the default corrector's test split, 29 of 996 outputs did between batch 1 and batch 8).

So after `quantize_dynamic` has quantized the weights (int8, one scale per tensor), every
`DynamicQuantizeLinear` is replaced by a symmetric quantization of each row (each token, along
the last axis): scale = max |x| / 127, zero point 128. The MatMulInteger that follows is
unchanged, and the scale it is multiplied back with is now one per row, so each row's result is
computed from that row alone, as in CTranslate2's int8. On 2 cores this costs 17-33 us more than
the per-tensor op per quantized input of 90 tokens (256-640 wide).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

_PREFIX = "lmcor_rowq"


def quantize(source: Path, target: Path, **options) -> int:
    """Write `source` with int8 MatMul weights and per-row activation quantization to `target`;
    `options` go to `quantize_dynamic`. Returns how many activations are quantized per row."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # Only MatMul takes a quantized input per row; Gather (embeddings) has no activation to quantize.
    # Fused ops the quantizer knows (Attention, LSTM, ...) would quantize their input per tensor.
    quantize_dynamic(source, target, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gather"], **options)
    model = onnx.load(str(target))
    count = per_row(model)
    onnx.save(model, str(target))
    return count


def per_row(model: onnx.ModelProto) -> int:
    """Replace each per-tensor DynamicQuantizeLinear of `model`'s graph (its outputs keep their names:
    the MatMulInteger it feeds is unchanged, and the Mul that scales the result back broadcasts the
    per-row scale)."""
    graph = model.graph
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    constants = {
        **({"last_axis": np.array([-1], dtype=np.int64)} if opset >= 18 else {}),
        "levels": np.array(127.0, dtype=np.float32),
        "smallest": np.array(np.finfo(np.float32).tiny, dtype=np.float32),  # an all-zero row
        "unit": np.array(1.0, dtype=np.float32),
        "zero_point": np.array(128, dtype=np.uint8),
    }
    name = {key: f"{_PREFIX}_{key}" for key in constants}
    nodes, count = [], 0
    for node in graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            continue
        count += 1
        x, (quantized, scale, zero_point) = node.input[0], node.output
        p = f"{_PREFIX}{count}"

        def op(kind: str, inputs: list[str], output: str, **attributes) -> None:
            nodes.append(helper.make_node(kind, inputs, [output], name=f"{p}_{kind}_{output}", **attributes))

        op("Abs", [x], f"{p}_abs")
        if "last_axis" in name:  # the axes became an input in opset 18
            op("ReduceMax", [f"{p}_abs", name["last_axis"]], f"{p}_max", keepdims=1)
        else:
            op("ReduceMax", [f"{p}_abs"], f"{p}_max", keepdims=1, axes=[-1])
        op("Max", [f"{p}_max", name["smallest"]], f"{p}_range")
        op("Div", [f"{p}_range", name["levels"]], scale)
        op("Div", [name["levels"], f"{p}_range"], f"{p}_inverse")
        op("Mul", [x, f"{p}_inverse"], f"{p}_scaled")
        # Rounds half to even and saturates, in one pass over the row.
        op("QuantizeLinear", [f"{p}_scaled", name["unit"], name["zero_point"]], quantized)
        op("Identity", [name["zero_point"]], zero_point)
    if count:
        graph.initializer.extend(numpy_helper.from_array(value, name[key]) for key, value in constants.items())
        del graph.node[:]
        graph.node.extend(nodes)
        _bias_apart(graph)
    return count


def _bias_apart(graph: onnx.GraphProto) -> None:
    """Each bias added to a MatMulInteger's scaled result, by a Sum. ONNX Runtime fuses MatMulInteger,
    Cast, Mul and an Add of a constant into MatMulIntegerToFloat, whose CPU kernel drops that bias
    when the activations' scale is one per row (1.32: BART's int8 logits came out without their
    biases); a Sum is left out of the fusion, which still takes the rest."""
    producer = {output: node for node in graph.node for output in node.output}
    constants = {t.name for t in graph.initializer}

    def made_by(name: str, *kinds: str) -> bool:
        node = producer.get(name)
        return node is not None and node.op_type == kinds[0] and (
            len(kinds) == 1 or any(made_by(i, *kinds[1:]) for i in node.input))

    for node in graph.node:
        if (node.op_type == "Add" and len(node.input) == 2 and any(i in constants for i in node.input)
                and any(made_by(i, "Mul", "Cast", "MatMulInteger") for i in node.input)):
            node.op_type = "Sum"
