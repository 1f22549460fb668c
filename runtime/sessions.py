"""ONNX Runtime sessions: provider choice and session options, shared by every model kind."""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from .errors import BundleError

log = logging.getLogger("lmcor")

# Warnings of ONNX Runtime's own logger (e.g. about unused initializers) are noise for users.
_ORT_LOG_ERRORS_ONLY = 3


@functools.lru_cache(maxsize=1)
def cuda_device_count() -> int:
    """Number of CUDA devices the driver reports; 0 without a driver. Silent by design."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def default_providers() -> list[str]:
    """CUDA when this ONNX Runtime build has it and a device is really there, else CPU."""
    if "CUDAExecutionProvider" in ort.get_available_providers() and cuda_device_count() > 0:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(path: Path, *, providers: Sequence[str] | None = None, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = _ORT_LOG_ERRORS_ONLY
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    # A corrector runs its sessions one after another (encoder, cross-attention, decoder steps; a
    # gate before them). A pool left spinning after its run takes the cores from the next session's
    # threads: stopping it at the end of each run made batch-8 throughput 1.8x on 2 cores.
    options.add_session_config_entry("session.force_spinning_stop", "1")
    wanted = list(providers) if providers else default_providers()
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=wanted)
    except Exception as e:  # ONNX Runtime raises its own untyped errors for unreadable models
        raise BundleError(f"{path}: ONNX Runtime cannot load this model ({str(e).splitlines()[0]})") from None
    if providers and session.get_providers()[0] != wanted[0]:
        log.warning("%s: asked for %s, running on %s", path.name, wanted[0], session.get_providers()[0])
    return session


@dataclass(frozen=True)
class Sessions:
    encoder: ort.InferenceSession
    decoder: ort.InferenceSession
    cross: ort.InferenceSession | None = None  # ragged decoders: encoder states -> cross-attention keys/values

    @property
    def device(self) -> str:
        """IOBinding device name for the decoder's tensors."""
        return "cuda" if self.decoder.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
