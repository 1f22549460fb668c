"""The host work around ONNX Runtime, compiled core vs Python references (`lmcor bench --host`).

Both implementations run on one loaded corrector, interleaved request by request (batch 1) and pass by
pass (batch `batch_size`), so machine noise hits both alike; so does a third mode, the core with the
ragged decoder's caches kept as device tensors (`resident.ResidentDecoder`, the CUDA layout) on this
device, which shows what that layout costs or gains here. Every ONNX Runtime call is timed (the
encoder, the cross-attention keys/values, the decoder steps); what a request spends outside them is
its host time: parsing, tokenizing, drafting, the logits processors and acceptance, cache
bookkeeping, detokenizing, the fallback. Reported per mode: batch-1 host time per request (median
and mean wall time, the calling thread's CPU time, which a busy machine does not inflate, and the
shares of the decode loop, of tokenizing and of finishing: detokenizing and the fallback), batch
throughput and its ratio to the FLOP bound (the request's linear-layer and attention FLOPs at the
machine's fp32 GEMM peak), where each request's batch time goes (encoder, cross, decoder, host), and
the decoder's padding (fed draft slots no row needed). Outputs must be identical between the modes.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lmcor.runtime import core
from lmcor.runtime.corrector import Corrector
from lmcor.runtime.errors import InputError

from .drafts import read_requests

MODES = {"core": (True, "host"), "references": (False, "host"), "device caches": (True, "device")}  # core, caches
_ROLES = ("encoder", "cross", "decoder")


@dataclass(frozen=True)
class HostConfig:
    data: Path
    bundle: Path | None = None  # None: the shipped default corrector
    requests: int = 100
    rounds: int = 3
    batch_size: int = 16
    threads: int | None = None


class OrtClock:
    """Seconds spent inside each session's runs, and the decoder's fed token slots, while installed."""

    def __init__(self, corrector: Corrector):
        self.seconds = dict.fromkeys(_ROLES, 0.0)
        self.cpu = 0.0  # the calling thread's CPU seconds inside the runs
        self.fed = 0
        self._undo: list[Callable[[], None]] = []
        sessions = corrector.sessions
        for role in _ROLES:
            session = getattr(sessions, role)
            if session is not None:
                for method in ("run", "run_with_iobinding"):
                    self._wrap(session, method, role)

    def _wrap(self, session, method: str, role: str) -> None:
        inner = getattr(session, method)

        def timed(*args, **kwargs):
            if role == "decoder" and method == "run" and len(args) > 1 and "input_ids" in args[1]:
                self.fed += args[1]["input_ids"].size
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[role] += time.perf_counter() - started
                self.cpu += time.thread_time() - cpu

        setattr(session, method, timed)
        self._undo.append(lambda: delattr(session, method))

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def close(self) -> None:
        for undo in self._undo:
            undo()


def linear_params(path: Path) -> tuple[int, int]:
    """The weights an ONNX graph multiplies by (MatMul/Gemm/fused Attention inputs that are
    initializers, through Transpose/Cast/Identity/DequantizeLinear; embeddings read by Gather are not counted), and its
    attention layers (its Softmax and fused Attention nodes)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    sizes = {i.name: int(np.prod(i.dims)) for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    total = 0
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm", "MatMulInteger", "FusedMatMul", "Attention"):
            continue
        for name in node.input[:2]:
            while name not in sizes and name in producer and producer[name].op_type in ("Transpose", "Cast", "Identity",
                                                                                       "DequantizeLinear"):
                name = producer[name].input[0]
            total += sizes.get(name, 0)
    return total, sum(node.op_type in ("Softmax", "Attention") for node in graph.node)


def flops_per_request(corrector: Corrector, input_tokens: float, output_tokens: float) -> float:
    """FLOPs one request needs: linear layers (2 per weight per token) and attention scores and
    mixing (4 per inner dimension per query-key pair and attention layer), the EOS step included.
    Counted on the bundle's own graphs."""
    root, m = corrector.root, corrector.manifest
    inner = m.decoder.num_heads * m.decoder.head_dim
    encoder, encoder_attention = linear_params(root / m.files["encoder"])
    cross = linear_params(root / m.files["cross"])[0] if "cross" in m.files else 0
    decoder = linear_params(root / m.files["decoder"])[0]
    steps = output_tokens + 1
    layers = m.decoder.num_layers  # each with self- and cross-attention
    return (2 * encoder * input_tokens + 4 * encoder_attention * inner * input_tokens**2
            + 2 * cross * input_tokens
            + steps * (2 * decoder + 4 * layers * inner * (input_tokens + steps / 2)))


def run(config: HostConfig) -> dict:
    corrector = Corrector.load(config.bundle, threads=config.threads)
    if core.built() is None:
        raise InputError("lmcor's compiled core is not built: nothing to compare (reinstall lmcor with a C++17 compiler)")
    requests = read_requests(config.data, config.requests, fit=(corrector.tokenizer, corrector.manifest))
    previous, caches = core.native, os.environ.get("LMCOR_CACHES")
    clock = OrtClock(corrector)
    try:
        return _measure(corrector, requests, config, clock)
    finally:
        clock.close()
        core.native = previous
        os.environ.pop("LMCOR_CACHES", None)
        if caches is not None:
            os.environ["LMCOR_CACHES"] = caches


def _mode(name: str) -> None:
    enabled, caches = MODES[name]
    core.configure(enabled)
    os.environ["LMCOR_CACHES"] = caches  # read by each decoding job the corrector opens


def _measure(corrector: Corrector, requests: list, config: HostConfig, clock: OrtClock) -> dict:
    from .harness import best_peak, machine_peak

    before = machine_peak(config.threads or _threads())  # and again after the timed runs: the best of both
    for name in MODES:  # warm-up: first-run allocations
        _mode(name)
        corrector.correct_batch(requests[:4], batch_size=1)
    host = {name: [] for name in MODES}
    host_cpu = {name: [] for name in MODES}
    loop = {name: [] for name in MODES}
    tokens = {name: [] for name in MODES}  # batch 1: the engine's own stages outside the decode loop
    finish = {name: [] for name in MODES}
    outputs: dict[str, list] = {name: [] for name in MODES}
    for n, request in enumerate(requests):
        for name in (list(MODES) if n % 2 == 0 else list(MODES)[::-1]):
            _mode(name)
            ort_before, cpu_before, stats_before = dict(clock.seconds), clock.cpu, corrector.engine.stats
            started, cpu = time.perf_counter(), time.thread_time()
            (result,) = corrector.correct_batch([request], batch_size=1)
            elapsed = time.perf_counter() - started
            host_cpu[name].append(time.thread_time() - cpu - (clock.cpu - cpu_before))
            used = corrector.engine.stats - stats_before
            host[name].append(elapsed - (clock.total - sum(ort_before.values())))
            loop[name].append(used.decoder_s - (clock.seconds["decoder"] - ort_before["decoder"]))
            tokens[name].append(used.tokenize_s)
            finish[name].append(used.finish_s)
            outputs[name].append(result)
    throughput = {name: [] for name in MODES}
    split = {name: [] for name in MODES}
    padding = {name: [] for name in MODES}
    for r in range(config.rounds):
        for name in (list(MODES) if r % 2 == 0 else list(MODES)[::-1]):
            _mode(name)
            ort_before, fed_before, stats_before = dict(clock.seconds), clock.fed, corrector.engine.stats
            started = time.perf_counter()
            corrector.correct_batch(requests, batch_size=config.batch_size)
            elapsed = time.perf_counter() - started
            used = corrector.engine.stats - stats_before
            throughput[name].append(len(requests) / elapsed)
            spent = {role: clock.seconds[role] - ort_before[role] for role in _ROLES}
            spent["host"] = elapsed - sum(spent.values())
            split[name].append({k: 1e3 * v / len(requests) for k, v in spent.items()})
            needed = used.rows + used.drafted_tokens  # each row's last token and its own draft, per call
            fed = clock.fed - fed_before  # counted where the decoder is fed arrays (not bound in place)
            padding[name].append(1 - needed / fed if fed else None)
    inputs = [len(x.ids) for x in _inputs(corrector, requests)]
    outputs_mean = statistics.mean(r.stats.output_tokens for r in outputs["core"])  # decoded, fallback or not
    flops = statistics.mean(flops_per_request(corrector, n, outputs_mean) for n in inputs)
    machine = best_peak(before, machine_peak(config.threads or _threads()))
    bound = machine["gemm_gflops"] * 1e9 / flops
    modes = {}
    for name in MODES:
        rps = statistics.median(throughput[name])
        modes[name] = {
            "batch1_host_p50_ms": 1e3 * statistics.median(host[name]),
            "batch1_host_mean_ms": 1e3 * statistics.mean(host[name]),
            "batch1_host_cpu_p50_ms": 1e3 * statistics.median(host_cpu[name]),
            "batch1_decode_loop_host_p50_ms": 1e3 * statistics.median(loop[name]),
            "batch1_tokenize_p50_ms": 1e3 * statistics.median(tokens[name]),
            "batch1_finish_p50_ms": 1e3 * statistics.median(finish[name]),
            "throughput_rps": rps,
            "vs_flop_bound": rps / bound,
            "batch_ms_per_request": {k: statistics.median(s[k] for s in split[name]) for k in split[name][0]},
            "decoder_padding": None if None in padding[name] else statistics.median(padding[name]),
        }
    identical = sum(all((a.text, a.token_ids) == (b.text, b.token_ids) for b in others)
                    for a, *others in zip(outputs["core"], *(outputs[n] for n in MODES if n != "core")))
    return {
        "bundle": str(corrector.root),
        "data": str(config.data),
        "requests": len(requests),
        "rounds": config.rounds,
        "batch_size": min(config.batch_size, len(requests)),  # the largest batch that ran
        "threads": config.threads,
        "mean_input_tokens": statistics.mean(inputs),
        "mean_output_tokens": outputs_mean,
        "machine": machine,
        "flop_bound": {"gflop_per_request": flops / 1e9, "requests_per_s": bound, "ms_per_request": 1e3 / bound},
        "modes": modes,
        "identical_outputs": identical,
        "ratios": {"batch1_host": modes["references"]["batch1_host_p50_ms"] / modes["core"]["batch1_host_p50_ms"],
                   "throughput": modes["core"]["throughput_rps"] / modes["references"]["throughput_rps"],
                   "device_caches_throughput": modes["device caches"]["throughput_rps"] / modes["core"]["throughput_rps"]},
    }


def _inputs(corrector: Corrector, requests: list) -> list:
    from lmcor.runtime.tokens import encode_requests

    m = corrector.manifest
    return [x for x in encode_requests(corrector.tokenizer, m.template, requests, m.max_input_tokens)
            if not isinstance(x, InputError)]


def _threads() -> int:
    import os

    return os.cpu_count() or 1


def table(report: dict) -> str:
    b, bound = report["batch_size"], report["flop_bound"]
    head = (f"{report['requests']} requests, ~{report['mean_input_tokens']:.0f} input and "
            f"~{report['mean_output_tokens']:.0f} output tokens; machine {report['machine']['gemm_gflops']:.0f} GFLOP/s "
            f"fp32 GEMM; FLOP bound {bound['gflop_per_request']:.2f} GFLOP/request = {bound['requests_per_s']:.0f} req/s")
    columns = (f"{'':<13} {'b1 host p50':>11} {'mean':>7} {'cpu p50':>8} {'loop p50':>9} {'tokens':>7} {'finish':>7} "
               f"{f'req/s @{b}':>10} "
               f"{'of bound':>9} {'enc':>6} {'cross':>6} {'dec':>6} {'host':>6} {'pad':>5}  (ms/request at batch {b})")
    rows = [head, columns]
    for name, m in report["modes"].items():
        t = m["batch_ms_per_request"]
        pad = "-" if m["decoder_padding"] is None else f"{m['decoder_padding']:.0%}"
        rows.append(f"{name:<13} {m['batch1_host_p50_ms']:>8.3f} ms {m['batch1_host_mean_ms']:>7.3f} {m['batch1_host_cpu_p50_ms']:>8.3f} "
                    f"{m['batch1_decode_loop_host_p50_ms']:>9.3f} {m['batch1_tokenize_p50_ms']:>7.3f} "
                    f"{m['batch1_finish_p50_ms']:>7.3f} {m['throughput_rps']:>10.1f} {m['vs_flop_bound']:>8.0%} "
                    f"{t['encoder']:>6.2f} {t['cross']:>6.2f} {t['decoder']:>6.2f} {t['host']:>6.2f} "
                    f"{pad:>5}")
    r = report["ratios"]
    rows.append(f"core vs references: batch-1 host time {r['batch1_host']:.2f}x lower, throughput {r['throughput']:.2f}x; "
                f"device caches vs host arrays: throughput {r['device_caches_throughput']:.2f}x")
    rows.append(f"identical outputs (all modes): {report['identical_outputs']} of {report['requests']}")
    return "\n".join(rows)
