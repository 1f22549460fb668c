"""packed batch -> encoder states, left on the session's device for the decoder.

Two encoders give the same states: the bundle's ONNX encoder (always there), and, where the bundle
holds its weights and PyTorch with Triton can run, the packed encoder of `kernels/encoder.py`,
which skips the padding of ragged batches. Its states reach ONNX Runtime through DLPack (no copy
on a GPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .batching import pad_batch, plan_batches
from .errors import BundleError
from .sessions import Sessions, run_bound


# On the CPU an encoder pass costs what its padded tokens cost: a batch whose inputs differ in length
# is encoded in sub-batches of at most this much padding, their states put back in one padded batch
# (`batch.join` takes the states of its group at once). On the default corrector at batch 16 the
# encoder's padding went from ~10% of its tokens to ~3%, its time down ~8%; finer cuts (1%, none)
# cost more than they save, in matrix products over fewer rows.
SUB_BATCH_PADDING = 0.05


def encode_batch(sessions: Sessions, packed: PackedEncoder | None, inputs: Sequence[np.ndarray], pad_id: int, *,
                 repeat: int = 1) -> tuple[ort.OrtValue, np.ndarray, int]:
    """The encoder states of token id sequences, right-padded into one batch, its attention mask, and
    the encoder passes it took; the packed encoder's where there is one. Where rows were encoded in
    sub-batches (`SUB_BATCH_PADDING`), the states past a sub-batch's longest row are zeros: padding,
    masked by every attention that reads it."""
    ids, mask = pad_batch(inputs, pad_id)
    if packed is not None:
        return packed(ids, mask, repeat=repeat), mask, 1
    parts = plan_batches([len(x) for x in inputs], len(inputs), SUB_BATCH_PADDING) if sessions.device == "cpu" else []
    if len(parts) <= 1:
        return encode(sessions, ids, mask, repeat=repeat), mask, 1
    hidden = None
    for rows in parts:
        states = encode(sessions, *pad_batch([inputs[r] for r in rows], pad_id)).numpy()
        if hidden is None:
            hidden = np.zeros((len(inputs), ids.shape[1], states.shape[2]), dtype=states.dtype)
        hidden[rows, : states.shape[1]] = states
    return _repeat(ort.OrtValue.ortvalue_from_numpy(hidden), repeat, sessions.device), mask, len(parts)


def encode(sessions: Sessions, input_ids: np.ndarray, attention_mask: np.ndarray, *, repeat: int = 1) -> ort.OrtValue:
    """Run the encoder; with `repeat` > 1 each row is repeated in place (row0 x n, row1 x n...) for beams."""
    io = sessions.encoder.io_binding()
    io.bind_cpu_input("input_ids", input_ids)
    io.bind_cpu_input("attention_mask", attention_mask)
    io.bind_output("last_hidden_state", sessions.device)
    run_bound(sessions.encoder, io)
    return _repeat(io.get_outputs()[0], repeat, sessions.device)


def _repeat(hidden: ort.OrtValue, repeat: int, device: str) -> ort.OrtValue:
    if repeat == 1:
        return hidden
    return ort.OrtValue.ortvalue_from_numpy(np.repeat(hidden.numpy(), repeat, axis=0), device, 0)


class PackedEncoder:
    """The Triton packed encoder over the bundle's `packed_encoder` weights."""

    def __init__(self, path: Path, device: str):
        try:
            import torch
            from lmcor.kernels.encoder import EncoderWeights, encode_packed, unpack
        except ImportError as e:
            raise BundleError(f"the packed encoder needs PyTorch and Triton: pip install 'lmcor[kernels]' ({e})") from None
        if device == "cuda" and not torch.cuda.is_available():  # ONNX Runtime's CUDA, a CPU build of PyTorch
            raise BundleError(f"the packed encoder runs on CUDA through PyTorch, and this PyTorch "
                              f"({torch.__version__}) has no CUDA device: install a CUDA build of PyTorch, or use the "
                              "ONNX encoder")
        self._torch, self._encode, self._unpack = torch, encode_packed, unpack
        self.device = device
        self.weights = EncoderWeights.load(path, device="cuda" if device == "cuda" else "cpu")

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray, *, repeat: int = 1) -> ort.OrtValue:
        torch = self._torch
        where = self.weights.embed.device
        ids = torch.from_numpy(input_ids).to(where)
        lengths = torch.from_numpy(attention_mask.sum(axis=1)).to(where)
        with torch.no_grad():
            packed, cu = self._encode(self.weights, ids, torch.zeros_like(ids), lengths)
            hidden = self._unpack(packed, cu, input_ids.shape[1]).contiguous()
        if self.device == "cuda":
            # ONNX Runtime reads the states on its own stream: PyTorch's kernels must have written them.
            torch.cuda.current_stream().synchronize()
            return _repeat(_from_dlpack(hidden), repeat, self.device)
        return _repeat(ort.OrtValue.ortvalue_from_numpy(hidden.numpy()), repeat, self.device)


def _from_dlpack(tensor) -> ort.OrtValue:
    """An OrtValue over `tensor`'s memory, without a copy. Recent ONNX Runtime (1.31, 1.32) takes the
    tensor itself; earlier ones a DLPack capsule and whether it holds booleans."""
    try:
        return ort.OrtValue.from_dlpack(tensor)
    except TypeError:
        return ort.OrtValue.from_dlpack(tensor.__dlpack__(), False)
