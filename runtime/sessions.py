"""ONNX Runtime sessions: provider choice and session options, shared by every model kind, and the
check of a bundle's graphs against its manifest."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import json
import logging
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort

from . import core, pages
from .bundle import MANIFEST_NAME, Manifest
from .errors import BundleError, InputError
from .options import check_providers, check_threads

log = logging.getLogger("lmcor")

# Warnings of ONNX Runtime's own logger (e.g. about unused initializers) are noise for users.
_ORT_LOG_ERRORS_ONLY = 3
_PRINTS = threading.Lock()  # held while a session's start swaps sys.stdout (`open_session`)


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


def known_providers(providers: Sequence[str]) -> None:
    """Refuse a name that is no ONNX Runtime execution provider in any build (a cluster's machines may
    have providers this one lacks, but not ones no build has)."""
    check_providers(providers)
    for name in providers:
        if name not in ort.get_all_providers():
            raise InputError(f"{name!r} is not an ONNX Runtime execution provider (available here: "
                             f"{', '.join(ort.get_available_providers())})")


def usable_providers(providers: Sequence[str]) -> list[str]:
    """The providers of a preference list that this ONNX Runtime build has (the others skipped, with a
    warning: a bundle of several sessions checks its list once, and passes on the usable ones).

    ONNX Runtime answers an unknown name by printing a banner to stdout and falling back to the CPU:
    that is caught here, before it runs."""
    known_providers(providers)
    available = ort.get_available_providers()
    usable = [name for name in providers if name in available]
    if not usable:
        raise InputError(f"none of {', '.join(providers)} is available in this ONNX Runtime build "
                         f"(available: {', '.join(available)})")
    if len(usable) < len(providers):
        log.warning("not in this ONNX Runtime build, skipped: %s", ", ".join(p for p in providers if p not in usable))
    return usable


def with_options(providers: Sequence[str]) -> list:
    """`providers` as ONNX Runtime takes them, with lmcor's options: CUDA multiplies fp32 in full fp32
    (it defaults to TF32, 10 mantissa bits, and an fp32 bundle's tokens on CUDA would not be the CPU's)."""
    return [(name, {"use_tf32": "0"}) if name == "CUDAExecutionProvider" else name for name in providers]


def open_session(path: Path, *, providers: Sequence[str] | None = None, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = _ORT_LOG_ERRORS_ONLY
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    threads = check_threads(threads)
    if threads:
        options.intra_op_num_threads = threads
    # A corrector runs its sessions one after another (encoder, cross-attention, decoder steps; a
    # gate before them). A pool left spinning after its run takes the cores from the next session's
    # threads: stopping it at the end of each run made batch-8 throughput 1.8x on 2 cores.
    options.add_session_config_entry("session.force_spinning_stop", "1")
    # Softmax over a long input leaves many weights below float32's normal range; arithmetic on such
    # denormals is tens of times slower on x86, and they made the encoder's attention 70% of its time.
    # Flushed to zero, they change no result that float32 can tell apart.
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    wanted = usable_providers(providers) if providers is not None else default_providers()
    # ONNX Runtime's Python layer prints a provider that fails to start (a CUDA build without a
    # driver) to stdout, where the CLI writes its results: it goes to the log instead. Only a session
    # with a provider besides the CPU can print, and sys.stdout is the process's: only such a session
    # swaps it, one at a time (two threads' swaps, undone out of order, would leave it swapped).
    printing = any(name != "CPUExecutionProvider" for name in wanted)
    printed = io.StringIO()
    before = pages.mark()
    try:
        with (_PRINTS if printing else contextlib.nullcontext()), \
                (contextlib.redirect_stdout(printed) if printing else contextlib.nullcontext()), \
                core.fp_mode(flush=False):  # the caller's mode, kept
            session = ort.InferenceSession(str(path), sess_options=options, providers=with_options(wanted))
    except Exception as e:  # ONNX Runtime raises its own untyped errors for unreadable models
        if _bundle_precision(path) == "bf16":
            raise BundleError(f"{path.parent}: a bf16 bundle runs on CUDA only (ONNX Runtime's CPU has no bf16 "
                              "kernels): use --providers CUDAExecutionProvider (providers=['CUDAExecutionProvider']) "
                              "with onnxruntime-gpu on a GPU, or export --precision fp16 or fp32 for CPU") from None
        raise BundleError(f"{path}: ONNX Runtime cannot load this model ({str(e).splitlines()[0]})") from None
    finally:
        for line in printed.getvalue().splitlines():
            if line.strip() and not line.startswith("*"):  # not the banner's frame
                log.warning("%s: onnxruntime: %s", path.name, line)
    if providers and session.get_providers()[0] != wanted[0]:
        log.warning("%s: asked for %s, running on %s", path.name, wanted[0], session.get_providers()[0])
    if session.get_providers()[0] == "CPUExecutionProvider":  # on a GPU the weights live on the device
        pages.back_added(before, path.name)
    return session


def default_threads() -> int:
    """ONNX Runtime's default intra-op threads: one per physical core this process may run on (its
    CPU affinity, a core's hyper-threads counted once)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # no affinity on this OS
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topology.joinpath("physical_package_id").read_text().strip(),
                       topology.joinpath("core_id").read_text().strip()))
        except OSError:  # no topology (a container may hide it): each CPU a core
            cores.add(("cpu", str(cpu)))
    return max(len(cores), 1)


