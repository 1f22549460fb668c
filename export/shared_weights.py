"""Weights that several graphs of a bundle hold byte for byte -> stored once, beside the graphs.

A T5 corrector's encoder and decoder both hold the shared embedding (the decoder also uses it as
its tied output layer): 4 MB of the default corrector's 25. Each such tensor is moved into one
external-data file that every graph using it points at; ONNX Runtime reads it from there for
each session as it would from the graph itself, so the numbers are unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import onnx
from onnx import TensorProto
from onnx.external_data_helper import uses_external_data

WEIGHTS_FILE = "shared_weights.bin"
_SMALLEST = 1 << 12  # bytes: smaller tensors are not worth an indirection
_ALIGN = 4096  # offsets on page boundaries let ONNX Runtime map the file instead of copying it


def share_weights(folder: Path, names: Sequence[str]) -> int:
    """Store each large initializer that more than one of the graphs `names` (in `folder`) holds
    with the same bytes once, in `WEIGHTS_FILE`; rewrite those graphs to point at it. Returns the
    bytes saved (0, and nothing written, when the graphs share nothing or already keep their
    weights outside: graphs over protobuf's 2 GB limit stay as the exporter wrote them)."""
    graphs = {name: onnx.load(str(folder / name), load_external_data=False) for name in names}
    if any(uses_external_data(t) for model in graphs.values() for t in model.graph.initializer):
        return 0
    holders: dict[str, list[TensorProto]] = {}
    for model in graphs.values():
        for tensor in model.graph.initializer:
            if tensor.HasField("raw_data") and len(tensor.raw_data) >= _SMALLEST:
                holders.setdefault(hashlib.sha256(tensor.raw_data).hexdigest(), []).append(tensor)
    shared = [tensors for tensors in holders.values() if len(tensors) > 1]
    if not shared:
        return 0
    saved = sum(len(tensors[0].raw_data) * (len(tensors) - 1) for tensors in shared)
    _store(folder / WEIGHTS_FILE, shared)
    for name, model in graphs.items():
        (folder / name).write_bytes(model.SerializeToString())
    return saved


def _store(path: Path, shared: list[list[TensorProto]]) -> None:
    """Write each group's bytes once, page-aligned, and point every tensor of the group at them."""
    with open(path, "wb") as out:
        for tensors in shared:
            data = tensors[0].raw_data
            offset = -(-out.tell() // _ALIGN) * _ALIGN
            out.write(b"\0" * (offset - out.tell()))
            out.write(data)
            for tensor in tensors:
                tensor.ClearField("raw_data")
                tensor.data_location = TensorProto.EXTERNAL
                del tensor.external_data[:]
                for key, value in (("location", path.name), ("offset", str(offset)), ("length", str(len(data)))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value

