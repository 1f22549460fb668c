"""Drafted decoding on vs off, side by side on one bundle and one data file (`lmcor bench --drafts`).

Both modes run on the same loaded corrector, interleaved request by request (batch-1 latency) and
pass by pass (batch throughput), so machine noise hits both alike. Reported: decoder calls per
generated token (EOS counted, so plain greedy makes 1.00), batch-1 median latency end to end, of
the encoder pass (with the cross-attention keys/values: the same work in both modes, the floor
drafts cannot lower) and of the decoder, throughput at `batch_size` with the mean rows per decoder
call it ran, the share of drafted tokens accepted, and whether the outputs are token-identical
(they must be). Both modes run without the fallback (`fallback_below=0`): it
acts after decoding, alike in both, and would hide the decoded tokens it replaces.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from lmcor.runtime.bundle import Manifest
from lmcor.runtime.corrector import Corrector
from lmcor.runtime.errors import InputError
from lmcor.runtime.jsonl import blank, parse_line
from lmcor.runtime.request import Correction, Request, as_request
from lmcor.runtime.tokens import ModelInput, encode_requests
from tokenizers import Tokenizer

MODES = {"drafts off": False, "drafts on": True}
DECODE_ONLY = {"fallback_below": 0}


@dataclass(frozen=True)
class DraftsConfig:
    data: Path
    bundle: Path | None = None  # None: the shipped default corrector
    requests: int = 200
    rounds: int = 3
    batch_size: int = 8
    threads: int | None = None


def read_requests(path: Path, count: int, *, fit: tuple[Tokenizer, Manifest] | None = None) -> list[Request]:
    """The first `count` requests of a JSONL file. With `fit` (a corrector's tokenizer and manifest),
    a request it cannot read (a source that leaves no room for its candidates) is refused by its
    line before anything runs."""
    if fit is not None:
        return read_inputs(path, count, *fit)[0]
    return [request for _, request in _numbered_requests(path, count)]


def read_inputs(path: Path, count: int, tokenizer: Tokenizer, manifest: Manifest) -> tuple[list[Request],
                                                                                           list[ModelInput]]:
    """The first `count` requests of a JSONL file, and their tokens as the corrector reads them; one
    it cannot read is refused by its line."""
    numbered = _numbered_requests(path, count)
    requests = [request for _, request in numbered]
    inputs = encode_requests(tokenizer, manifest.template, requests, manifest.max_input_tokens)
    for (number, _), encoded in zip(numbered, inputs):
        if isinstance(encoded, InputError):
            raise InputError(f"{path}: line {number}: {encoded}")
    return requests, inputs


def _numbered_requests(path: Path, count: int) -> list[tuple[int, Request]]:
    """The first `count` requests of a JSONL file, with their line numbers."""
    numbered = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if blank(raw, first=number == 1):
                continue
            try:
                numbered.append((number, as_request(parse_line(raw, first=number == 1))))
            except InputError as e:
                raise InputError(f"{path}: line {number}: {e}") from None
            if len(numbered) == count:
                break
    if not numbered:
        raise InputError(f"{path}: no requests")
    return numbered


def run(config: DraftsConfig) -> dict:
    corrector = Corrector.load(config.bundle, threads=config.threads)
    if not corrector.drafts_supported:
        raise InputError(f"{corrector.root}: this bundle's decoder cannot verify drafts (re-export a T5-family model)")
    requests = read_requests(config.data, config.requests, fit=(corrector.tokenizer, corrector.manifest))
    corrector.correct_batch(requests[:4], batch_size=1, **DECODE_ONLY)  # warm-up: first-run allocations
    latency = {name: [] for name in MODES}
    encoder = {name: [] for name in MODES}
    decoder = {name: [] for name in MODES}
    outputs: dict[str, list[Correction]] = {name: [] for name in MODES}
    for n, request in enumerate(requests):
        order = list(MODES) if n % 2 == 0 else list(MODES)[::-1]
        for name in order:
            started = time.perf_counter()
            (result,) = corrector.correct_batch([request], batch_size=1, drafts=MODES[name], **DECODE_ONLY)
            latency[name].append(time.perf_counter() - started)
            encoder[name].append(result.stats.encoder_s)
            decoder[name].append(result.stats.decoder_s)
            outputs[name].append(result)
    throughput = {name: [] for name in MODES}
    rows = {name: [] for name in MODES}
    for r in range(config.rounds):
        for name in (list(MODES) if r % 2 == 0 else list(MODES)[::-1]):
            before, started = corrector.engine.stats, time.perf_counter()
            corrector.correct_batch(requests, batch_size=config.batch_size, drafts=MODES[name], **DECODE_ONLY)
            throughput[name].append(len(requests) / (time.perf_counter() - started))
            used = corrector.engine.stats - before
            rows[name].append(used.rows / used.decoder_calls)
    modes = {}
    for name in MODES:
        results = outputs[name]
        generated = sum(len(r.token_ids) + 1 for r in results)  # + the EOS step
        drafted = sum(r.stats.drafted_tokens for r in results)
        modes[name] = {
            "decoder_calls_per_token": sum(r.stats.decoder_calls for r in results) / generated,
            "batch1_p50_ms": 1000 * statistics.median(latency[name]),
            "batch1_encoder_p50_ms": 1000 * statistics.median(encoder[name]),
            "batch1_decoder_p50_ms": 1000 * statistics.median(decoder[name]),
            "throughput_rps": statistics.median(throughput[name]),
            "throughput_mean_batch": statistics.median(rows[name]),
            "acceptance": sum(r.stats.accepted_tokens for r in results) / drafted if drafted else None,
        }
    off, on = modes["drafts off"], modes["drafts on"]
    identical = sum(a.token_ids == b.token_ids for a, b in zip(outputs["drafts off"], outputs["drafts on"]))
    return {
        "bundle": str(corrector.root),
        "data": str(config.data),
        "requests": len(requests),
        "rounds": config.rounds,
        "batch_size": min(config.batch_size, len(requests)),  # the largest batch that ran
        "threads": config.threads,
        "modes": modes,
        "identical_outputs": identical,
        "ratios": {
            "fewer_decoder_calls": off["decoder_calls_per_token"] / on["decoder_calls_per_token"],
            "batch1_latency": off["batch1_p50_ms"] / on["batch1_p50_ms"],
            "batch1_decoder_latency": off["batch1_decoder_p50_ms"] / on["batch1_decoder_p50_ms"],
            "throughput": on["throughput_rps"] / off["throughput_rps"],
        },
    }


def table(report: dict) -> str:
    b = report["batch_size"]
    rows = [f"{'':<11} {'calls/token':>11} {'batch-1 p50':>12} {'encoder p50':>12} {'decoder p50':>12} "
            f"{f'req/s @{b}':>10} {'accepted':>9}"]
    for name, m in report["modes"].items():
        accepted = "-" if m["acceptance"] is None else f"{100 * m['acceptance']:.0f}%"
        rows.append(f"{name:<11} {m['decoder_calls_per_token']:>11.3f} {m['batch1_p50_ms']:>9.1f} ms "
                    f"{m['batch1_encoder_p50_ms']:>9.1f} ms {m['batch1_decoder_p50_ms']:>9.1f} ms "
                    f"{m['throughput_rps']:>10.1f} {accepted:>9}")
    r = report["ratios"]
    rows.append(f"{'ratio':<11} {r['fewer_decoder_calls']:>10.2f}x {r['batch1_latency']:>11.2f}x {'':>12} "
                f"{r['batch1_decoder_latency']:>11.2f}x {r['throughput']:>9.2f}x")
    rows.append(f"identical outputs: {report['identical_outputs']} of {report['requests']}")
    return "\n".join(rows)
