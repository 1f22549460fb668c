"""fp32 graph -> fp16 or bf16 weights and matrix products, the rest kept in fp32.

Only the matrix products run in half precision (MatMul, Gemm), with the data movement between
them (Reshape, Transpose, Concat, ...: exact in any type) and the embedding lookups. Everything
else (layer norms, residual adds, softmax, activations, masks, biases) stays fp32, and so do the
graph's inputs and outputs: the runtime feeds and reads fp32 as for an fp32 bundle.

T5 is trained in bf16 and its activations overflow fp16: Hugging Face keeps the feed-forward
output projection (`wo`) in fp32 and clamps the residual stream. Here the residual stream is fp32
throughout, and the MatMuls the caller names (`keep`: T5's `wo`) keep fp32 weights and inputs.

A generic converter (onnxruntime.transformers.float16) casts every blocked node's output back to
fp16 and in again, so a residual add would round-trip through fp16 at each layer; this one casts
only where a half tensor meets an fp32 node, once per tensor.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HALF_TYPES = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
_PRODUCTS = {"MatMul", "Gemm"}
# Exact in any element type: a node of these follows its data input into half precision.
_MOVEMENT = {"Reshape", "Transpose", "Concat", "Unsqueeze", "Squeeze", "Identity", "Slice", "Split", "Expand",
             "Flatten", "Gather"}
# T5's feed-forward output projection, as the exporters name it (optimum's "/encoder/block.0/layer.1/
# DenseReluDense/wo/MatMul", lmcor's step graph "/wo_1/MatMul").
T5_FP32_MATMULS = re.compile(r"/wo(_\d+)?/MatMul(_\d+)?$")
# A rotary embedding's angles (inv_freq x position ids, "/model/rotary_emb/MatMul"): in fp16 position
# ids are whole only up to 2048 and in bf16 up to 256, and the angle's error grows with the position
# (0.8 rad at 1024-2048 in fp16); transformers computes them in fp32 too.
ROTARY_MATMULS = re.compile(r"rotary", re.IGNORECASE)
_SUFFIX = "_lmcor_half"
_EXTERNAL_FROM = 1 << 30  # bytes of weights


@dataclass(frozen=True)
class HalfReport:
    half_nodes: int  # matrix products run in half precision
    kept_fp32: int  # matrix products `keep` named, left in fp32
    casts: int  # Cast nodes added


def to_half(source: Path, target: Path, precision: str, *, keep: re.Pattern | None = None) -> HalfReport:
    """Write `source` (an fp32 graph without subgraphs) to `target` with its matrix products in
    `precision` ("fp16" or "bf16"), except those whose node name `keep` matches."""
    model = onnx.load(str(source))
    report = convert(model, HALF_TYPES[precision], keep=keep)
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    # A protobuf holds at most 2 GiB: the weights of a larger model go to one file beside the graph.
    external = {"save_as_external_data": True, "all_tensors_to_one_file": True,
                "location": f"{target.name}.data"} if weights > _EXTERNAL_FROM else {}
    onnx.save(model, str(target), **external)
    return report


def convert(model: onnx.ModelProto, half: int, *, keep: re.Pattern | None = None) -> HalfReport:
    """Convert `model` in place (see the module's docstring); `half` is TensorProto.FLOAT16 or BFLOAT16."""
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        raise ValueError("graphs with subgraphs (If, Loop) are not converted: convert their branches before merging")
    floats = _float_tensors(model)
    initializers = {t.name: t for t in graph.initializer}

    kept_products = {node.output[0] for node in graph.node
                     if node.op_type in _PRODUCTS and keep is not None and keep.search(node.name)}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    @functools.cache
    def only_kept(name: str) -> bool:
        """Whether only kept products read `name`, directly or through data movement and casts (a weight's
        view, T5's unfolded wo.T; a rotary embedding's inv_freq, expanded and cast)."""
        return all((r.op_type in _PRODUCTS and r.output[0] in kept_products)
                   or (r.op_type in _MOVEMENT | {"Cast"} and all(only_kept(o) for o in r.output))
                   for r in readers.get(name, []))

    halves: dict[str, str] = {}  # fp32 tensor name -> the name of its half-precision version
    chosen: set[int] = set()  # indices of the nodes that run in half precision
    kept = 0
    for index, node in enumerate(graph.node):
        data = [name for name in node.input if name in floats]
        if node.op_type in _PRODUCTS:
            if keep is not None and keep.search(node.name):
                kept += 1
                continue
            chosen.add(index)
        elif node.op_type in _MOVEMENT and data and (any(name in halves for name in data) or (
                data[0] in initializers and not all(only_kept(o) for o in node.output))):
            chosen.add(index)  # follows its data into half precision (an embedding lookup: its table)
        else:
            continue
        for name in node.output:
            if name in floats:
                halves[name] = name + _SUFFIX
        for name in data:
            if name in initializers:
                halves.setdefault(name, name + _SUFFIX)  # a weight, stored in half precision below

    casts: list[onnx.NodeProto] = []
    cast_to: dict[tuple[str, int], str] = {}

    def cast(name: str, to: int, output: str | None = None) -> str:
        key = (name, to)
        if key not in cast_to:
            out = output or f"{name}{_SUFFIX}_cast{to}"
            casts.append(helper.make_node("Cast", [name], [out], name=f"{out}/Cast", to=to))
            cast_to[key] = out
        return cast_to[key]

    # Weights first: a half copy of each initializer read in half precision; the fp32 one stays
    # only where an fp32 node still reads it.
    converted = []
    for name, half_name in halves.items():
        if name in initializers:
            converted.append(_half_initializer(initializers[name], half_name, half))
    graph.initializer.extend(converted)

    produced_half = {name for index, node in enumerate(graph.node) if index in chosen for name in node.output if name in floats}
    nodes = []
    for index, node in enumerate(graph.node):
        if index in chosen:
            for i, name in enumerate(node.input):
                if name in floats:
                    node.input[i] = halves[name] if name in halves else cast(name, half)
            for i, name in enumerate(node.output):
                if name in floats:
                    node.output[i] = halves[name]
        else:
            for i, name in enumerate(node.input):
                if name in produced_half:
                    node.input[i] = cast(halves[name], TensorProto.FLOAT, name)
        nodes.append(node)
    for output in graph.output:
        if output.name in produced_half:
            cast(halves[output.name], TensorProto.FLOAT, output.name)
    # Place each cast right after its input's producer, keeping the graph topologically sorted.
    ordered = _insert_casts(graph, nodes, casts)
    del graph.node[:]
    graph.node.extend(ordered)
    still_read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    unused = [t for t in graph.initializer if t.name not in still_read]
    for tensor in unused:
        graph.initializer.remove(tensor)
    del graph.value_info[:]  # stale types; ONNX Runtime infers them again
    return HalfReport(half_nodes=sum(1 for i, n in enumerate(nodes) if i in chosen and n.op_type in _PRODUCTS),
                      kept_fp32=kept, casts=len(casts))


# ONNX Runtime's fused operators in an fp32 T5 encoder (`fusion.py`): onnx's shape inference does not
# know them; each writes its first input's type.
_SAME_TYPE_FUSED = {"Attention", "SkipSimplifiedLayerNormalization", "FastGelu"}


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the graph's fp32 tensors (inputs, initializers, values), from shape inference; the
    outputs of ONNX Runtime's fused operators typed from their inputs, and inference run again past them."""
    with _weights_set_aside(model):
        return _inferred_floats(model)


@contextlib.contextmanager
def _weights_set_aside(model: onnx.ModelProto) -> Iterator[None]:
    """The values of the model's larger weights out of it meanwhile (their names, types and shapes
    stay): shape inference serializes the model, which protobuf cannot past 2 GiB."""
    kept = [(t, t.raw_data) for t in model.graph.initializer if len(t.raw_data) > _SET_ASIDE_BYTES]
    for tensor, _ in kept:
        tensor.ClearField("raw_data")
    try:
        yield
    finally:
        for tensor, data in kept:
            tensor.raw_data = data


_SET_ASIDE_BYTES = 1 << 16  # small ones (shapes, axes) stay: inference reads their values


def _inferred_floats(model: onnx.ModelProto) -> set[str]:
    copied = False
    while True:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        graph = inferred.graph
        values = (*graph.input, *graph.value_info, *graph.output)
        typed = {v.name for v in values if v.type.tensor_type.elem_type} | {t.name for t in graph.initializer}
        floats = {v.name for v in values if v.type.tensor_type.elem_type == TensorProto.FLOAT}
        floats |= {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT}
        untyped = [out for node in graph.node if node.op_type in _SAME_TYPE_FUSED and node.input[0] in floats
                   for out in node.output if out and out not in typed]
        if not untyped:
            break
        if not copied:  # the caller's graph keeps its own value_info; most graphs never get here
            model, copied = onnx.ModelProto.FromString(model.SerializeToString()), True
        model.graph.value_info.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in untyped)
    for node in graph.node:  # a Constant's value, when inference left its output untyped
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == TensorProto.FLOAT:
                    floats.add(node.output[0])
    return floats