def run(session: ort.InferenceSession, outputs: Sequence[str] | None, feed: Mapping) -> list:
    """`session.run`, denormals flushed in the calling thread while it runs (`core.fp_mode`)."""
    with core.fp_mode(flush=True):
        return session.run(outputs, feed)


def raised_by_onnxruntime(error: BaseException) -> bool:
    """Whether `error` is ONNX Runtime's own (what it cannot compute on some inputs), not lmcor's or
    the machine's (a MemoryError, a bug): only the former is an input's to answer for."""
    return type(error).__module__.startswith("onnxruntime")


def run_bound(session: ort.InferenceSession, binding: ort.IOBinding) -> None:
    """`session.run_with_iobinding`, alike."""
    with core.fp_mode(flush=True):
        session.run_with_iobinding(binding)


def _bundle_precision(graph: Path) -> str | None:
    """The `precision` of the manifest beside `graph`, read only to explain a session that fails to
    load (a bf16 graph on the CPU); None when there is no readable manifest."""
    try:
        return json.loads((Path(graph).parent / MANIFEST_NAME).read_text(encoding="utf-8")).get("precision")
    except (OSError, ValueError, AttributeError):
        return None


# The names of the decoder graphs' cached keys and values: lmcor's ragged graphs ("past.0.key",
# "cross.0.key", "present.0.key") and optimum's ("past_key_values.0.key", "past_key_values.0.decoder.key").
_CACHE = re.compile(r"(?:past|past_key_values|present|cross)\.(\d+)\.")


# What each decoder graph of a corrector is fed (`decode.MergedDecoder`, `decode.RaggedDecoder`).
_DECODER_INPUTS = {"merged": {"input_ids", "encoder_hidden_states", "encoder_attention_mask"},
                   "ragged": {"input_ids", "lengths", "encoder_attention_mask"}}

# What the encoder and the cross graph of a corrector are fed (`encode.encode`, `cross_states`).
_ROLE_INPUTS = {"encoder": {"input_ids", "attention_mask"}, "cross": {"encoder_hidden_states"}}


def check_graphs(root: Path, manifest: Manifest, sessions: Mapping[str, ort.InferenceSession | None]) -> None:
    """Check the manifest against the inputs and outputs its graphs declare (by `files` role), so that
    a wrong shape is a BundleError at load and not an ONNX Runtime error in the middle of a batch.
    Dimensions a graph leaves symbolic are not checked."""
    where = root / MANIFEST_NAME
    for role, session in sessions.items():
        if session is None:
            continue
        graph = manifest.files[role]
        # Checksums are kept by file name: one file named in another's role passes them.
        expected = _ROLE_INPUTS.get(role) if manifest.kind == "corrector" else None
        if expected is not None and (names := {value.name for value in session.get_inputs()}) != expected:
            raise BundleError(f"{where}: files.{role}: {graph} takes {', '.join(sorted(names))}, not the {role} "
                              f"graph's {', '.join(sorted(expected))}")
        if role == "encoder":
            continue
        logits = session.get_outputs()[0] if role != "cross" else None  # what the runtime reads
        if manifest.kind == "classifier":
            if logits is not None and isinstance(logits.shape[-1], int) and logits.shape[-1] != len(manifest.labels):
                raise BundleError(f"{where}: labels: {len(manifest.labels)} labels, but {graph} outputs "
                                  f"{logits.shape[-1]} logits")
            continue
        shape = manifest.decoder
        if manifest.kind == "corrector" and role == "decoder":
            names = {value.name for value in session.get_inputs()}
            missing = sorted(_DECODER_INPUTS[manifest.decoder_graph] - names)
            if missing:
                raise BundleError(f"{where}: decoder_graph: {manifest.decoder_graph!r}, but {graph} has no input "
                                  f"{', '.join(missing)} (it is not a {manifest.decoder_graph} decoder)")
        if logits is not None and isinstance(logits.shape[-1], int) and logits.shape[-1] != shape.vocab_size:
            raise BundleError(f"{where}: decoder.vocab_size: {shape.vocab_size}, but {graph} outputs "
                              f"{logits.shape[-1]} logits")
        layers = set()
        for value in (*session.get_inputs(), *session.get_outputs()):
            match = _CACHE.match(value.name)
            if match is None:
                continue
            layers.add(int(match.group(1)))
            if len(value.shape) != 4:  # (batch, heads, length, head_dim)
                continue
            for field, axis in (("num_heads", 1), ("head_dim", 3)):
                declared = value.shape[axis]
                if isinstance(declared, int) and declared != getattr(shape, field):
                    raise BundleError(f"{where}: decoder.{field}: {getattr(shape, field)}, but {graph}'s "
                                      f"{value.name} has {declared}")
        if layers != set(range(shape.num_layers)):
            raise BundleError(f"{where}: decoder.num_layers: {shape.num_layers}, but {graph} holds the keys and "
                              f"values of {len(layers)} layers")


@dataclass(frozen=True)
class Sessions:
    encoder: ort.InferenceSession
    decoder: ort.InferenceSession
    cross: ort.InferenceSession | None = None  # ragged decoders: encoder states -> cross-attention keys/values

    @property
    def device(self) -> str:
        """IOBinding device name for the decoder's tensors."""
        return "cuda" if self.decoder.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
