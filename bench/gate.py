"""The corrector alone vs behind a gate, side by side on one data file (`lmcor bench --gate`).

On lines `{"source", "candidates", "target"}`: the gate's verdicts on the first candidates
(accuracy, how many it passes and how many of those are right), and the corrector alone and
behind the gate in interleaved rounds on the same loaded models (so that machine noise hits both
alike): exact match, chrF, wall time (the fastest round) and the share of time the gate saves.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lmcor.runtime.bundle import shipped_bundle
from lmcor.runtime.classifier import Classifier, passing_threshold, right_probabilities
from lmcor.runtime.corrector import Corrector
from lmcor.runtime.errors import InputError

from .quality import Item, fit, read_items, score


@dataclass(frozen=True)
class GateConfig:
    data: Path
    gate: Path | None = None  # None: the gate shipped with lmcor
    bundle: Path | None = None  # the corrector; None: the shipped default
    threshold: float | None = None  # None: the gate's calibrated threshold, else 0.5
    requests: int = 1000
    rounds: int = 3
    batch_size: int = 16
    threads: int | None = None


def run(config: GateConfig) -> dict:
    items, errors = read_items(config.data)
    if errors:
        first = errors[0]
        raise InputError(f"{config.data}: line {first['line']}: {first['error']}")
    if not items:
        raise InputError(f"{config.data}: no requests")
    gate = Classifier.load(config.gate or shipped_bundle("gate"), threads=config.threads)
    corrector = Corrector.load(config.bundle, threads=config.threads)
    items, unfit = fit(corrector, items[: config.requests])
    if unfit:
        raise InputError(f"{config.data}: line {unfit[0]['line']}: {unfit[0]['error']}")
    report = compare(gate, corrector, items, passing_threshold(gate, config.threshold),
                     rounds=config.rounds, batch_size=config.batch_size)
    return {"bundle": str(corrector.root), "gate_bundle": str(gate.root), "data": str(config.data),
            "batch_size": min(config.batch_size, len(items)), **report}  # the largest batch that ran


def compare(gate: Classifier, corrector: Corrector, items: Sequence[Item], threshold: float, *, rounds: int = 3,
            batch_size: int = 16) -> dict:
    requests = [(i.source, i.candidates) for i in items]
    started = time.perf_counter()
    probabilities = right_probabilities(gate, requests)
    gate_seconds = time.perf_counter() - started
    truth = [i.candidates[0] == i.target for i in items]
    passed = [p is not None and p >= threshold for p in probabilities]  # as the runtime's gate passes
    hits = sum(p and t for p, t in zip(passed, truth))
    systems = {"corrector": {}, "gate + corrector": {"gate": gate, "gate_threshold": threshold}}
    seconds: dict[str, list[float]] = {name: [] for name in systems}
    outputs: dict[str, list[str]] = {}
    for r in range(rounds):
        for name in (list(systems) if r % 2 == 0 else list(systems)[::-1]):
            started = time.perf_counter()
            outputs[name] = [c.text for c in corrector.correct_batch(requests, batch_size=batch_size, **systems[name])]
            seconds[name].append(time.perf_counter() - started)
    targets = [i.target for i in items]
    report = {
        "items": len(items),
        "threshold": threshold,
        "gate": {
            "accuracy": sum(p == t for p, t in zip(passed, truth)) / len(items),
            "passed": sum(passed) / len(items),
            "passed_right": hits / max(1, sum(passed)),  # precision: share of passed ones that were right
            "right_passed": hits / max(1, sum(truth)),  # recall
            "ms_per_request": 1000 * gate_seconds / len(items),
        },
        "systems": {name: {**score(outputs[name], targets), "seconds": min(seconds[name])} for name in systems},
    }
    seconds_of = {name: system["seconds"] for name, system in report["systems"].items()}
    report["time_saved"] = 1 - seconds_of["gate + corrector"] / seconds_of["corrector"]
    return report


def table(report: dict) -> str:
    g = report["gate"]
    rows = [f"gate at threshold {report['threshold']:.2f} on {report['items']} first candidates: passes "
            f"{100 * g['passed']:.1f}%, {100 * g['passed_right']:.1f}% of them right (accuracy {100 * g['accuracy']:.1f}%, "
            f"recall of right ones {100 * g['right_passed']:.1f}%), {g['ms_per_request']:.2f} ms per request",
            f"{'system':<18} {'exact match':>11} {'chrF':>7} {'seconds':>8}"]
    for name, s in report["systems"].items():
        rows.append(f"{name:<18} {s['exact_match']:>11.2f} {s['chrf']:>7.2f} {s['seconds']:>8.2f}")
    rows.append(f"time saved by the gate: {100 * report['time_saved']:.0f}%")
    return "\n".join(rows)