def _half_initializer(tensor: TensorProto, name: str, half: int) -> TensorProto:
    values = numpy_helper.to_array(tensor).astype(np.float32)
    if half == TensorProto.FLOAT16:
        largest = float(np.abs(values).max(initial=0.0))
        if largest > float(np.finfo(np.float16).max):  # the weight itself, not an activation, would be infinite
            from lmcor.runtime.errors import ExportError

            raise ExportError(f"the weight {tensor.name!r} holds {largest:.3g}, past fp16's range (65504): "
                              "export bf16 (same range as fp32) or fp32")
        return numpy_helper.from_array(values.astype(np.float16), name)
    out = TensorProto(name=name, data_type=TensorProto.BFLOAT16, dims=values.shape)
    out.raw_data = bfloat16_bits(values).tobytes()
    return out


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns (uint16), rounded to nearest, ties to even (finite values)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _insert_casts(graph: onnx.GraphProto, nodes: list[onnx.NodeProto], casts: Iterable[onnx.NodeProto]) -> list:
    after: dict[str, list[onnx.NodeProto]] = {}
    for node in casts:
        after.setdefault(node.input[0], []).append(node)
    ready = [*(i.name for i in graph.input), *(t.name for t in graph.initializer)]
    ordered = [c for name in ready for c in after.pop(name, [])]
    for node in nodes:
        ordered.append(node)
        for name in node.output:
            ordered.extend(after.pop(name, []))
    # a cast of another cast's output (none expected) or of a Constant: placed once its input exists
    while after:
        placed = {o for n in ordered for o in n.output} | set(ready)
        for name in [n for n in after if n in placed]:
            ordered.extend(after.pop(name))
        if not any(n in placed for n in after) and after:
            raise ValueError(f"cannot place the casts of {sorted(after)[:3]}")
    return ordered


