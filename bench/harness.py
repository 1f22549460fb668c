"""`lmcor bench`: lmcor and its peers, side by side, interleaved, in one run.

Every backend gets the same inputs and thread count, and the runs interleave (A B C A B C...),
so the shared, noisy machine slows all of them alike and the ratios between them hold. The run
also measures the machine itself (a large fp32 GEMM, a large memory copy) so that the encoder's
and the decode loop's achieved FLOP/s and bandwidth can be read against what the machine can do.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import platform
import re
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from lmcor.runtime.errors import InputError, LmcorError

from .backends import BACKENDS, Backend, Lmcor, bundle_for
from .workloads import Workload, random_workload, shape_checkpoint, text_workload

log = logging.getLogger("lmcor")


@dataclass
class BenchConfig:
    shape: str = "flan-t5-small"
    model: Path | None = None  # a Hugging Face checkpoint folder; overrides `shape`
    data: Path | None = None  # JSONL correction requests; default: random ids
    backends: tuple[str, ...] = tuple(BACKENDS)
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    requests: int = 8
    rounds: int = 3
    batch_size: int = 8
    source: int = 64
    k: int = 5
    candidate: int = 64
    new_tokens: int = 32
    natural: bool = False  # stop at EOS instead of forcing `new_tokens`
    ragged: bool = False
    sweeps: bool = False  # latency against K and throughput against batch size: minutes more
    out: Path = Path("bench-out")
    cache: Path = Path(os.environ.get("LMCOR_CACHE", Path.home() / ".cache" / "lmcor")) / "bench"

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise InputError(f"unknown backend(s) {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")


def best_peak(*peaks: dict) -> dict:
    """The best of `machine_peak` readings taken at different times: a neighbour's load during one
    reading would otherwise lower the limit and flatter every ratio read against it."""
    return {key: max(p[key] for p in peaks) for key in peaks[0]}


def machine_peak(threads: int) -> dict:
    """fp32 GEMM GFLOP/s and memory copy GB/s of this machine, now, with `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(5))
    src = np.ones(64 * 2**20 // 8)  # 64 MiB: far past the caches
    dst = np.empty_like(src)
    copy = min(_timed(lambda: np.copyto(dst, src)) for _ in range(5))
    return {"gemm_gflops": 2 * 2048**3 / best / 1e9, "copy_gbps": 2 * src.nbytes / copy / 1e9}


# OpenMP runtimes keep their threads spinning after a parallel region (Intel's for 200 ms by default,
# KMP_BLOCKTIME): a backend timed right after PyTorch or CTranslate2 shared the cores with them (in
# one run, lmcor's batch-8 throughput was 0.93x optimum's without the pause, 0.99x with it).
SETTLE_S = 0.25


def _settle() -> None:
    """Before a timed batch: the previous backend's spinning threads have gone to sleep."""
    time.sleep(SETTLE_S)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _model_costs(hf_dir: Path) -> dict:
    """Linear-layer parameters of the encoder, of the decoder's step (lm_head included) and of its
    cross-attention keys and values, which every backend computes once a request (not per step)."""
    import torch
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(hf_dir)
    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(config)

    def linear(module) -> int:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))

    inner = getattr(config, "num_heads", 1) * getattr(config, "d_kv", config.d_model // max(1, getattr(config, "num_heads", 1)))
    cross_kv = sum(m.weight.numel() for name, m in model.get_decoder().named_modules()
                   if isinstance(m, torch.nn.Linear) and _CROSS_KV.search(name))
    return {
        "encoder_params": linear(model.get_encoder()),
        "decoder_params": linear(model.get_decoder()) - cross_kv + model.lm_head.weight.numel(),
        "cross_kv_params": cross_kv,
        "attention_inner": inner,
        "encoder_layers": getattr(config, "num_layers", 0),
        "decoder_layers": getattr(config, "num_decoder_layers", None) or getattr(config, "num_layers", 0),
    }


# The cross-attention key and value projections of T5 and of BART-like decoders.
_CROSS_KV = re.compile(r"(EncDecAttention|encoder_attn)\.(k|v|k_proj|v_proj)$")


def _percentiles(values: list[float]) -> dict:
    ms = np.asarray(values) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean())}


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def load_backends(config: BenchConfig, hf_dir: Path, cache: Path) -> tuple[dict[str, Backend], dict, dict]:
    loaded, info, skipped = {}, {}, {}
    for name in config.backends:
        make, options, package = BACKENDS[name]
        if importlib.util.find_spec(package.split(".")[0]) is None or (
                "." in package and importlib.util.find_spec(package) is None):
            skipped[name] = f"{package} is not installed (pip install 'lmcor[bench]')"
            continue
        before, start = _rss_mb(), time.perf_counter()
        try:
            loaded[name] = make(hf_dir, cache, config.threads, **options)
        except Exception as e:  # a peer that cannot run this model is reported, not fatal
            said = str(e).splitlines()[0][:200] if str(e).strip() else type(e).__name__
            if make is Lmcor:  # lmcor is what is compared: without it there is no comparison
                raise LmcorError(f"{name} failed to load: {said}") from e
            skipped[name] = f"failed to load: {said}"
            continue
        # What loading added (memory freed meanwhile, an earlier backend's garbage, can make it look negative).
        info[name] = {"load_s": time.perf_counter() - start, "rss_mb": max(0.0, _rss_mb() - before)}
    return loaded, info, skipped


def _workload(config: BenchConfig, hf_dir: Path, cache: Path, vocab: int, k: int | None = None,
              count: int | None = None) -> Workload:
    count = count or config.requests
    if config.data is not None:
        return text_workload(config.data, bundle_for(hf_dir, cache), count,
                             new_tokens=None if config.natural else config.new_tokens)
    workload = random_workload(vocab, count, source=config.source, k=config.k if k is None else k,
                               candidate=config.candidate, new_tokens=config.new_tokens, ragged=config.ragged)
    return Workload(workload.name, workload.inputs, workload.new_tokens, not config.natural)


def run(config: BenchConfig) -> dict:
    from transformers import AutoConfig

    if config.model is not None:
        hf_dir = Path(config.model)
        cache = config.cache / ("model-" + hashlib.sha256(str(hf_dir.resolve()).encode()).hexdigest()[:12])
    else:
        cache = config.cache / config.shape
        hf_dir = shape_checkpoint(config.shape, cache / "hf")
    vocab = AutoConfig.from_pretrained(hf_dir).vocab_size
    before = machine_peak(config.threads)  # and again after the timed runs: the best of both
    backends, info, skipped = load_backends(config, hf_dir, cache)
    if not backends:
        raise LmcorError("no backend could run: " + "; ".join(f"{name}: {why}" for name, why in skipped.items()))
    workload = _workload(config, hf_dir, cache, vocab)
    costs = _model_costs(hf_dir)
    for backend in backends.values():  # first calls pay one-time costs (allocators, kernel choice)
        backend.generate(workload.inputs[:1], workload.new_tokens[0], workload.forced, 1)

    latencies = {name: [] for name in backends}
    outputs: dict[str, list] = {name: [None] * len(workload.inputs) for name in backends}
    phases = {name: {"encoder_s": 0.0, "decoder_s": 0.0, "calls": 0, "tokens": 0, "input_tokens": 0} for name in backends}
    bar = _progress(config.rounds * len(workload.inputs) * len(backends), "batch-1 latency", "requests")
    for _ in range(config.rounds):
        for i, ids in enumerate(workload.inputs):
            for name, backend in backends.items():
                bar.set_postfix_str(name)
                bar.update(1)
                _settle()
                start = time.perf_counter()
                out = backend.generate([ids], workload.new_tokens[i], workload.forced, 1)
                latencies[name].append(time.perf_counter() - start)
                outputs[name][i] = out.tokens[0]
                if out.encoder_s is not None:
                    p = phases[name]
                    p["encoder_s"] += out.encoder_s
                    p["decoder_s"] += out.decoder_s
                    p["calls"] += out.decoder_calls
                    p["tokens"] += len(out.tokens[0])
                    p["input_tokens"] += len(ids)

    bar.close()
    throughput = {name: [] for name in backends}
    cap = max(workload.new_tokens)
    bar = _progress(config.rounds * len(backends), f"batch-{config.batch_size} throughput", "runs")
    for _ in range(config.rounds):
        for name, backend in backends.items():
            bar.set_postfix_str(name)
            bar.update(1)
            _settle()
            start = time.perf_counter()
            out = backend.generate(workload.inputs, cap, workload.forced, config.batch_size)
            elapsed = time.perf_counter() - start
            throughput[name].append((len(workload.inputs) / elapsed, sum(map(len, out.tokens)) / elapsed))

    bar.close()
    machine = {"cpu": cpu_model(), "threads": config.threads, **best_peak(before, machine_peak(config.threads))}
    reference = "transformers" if "transformers" in backends else next(iter(backends))
    report_backends = {}
    for name in backends:
        entry = dict(info[name])
        entry["latency_ms"] = _percentiles(latencies[name])
        tokens = sum(map(len, outputs[name])) or 1
        entry["ms_per_output_token"] = float(np.median(latencies[name])) * 1e3 * len(outputs[name]) / tokens
        rps, tps = np.median([t[0] for t in throughput[name]]), np.median([t[1] for t in throughput[name]])
        entry["throughput"] = {"batch_size": min(config.batch_size, len(workload.inputs)),  # the largest that ran
                               "requests_per_s": float(rps), "tokens_per_s": float(tps)}
        entry["agreement_with_" + reference] = float(np.mean([a == b for a, b in zip(outputs[name], outputs[reference])]))
        p = phases[name]
        if p["calls"]:
            entry.update(_physical(p, costs, machine, config.rounds, len(workload.inputs),
                                   int8="int8" in name))
        report_backends[name] = entry

    report = {
        "machine": machine,
        "workload": {"name": workload.name, "requests": len(workload.inputs),
                     "mean_input_tokens": float(np.mean([len(x) for x in workload.inputs])),
                     "new_tokens": cap, "fewest_new_tokens": min(workload.new_tokens),  # at batch 1: each its own
                     "forced": workload.forced, "rounds": config.rounds},
        "model": {"path": str(hf_dir), **costs},
        "reference": reference,
        "backends": report_backends,
        "skipped": skipped,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
    }
    if config.sweeps:
        report["sweeps"] = _sweeps(config, hf_dir, cache, vocab, backends)
    report["ratios"] = _ratios(report_backends)
    return report


def _physical(p: dict, costs: dict, machine: dict, rounds: int, requests: int, int8: bool) -> dict:
    """Achieved FLOP/s of the encoder and the decode loop, and the decode loop's weight bandwidth."""
    inner, enc_layers, dec_layers = costs["attention_inner"], costs["encoder_layers"], costs["decoder_layers"]
    mean_in = p["input_tokens"] / (rounds * requests)
    # lmcor's encoder phase ends once each row's cross-attention keys and values are made (a ragged
    # bundle's, T5's: the shapes timed here; a merged decoder makes them in its first call)
    enc_flops = rounds * requests * (2 * (costs["encoder_params"] + costs["cross_kv_params"]) * mean_in
                                     + 4 * enc_layers * inner * mean_in**2)
    mean_out = p["tokens"] / (rounds * requests)
    step_flops = 2 * costs["decoder_params"] + 4 * dec_layers * inner * (mean_in + mean_out / 2)
    weight_bytes = costs["decoder_params"] * (1 if int8 else 4)
    enc_gflops = enc_flops / p["encoder_s"] / 1e9
    dec_gflops = step_flops * p["calls"] / p["decoder_s"] / 1e9
    gbps = weight_bytes * p["calls"] / p["decoder_s"] / 1e9
    return {
        "encoder_ms": p["encoder_s"] / (rounds * requests) * 1e3,
        "decoder_step_ms": p["decoder_s"] / p["calls"] * 1e3,
        "decoder_calls_per_token": p["calls"] / max(1, p["tokens"]),
        "encoder_gflops": enc_gflops,
        "encoder_vs_peak": enc_gflops / machine["gemm_gflops"],
        "decode_gflops": dec_gflops,
        "decode_vs_peak": dec_gflops / machine["gemm_gflops"],
        "decode_weight_gbps": gbps,
        "decode_vs_copy_bandwidth": gbps / machine["copy_gbps"],
    }


def _progress(total: int, stage: str, unit: str):
    """A progress bar on stderr for one stage, naming the backend it is timing (its postfix)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=stage, unit=f" {unit}", file=sys.stderr, leave=False)


def _sweeps(config: BenchConfig, hf_dir: Path, cache: Path, vocab: int, backends: dict[str, Backend]) -> dict:
    """Batch-1 median latency against the number of candidates K, throughput against batch size."""
    latency_vs_k: dict[str, dict[int, float]] = {name: {} for name in backends}
    if config.data is not None:
        log.warning("--sweeps: latency against K needs random requests (--data's have their own K); only "
                    "throughput against batch size is swept")
    else:
        for k in (1, 3, 5, 8):
            workload = _workload(config, hf_dir, cache, vocab, k=k, count=3)
            samples = {name: [] for name in backends}
            for i, ids in enumerate(workload.inputs):
                for name, backend in backends.items():
                    _settle()
                    start = time.perf_counter()
                    backend.generate([ids], workload.new_tokens[i], workload.forced, 1)
                    samples[name].append(time.perf_counter() - start)
            for name in backends:
                latency_vs_k[name][k] = float(np.median(samples[name]) * 1e3)
    throughput_vs_batch: dict[str, dict[int, float]] = {name: {} for name in backends}
    workload = _workload(config, hf_dir, cache, vocab, count=16)
    for batch in (1, 4, 16):
        for name, backend in backends.items():
            _settle()
            start = time.perf_counter()
            backend.generate(workload.inputs, max(workload.new_tokens), workload.forced, batch)
            throughput_vs_batch[name][batch] = len(workload.inputs) / (time.perf_counter() - start)
    return {"latency_vs_k_ms": latency_vs_k, "throughput_vs_batch_rps": throughput_vs_batch}


def _ratios(backends: dict) -> dict:
    """lmcor against the best peer: batch-1 p50 latency (peer / lmcor) and throughput (lmcor / peer)."""
    ours = {n: b for n, b in backends.items() if n.startswith("lmcor")}
    peers = {n: b for n, b in backends.items() if not n.startswith("lmcor")}
    if not ours or not peers:
        return {}
    best_latency = min(peers, key=lambda n: peers[n]["latency_ms"]["p50"])
    best_throughput = max(peers, key=lambda n: peers[n]["throughput"]["requests_per_s"])
    out = {}
    for name, b in ours.items():
        out[name] = {
            "best_peer_latency": best_latency,
            "latency_speedup": peers[best_latency]["latency_ms"]["p50"] / b["latency_ms"]["p50"],
            "best_peer_throughput": best_throughput,
            "throughput_speedup": b["throughput"]["requests_per_s"] / peers[best_throughput]["throughput"]["requests_per_s"],
        }
    return out


def _lengths(workload: dict) -> str:
    """The output lengths: one, or (`--ragged`) each request's own at batch 1 and the longest in batches."""
    fewest, most = workload["fewest_new_tokens"], workload["new_tokens"]
    return str(most) if fewest == most else f"{fewest}-{most} (batch 1; {most} in batches)"


def table(report: dict) -> str:
    w = report["workload"]
    head = (f"{w['name']}, {w['requests']} requests x {w['rounds']} rounds, ~{w['mean_input_tokens']:.0f} input tokens, "
            f"{'forced ' if w['forced'] else 'up to '}{_lengths(w)} new tokens; "
            f"{report['machine']['threads']} threads; machine: {report['machine']['gemm_gflops']:.0f} GFLOP/s fp32 GEMM, "
            f"{report['machine']['copy_gbps']:.1f} GB/s copy")
    batch = next(iter(report["backends"].values()))["throughput"]["batch_size"]
    rows = [head, f"{'backend':<14}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}{'ms/token':>10}"
                  f"{'req/s@' + str(batch):>10}{'agree':>7}{'load s':>8}{'RSS MB':>8}"]
    for name, b in report["backends"].items():
        lat = b["latency_ms"]
        agree = next(v for k, v in b.items() if k.startswith("agreement_with_"))
        rows.append(f"{name:<14}{lat['p50']:>9.1f}{lat['p90']:>9.1f}{lat['p99']:>9.1f}{b['ms_per_output_token']:>10.2f}"
                    f"{b['throughput']['requests_per_s']:>10.2f}{agree:>7.0%}{b['load_s']:>8.2f}{b['rss_mb']:>8.0f}")
    for name, b in report["backends"].items():
        if "encoder_ms" in b:
            rows.append(f"{name}: encoder {b['encoder_ms']:.1f} ms ({b['encoder_vs_peak']:.0%} of GEMM peak), decoder step "
                        f"{b['decoder_step_ms']:.2f} ms ({b['decode_weight_gbps']:.1f} GB/s of weights, "
                        f"{b['decode_vs_copy_bandwidth']:.0%} of copy bandwidth), "
                        f"{b['decoder_calls_per_token']:.2f} decoder calls per output token")
    for name, r in report.get("ratios", {}).items():
        rows.append(f"{name}: batch-1 p50 {r['latency_speedup']:.2f}x vs {r['best_peer_latency']}, "
                    f"throughput {r['throughput_speedup']:.2f}x vs {r['best_peer_throughput']}")
    for name, why in report["skipped"].items():
        rows.append(f"skipped {name}: {why}")
    return "\n".join(rows)


def plots(report: dict, out: Path) -> list[Path]:
    """`latency.png` (batch-1 p50 per backend, whiskers to p90 and p99) and, with `--sweeps`,
    `latency_vs_k.png` and `throughput_vs_batch.png`; each titled with its workload, machine and threads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    names = list(report["backends"])
    title = _plot_title(report)
    written = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    lat = [report["backends"][n]["latency_ms"] for n in names]
    p50 = [x["p50"] for x in lat]
    ax.bar(names, p50, color="tab:blue", label="p50")
    ax.errorbar(names, p50, yerr=[[0] * len(names), [x["p99"] - x["p50"] for x in lat]], fmt="none", ecolor="black",
                capsize=4, label="whisker: p50 to p99")
    ax.scatter(names, [x["p90"] for x in lat], marker="_", s=200, color="black", zorder=3, label="p90")
    ax.set_ylabel("batch-1 latency per request (ms)")
    ax.set_xlabel("backend")
    ax.tick_params(axis="x", labelrotation=20)
    ax.set_title(title, fontsize=8)
    _legend_outside(ax)
    written.append(_save(fig, out / "latency.png"))
    for key, xlabel, ylabel, name in (
            ("latency_vs_k_ms", "candidates per request K", "batch-1 latency, median (ms)", "latency_vs_k.png"),
            ("throughput_vs_batch_rps", "batch size (requests, log scale)", "throughput (requests / s)",
             "throughput_vs_batch.png")):
        series = report.get("sweeps", {}).get(key, {})
        if not any(series.values()):
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        xs_all: set[int] = set()
        for backend, points in series.items():
            xs = sorted(int(x) for x in points)
            xs_all.update(xs)
            centre, low, high = zip(*(_spread(points.get(str(x), points.get(x))) for x in xs))
            if any(v is not None for v in low):  # repeats recorded: whiskers from their min to max
                yerr = [[c - (lo if lo is not None else c) for c, lo in zip(centre, low)],
                        [(hi if hi is not None else c) - c for c, hi in zip(centre, high)]]
                ax.errorbar(xs, centre, yerr=yerr, marker="o", capsize=3, label=f"{backend} (whiskers: min to max)")
            else:
                ax.plot(xs, centre, marker="o", label=backend)
        ticks = sorted(xs_all)
        if key == "throughput_vs_batch_rps":  # batch sizes grow geometrically
            ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.set_title(title, fontsize=8)
        _legend_outside(ax)
        written.append(_save(fig, out / name))
    return written


def _plot_title(report: dict) -> str:
    """Workload on the first line; CPU model, cores and threads on the second."""
    w, machine = report["workload"], report["machine"]
    workload = (f"{w['name']}: {w['requests']} requests x {w['rounds']} rounds, ~{w['mean_input_tokens']:.0f} input "
                f"tokens, {'forced ' if w['forced'] else 'up to '}{_lengths(w)} new tokens")
    cpu = machine.get("cpu_model") or machine.get("cpu") or cpu_model()
    cores = machine.get("cores") or os.cpu_count()
    return f"{workload}\n{cpu}, {cores} cores, {machine['threads']} threads per backend"


def cpu_model() -> str:
    """This machine's CPU, for reports and plot titles."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _spread(point) -> tuple[float, float | None, float | None]:
    """A sweep point as (centre, low, high): a number (one value), a list of repeats (median, min, max) or a
    dict with `p50`/`median` and optional `min`/`max`."""
    if isinstance(point, dict):
        centre = point.get("p50", point.get("median"))
        return float(centre), point.get("min"), point.get("max")
    if isinstance(point, (list, tuple)):
        values = np.asarray(point, dtype=float)
        return float(np.median(values)), float(values.min()), float(values.max())
    return float(point), None, None


def _legend_outside(ax) -> None:
    """The legend right of the axes, where it covers no point."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize=8)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": the legend outside the axes is kept
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def write(report: dict, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "bench.json"
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return path
