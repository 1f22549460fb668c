"""The ragged decoder with its caches on the device (`ResidentDecoder`): for CUDA.

`decode.RaggedDecoder` keeps the cross-attention keys/values and the self-attention cache in host
arrays and feeds them to every step, which on a GPU would copy them to the device and back at each
decoder call. Here they are device tensors (PyTorch's allocator) that ONNX Runtime reads and writes
in place through IOBinding: the encoder states go from the encoder's OrtValue to the cross-attention
graph, its keys/values into the batch's buffers, each step's new keys/values into the cache at each
row's length (one indexed write per layer, `write_rows`), without leaving the device. What crosses
to the host per step is what the host's acceptance reads: the token ids in, the lengths and encoder
mask (small), and the logits out.

Every other piece of bookkeeping (rows joining and leaving, spare room, accepted draft lengths) is
`RaggedDecoder`'s own, so outputs are identical token for token; the tests run this class on the
CPU (`LMCOR_CACHES=device`) against the host one. On the CPU the host layout stays the default: it
measured faster there.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .bundle import DecoderShape
from .decode import RaggedDecoder
from .errors import BundleError
from .sessions import run_bound


class ResidentDecoder(RaggedDecoder):
    """`RaggedDecoder` whose key/value buffers are tensors on `device` ("cuda" or "cpu")."""

    def __init__(self, step: ort.InferenceSession, cross: ort.InferenceSession, shape: DecoderShape, device: str):
        super().__init__(step, cross, shape)
        try:
            import torch
        except ImportError:
            raise BundleError("keeping the decoder's caches on the device needs PyTorch: pip install 'lmcor[kernels]' "
                              "(or LMCOR_CACHES=host)") from None
        self._torch = torch
        self.device = device
        self._where = torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")
        self._outputs = [o.name for o in step.get_outputs()]  # logits, then each cache's new keys/values

    def cross_states(self, hidden: ort.OrtValue) -> list:
        rows, source = hidden.shape()[:2]
        shape = (rows, self.shape.num_heads, source, self.shape.head_dim)
        out = [self._empty(shape) for _ in self._cross]
        io = self.cross_session.io_binding()
        io.bind_ortvalue_input("encoder_hidden_states", hidden)
        for name, tensor in zip(self._cross, out):
            self._bind(io, name, tensor, output=True)
        self._sync()
        run_bound(self.cross_session, io)
        return out

    def _zeros(self, shape: tuple[int, ...]):
        # Cache slots a row has not written are masked, and must hold finite values: zeros.
        return self._torch.zeros(shape, dtype=self._torch.float32, device=self._where)

    def _empty(self, shape: tuple[int, ...]):
        """For a graph output: ONNX Runtime writes every element."""
        return self._torch.empty(shape, dtype=self._torch.float32, device=self._where)

    def _run(self, feed: dict, present_shape: tuple[int, ...]) -> tuple[np.ndarray, list]:
        io = self.session.io_binding()
        presents = [self._empty(present_shape) for _ in self._own]
        held = []  # what IOBinding points into, alive until the run is over
        for name, value in feed.items():
            if isinstance(value, np.ndarray):
                held.append(np.ascontiguousarray(value))
                io.bind_cpu_input(name, held[-1])
            else:
                held.append(value.contiguous())
                self._bind(io, name, held[-1])
        io.bind_output("logits", "cpu")
        for name, tensor in zip(self._outputs[1:], presents):
            self._bind(io, name, tensor, output=True)
        self._sync()
        run_bound(self.session, io)
        return io.get_outputs()[0].numpy(), presents

    def _write(self, presents: list, lengths: np.ndarray, first: int) -> None:
        write_rows(self._cache, presents, lengths, first)

    def reorder(self, rows: np.ndarray) -> None:
        index = self._torch.as_tensor(rows, device=self._where)
        self._cache = [cache[: self.rows].index_select(0, index) for cache in self._cache]
        self.lengths = self.lengths[rows]

    def _bind(self, io: ort.IOBinding, name: str, tensor, *, output: bool = False) -> None:
        """Bind a contiguous float32 tensor in place (ONNX Runtime reads or writes its memory)."""
        args = (name, self.device, 0, np.float32, list(tensor.shape), tensor.data_ptr())
        io.bind_output(*args) if output else io.bind_input(*args)

    def _sync(self) -> None:
        # PyTorch's writes into the buffers run on its stream, ONNX Runtime's reads on its own.
        if self.device == "cuda":
            self._torch.cuda.synchronize()


def write_rows(caches: list, presents: list, lengths: np.ndarray, first: int) -> None:
    """Each row's new keys/values after its `lengths` cached tokens (rows counted from `first`), one
    indexed write per cache: `decode._write_rows` on device tensors."""
    if not presents:
        return
    import torch

    new = presents[0].shape[2]
    where = caches[0].device
    rows = torch.arange(first, first + len(lengths), device=where)[:, None]
    positions = torch.as_tensor(lengths, device=where)[:, None] + torch.arange(new, device=where)
    for cache, present in zip(caches, presents):
        cache[rows, :, positions] = present.permute(0, 2, 1, 3)  # (rows, new) index pairs, then heads