def convert_bundle(source: str | Path, out_dir: str | Path, precision: str, *, overwrite: bool = False):
    """An fp16/bf16 copy of an fp32 corrector bundle with lmcor's ragged decoder, for when its
    checkpoint is not at hand (the GPU check builds its half bundles so). Without the checkpoint
    there is no PyTorch reference: the graphs are checked structurally, the manifest says
    `"validated_on": "not run: converted from an fp32 bundle"`, and agreement is measured by
    running both bundles (`lmcor eval`, bench/gpu_check.py). Returns the new manifest."""
    import dataclasses
    import shutil
    import tempfile

    from lmcor.runtime.bundle import load_manifest, write_manifest
    from lmcor.runtime.errors import ExportError

    from .checkpoint import check_replaceable, parents_made, refuse_overlap, replace_folder
    from .shared_weights import WEIGHTS_FILE, share_weights
    from .validate import check_half_graphs

    source, out_dir = Path(source), Path(out_dir)
    if precision not in HALF_TYPES:
        raise ExportError(f"precision must be one of {tuple(HALF_TYPES)}, got {precision!r}")
    manifest = load_manifest(source, kind="corrector")
    if manifest.precision != "fp32" or manifest.decoder_graph != "ragged":
        raise ExportError(f"{source}: only fp32 bundles with lmcor's ragged decoder (T5 family) are converted, not a "
                          f"{manifest.precision} {manifest.decoder_graph} one; export the checkpoint with --precision")
    if "packed_encoder" in manifest.files:  # as `export --packed-encoder` refuses a half precision
        raise ExportError(f"{source}: its packed encoder's weights are fp32 and would run on CUDA in place of the "
                          "converted encoder; convert a bundle exported without --packed-encoder")
    refuse_overlap(source, out_dir, "bundle")
    check_replaceable(out_dir, overwrite)
    graphs = [manifest.files[role] for role in ("encoder", "decoder", "cross")]
    out_dir = Path(os.path.realpath(out_dir))  # a link's target is replaced, not the link; the staging goes beside it
    with parents_made(out_dir.parent), tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        staged = Path(tmp) / "bundle"
        staged.mkdir()
        counts = {}
        for role, name in manifest.files.items():
            if name in graphs:
                report = to_half(source / name, staged / name, precision, keep=T5_FP32_MATMULS)
                counts[name] = report
            elif name != WEIGHTS_FILE:
                shutil.copy(source / name, staged / name)
        kept = counts[manifest.files["decoder"]].kept_fp32
        if kept != manifest.decoder.num_layers or not counts[manifest.files["encoder"]].kept_fp32:
            raise ExportError(f"{source}: the T5 feed-forward output projections to keep in fp32 were not found by name")
        share_weights(staged, graphs)
        converted = dataclasses.replace(manifest, precision=precision, validation={})
        write_manifest(staged, converted)
        validation = {"validated_on": "not run: converted from an fp32 bundle, without its checkpoint",
                      "converted_from": str(source), **check_half_graphs(staged, graphs, precision),
                      "half_matmuls": sum(r.half_nodes for r in counts.values()),
                      "fp32_matmuls": sum(r.kept_fp32 for r in counts.values())}
        converted = dataclasses.replace(converted, validation=validation)
        write_manifest(staged, converted)
        replace_folder(out_dir, staged, Path(tmp) / "replaced", overwrite=overwrite)
    return converted
