"""`lmcor serve` under load, side by side with what it is built on (`lmcor bench --serve`).

On one data file, cycled: the server (a subprocess on loopback, its engine decoding up to
`batch_size` rows) driven by 1, 4, 16 and 64 concurrent clients (threads with persistent
connections, each sending its next request once answered) for `seconds` each; a second server
deciding one request at a time (`--max-batch 1`); and in this process, the offline
`Corrector.correct_batch` at `batch_size` (the throughput ceiling) and `Corrector.correct` one request
at a time (the latency floor). Both servers run throughout, idle while another point is measured,
and every point's time is cut into `ROUNDS` slices taken in turn, so that the ratios compare what
ran under the same machine conditions. Reported per concurrency: throughput of answered requests, latency
p50/p90/p99, error answers, lost requests (no answer at all), and whether the server's outputs equal
the offline ones; the ratios the server is held to; each server's exit code after SIGTERM (0: it
drained); and a plot of throughput and p99 against concurrency.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from lmcor.runtime.corrector import Corrector
from lmcor.runtime.errors import LmcorError

from .drafts import read_requests
from .harness import cpu_model

REQUEST_TIMEOUT_S = 300.0  # a client's wait for one answer; past it the request counts as lost
START_TIMEOUT_S = 180.0
# What the server is held to at 16 clients (the targets), and at one client.
TARGETS = {"throughput_vs_offline": 0.8, "throughput_vs_one_at_a_time": 2.0, "p99_over_p50": 4.0,
           "single_client_latency_vs_in_process": 1.3}


@dataclass(frozen=True)
class ServeBenchConfig:
    data: Path
    bundle: Path | None = None  # None: the shipped default corrector
    seconds: float = 15.0  # of load at each concurrency
    clients: tuple[int, ...] = (1, 4, 16, 64)
    requests: int = 256  # distinct requests, cycled
    batch_size: int = 16
    threads: int | None = None
    out: Path = Path("bench-out")


def run(config: ServeBenchConfig) -> dict:
    corrector = Corrector.load(config.bundle, threads=config.threads)
    requests = read_requests(config.data, config.requests, fit=(corrector.tokenizer, corrector.manifest))
    bodies = [json.dumps({"id": n, "source": r.source, "candidates": list(r.candidates)}).encode()
              for n, r in enumerate(requests)]
    if threading.current_thread() is not threading.main_thread():
        return _run(config, requests, bodies, corrector)
    previous = signal.signal(signal.SIGTERM, _terminated)  # SIGTERM, as Ctrl-C, stops the servers it started
    try:
        return _run(config, requests, bodies, corrector)
    finally:
        signal.signal(signal.SIGTERM, previous)


# Each point's time runs in this many slices, interleaved with every other point's (their order
# reversed every other round), so that a machine that slows down or speeds up mid-run moves them alike.
ROUNDS = 3
SERVERS = (("server", None, "serve"), ("server, one at a time", 1, "serve-one-at-a-time"))  # None: --batch-size


def _run(config: ServeBenchConfig, requests: list, bodies: list[bytes], corrector: Corrector) -> dict:
    corrector.correct_batch(requests[:4], batch_size=config.batch_size)  # warm-up: first-run allocations
    expected = {n: r.text for n, r in enumerate(corrector.correct_batch(requests, batch_size=config.batch_size))}
    config.out.mkdir(parents=True, exist_ok=True)
    started: dict[str, tuple[subprocess.Popen, str, int, Path]] = {}
    ended: set[str] = set()  # servers that ended before the run did
    try:
        for name, max_batch, stem in SERVERS:
            log = config.out / f"{stem}.stderr.jsonl"  # by server, not batch size: --batch-size 1 gives both 1
            max_batch = max_batch or config.batch_size
            process, url = _start(config, max_batch, log)
            started[name] = (process, url, max_batch, log)
            _drive(url, bodies[:4], expected, 1, 0.0, min_requests=4, server=process)  # warm-up
        share = config.seconds / ROUNDS
        points = [(name, clients) for clients in config.clients for name in started] + ["offline", "in-process"]
        slices: dict = {point: [] for point in points}
        for round_ in range(ROUNDS):
            for point in points if round_ % 2 == 0 else points[::-1]:
                if point == "offline":
                    slices[point].append(_offline(corrector, requests, config, share))
                elif point == "in-process":
                    slices[point].append(_in_process(corrector, requests, share))
                else:
                    process, url, _, _ = started[point[0]]
                    slices[point].append(_drive(url, bodies, expected, point[1], share, server=process))
        ended = {name for name, (process, *_) in started.items() if process.poll() is not None}
    finally:
        codes = dict(zip(started, _stop([process for process, *_ in started.values()])))
    servers = {name: {"max_batch": max_batch, "batches": _batches(log), "exit_code": codes[name],
                      "ended_mid_run": name in ended,
                      "log": str(log), "clients": {str(c): _joined(slices[name, c]) for c in config.clients}}
               for name, (_, _, max_batch, log) in started.items()}
    offline = {"batch_size": min(config.batch_size, len(requests)),  # the largest batch that ran
               "requests_per_s": sum(n for n, _ in slices["offline"]) / sum(t for _, t in slices["offline"])}
    single = _percentiles([t for part in slices["in-process"] for t in part])
    return {
        "data": str(config.data), "bundle": str(corrector.root), "requests": len(requests),
        "seconds": config.seconds, "rounds": ROUNDS, "batch_size": config.batch_size, "threads": config.threads,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "offline": offline, "in_process_single": single, "servers": servers,
        # a server that ended answered nothing after: its points' rates are of the slices it lived
        "ratios": {} if ended else _ratios(offline, single, servers, config),
    }


def _joined(parts: list[dict]) -> dict:
    """One point's slices (`_drive`'s) as one run: its answers over its time, its latencies pooled."""
    elapsed = sum(p["elapsed_s"] for p in parts)
    latencies = [t for p in parts for t in p["latencies"]]
    errors: Counter[str] = Counter()
    for p in parts:
        errors.update(p["errors"])
    return {"answered": len(latencies), "requests_per_s": len(latencies) / elapsed if elapsed else 0.0,
            **_percentiles(latencies), "errors": dict(errors), "lost": sum(p["lost"] for p in parts),
            "identical_outputs": sum(p["identical_outputs"] for p in parts),
            "client_cpu_share": sum(p["client_cpu_s"] for p in parts) / elapsed if elapsed else 0.0}


def _batches(log: Path) -> int | None:
    """The batches a server decoded side by side, as its `ready` log line gives them (None: no such line)."""
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("message") == "ready":
            return entry.get("batches")
    return None


def _terminated(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # through every `finally`: a started server is stopped


def _offline(corrector: Corrector, requests: list, config: ServeBenchConfig, seconds: float) -> tuple[int, float]:
    """`correct_batch` over every request, in passes until `seconds` have gone by: (requests, seconds)."""
    done, started = 0, time.perf_counter()
    while True:
        done += len(corrector.correct_batch(requests, batch_size=config.batch_size))
        if time.perf_counter() - started >= seconds:
            return done, time.perf_counter() - started


def _in_process(corrector: Corrector, requests: list, seconds: float) -> list[float]:
    """`Corrector.correct` one request at a time, for `seconds`: each one's latency."""
    latencies = []
    deadline = time.perf_counter() + seconds
    for r in itertools.cycle(requests):
        started = time.perf_counter()
        corrector.correct(r.source, r.candidates)
        latencies.append(time.perf_counter() - started)
        if time.perf_counter() >= deadline:
            return latencies


def _start(config: ServeBenchConfig, max_batch: int, log: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "lmcor.cli", "serve", "--port", "0", "--max-batch", str(max_batch),
               "--timeout-s", str(REQUEST_TIMEOUT_S)]
    if config.bundle is not None:
        command += ["--model", str(config.bundle)]
    if config.threads is not None:
        command += ["--threads", str(config.threads)]
    env = {k: v for k, v in os.environ.items() if k != "LMCOR_API_KEY"}
    with open(log, "w", encoding="utf-8") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    try:
        return process, _ready(process, log)
    except BaseException:  # a signal while it starts: the server goes too
        _stop([process])
        raise


def _ready(process: subprocess.Popen, log: Path) -> str:
    """The started server's URL, once it answers /health."""
    line = process.stdout.readline()
    if "listening on" not in line:
        raise LmcorError(f"the server did not start: see {log}")
    url = line.split()[-1]
    import httpx

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            raise LmcorError(f"the server did not become ready: see {log}")
        time.sleep(0.05)


def _stop(processes: list[subprocess.Popen]) -> list[int]:
    """SIGTERM to each, then each one's exit code (0: it drained); one that does not stop is killed,
    and so is every one still running when a second signal ends the wait."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    try:
        codes = []
        for process in processes:
            try:
                codes.append(process.wait(timeout=START_TIMEOUT_S))
            except subprocess.TimeoutExpired:
                process.kill()
                codes.append(process.wait())
        return codes
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()


def _drive(url: str, bodies: Sequence[bytes], expected: dict[int, str], clients: int, seconds: float, *,
           min_requests: int = 0, server: subprocess.Popen | None = None) -> dict:
    """`clients` threads, each sending its next request once the last is answered, until `seconds`
    have gone by (and `min_requests` were sent), or the `server` process has ended (its clients would
    spin on refused connections); answers are compared with `expected` (id -> text)."""
    sent = itertools.count()  # next() on it is atomic under the GIL
    ids = [_asked(body) for body in bodies]
    latencies: list[float] = []
    errors: Counter[int] = Counter()
    counts = {"lost": 0, "identical": 0}
    lock = threading.Lock()
    started = time.perf_counter()
    stop_at = started + seconds

    def client() -> None:
        # http.client on one kept-alive connection: the load generator shares the server's cores, and
        # it spends a fraction of httpx's CPU per request.
        host, port = urlsplit(url).hostname, urlsplit(url).port
        connection = http.client.HTTPConnection(host, port, timeout=REQUEST_TIMEOUT_S)
        try:
            while True:
                n = next(sent)
                if time.perf_counter() >= stop_at and n >= min_requests:
                    return
                body, asked = bodies[n % len(bodies)], ids[n % len(bodies)]
                began = time.perf_counter()
                try:
                    connection.request("POST", "/v1/correct", body=body, headers={"Content-Type": "application/json"})
                    response = connection.getresponse()
                    payload = response.read()
                except (OSError, http.client.HTTPException):
                    connection.close()  # reconnects on the next request
                    with lock:
                        counts["lost"] += 1
                    if server is not None and server.poll() is not None:
                        return
                    continue
                took = time.perf_counter() - began
                same = response.status == 200 and _answers(payload, asked, expected)
                with lock:
                    if response.status == 200:
                        latencies.append(took)
                        counts["identical"] += same
                    else:
                        errors[response.status] += 1
        finally:
            connection.close()

    cpu = time.process_time()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"latencies": latencies, "elapsed_s": time.perf_counter() - started,
            "errors": {str(k): v for k, v in errors.items()}, "lost": counts["lost"],
            "identical_outputs": counts["identical"], "client_cpu_s": time.process_time() - cpu}


def _asked(body: bytes) -> object:
    """The id a request body sends (None: none, or not a JSON object)."""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return request.get("id") if isinstance(request, dict) else None


def _answers(payload: bytes, asked: object, expected: dict) -> bool:
    """Whether a 200's body answers the request with id `asked` with its expected output. Any other
    body (not JSON, another id, no output, an id with no expected output) is an answer that differs:
    its client goes on driving."""
    try:
        answer = json.loads(payload)
        return (type(answer["id"]) is type(asked) and answer["id"] == asked and asked in expected
                and answer["output"] == expected[asked])
    except (ValueError, KeyError, TypeError, RecursionError):  # TypeError: not an object, an unhashable id
        return False


def _percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {"p50_ms": None, "p90_ms": None, "p99_ms": None}
    ms = np.asarray(seconds) * 1e3
    return {f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 90, 99)}


def _ratios(offline: dict, single: dict, servers: dict, config: ServeBenchConfig) -> dict:
    batched, one = servers["server"]["clients"], servers["server, one at a time"]["clients"]
    out = {}
    if "16" in batched:
        at16 = batched["16"]
        out["throughput_vs_offline"] = at16["requests_per_s"] / offline["requests_per_s"]
        out["throughput_vs_one_at_a_time"] = at16["requests_per_s"] / max(one["16"]["requests_per_s"], 1e-9)
        out["p99_over_p50"] = at16["p99_ms"] / at16["p50_ms"] if at16["p50_ms"] else None
    if "1" in batched and batched["1"]["p50_ms"]:
        out["single_client_latency_vs_in_process"] = batched["1"]["p50_ms"] / single["p50_ms"]
    return out


def table(report: dict) -> str:
    machine = report["machine"]
    rows = [(f"{report['data']}: {report['requests']} requests cycled, {report['seconds']:g} s per point; "
             f"{machine['cpu']}, {machine['cores']} cores, threads {report['threads'] or 'default'}"),
            (f"{'':<22} {'clients':>7} {'req/s':>7} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'errors':>6} "
             f"{'lost':>5} {'same as offline':>15} {'client CPU':>10}")]
    for name, server in report["servers"].items():
        for clients, r in server["clients"].items():
            p = [f"{r[k]:>8.1f}" if r[k] is not None else f"{'-':>8}" for k in ("p50_ms", "p90_ms", "p99_ms")]
            rows.append(f"{name:<22} {clients:>7} {r['requests_per_s']:>7.1f} {' '.join(p)} "
                        f"{sum(r['errors'].values()):>6} {r['lost']:>5} {r['identical_outputs']:>7} of {r['answered']:<5} "
                        f"{r['client_cpu_share']:>9.0%}")
        rows.append(f"{name:<22} {server['batches']} batch(es) of at most {server['max_batch']} rows in all; "
                    f"exit code after SIGTERM: {server['exit_code']} (0: drained)"
                    + (": it ended mid-run, so no ratios are given" if server["ended_mid_run"] else ""))
    o, s = report["offline"], report["in_process_single"]
    rows.append(f"offline correct_batch at {o['batch_size']}: {o['requests_per_s']:.1f} req/s; in-process correct one "
                f"at a time: p50 {s['p50_ms']:.1f} ms, p99 {s['p99_ms']:.1f} ms")
    for name, value in report["ratios"].items():
        target = TARGETS[name]
        sense = "<=" if name in ("p99_over_p50", "single_client_latency_vs_in_process") else ">="
        met = value is not None and (value <= target if sense == "<=" else value >= target)
        shown = "-" if value is None else f"{value:.2f}"
        rows.append(f"{name}: {shown} (target {sense} {target:g}: {'met' if met else 'NOT met'})"
                    + _out_of_reach(report, name, target))
    return "\n".join(rows)


def _out_of_reach(report: dict, name: str, target: float) -> str:
    """Why a throughput target over the one-at-a-time server cannot be met on this machine, where it
    is above the offline ceiling itself ("" otherwise)."""
    if name != "throughput_vs_one_at_a_time":
        return ""
    one = report["servers"].get("server, one at a time", {}).get("clients", {}).get("16")
    offline = report["offline"]["requests_per_s"]
    if one is None or target * one["requests_per_s"] <= offline:
        return ""
    return (f"; {target:g}x the one-at-a-time server ({target * one['requests_per_s']:.1f} req/s) is above offline "
            f"correct_batch itself ({offline:.1f}) on this machine")


def plot(report: dict, out: Path) -> Path:
    """`serve.png`: throughput and latency (p50, whiskers to p90 and p99) against concurrent clients, for the
    batching server and the one-at-a-time server, with the offline ceiling and the in-process floor."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    for (name, server), colour in zip(report["servers"].items(), ("tab:blue", "tab:orange", "tab:green")):
        points = server["clients"]
        xs = [int(c) for c in points]
        left.plot(xs, [points[c]["requests_per_s"] for c in points], marker="o", color=colour,
                  label=f"{name} ({server['batches']} batch(es), {server['max_batch']} rows at most)")
        p50 = np.array([points[c]["p50_ms"] or np.nan for c in points], dtype=float)
        p90 = np.array([points[c].get("p90_ms") or np.nan for c in points], dtype=float)
        p99 = np.array([points[c]["p99_ms"] or np.nan for c in points], dtype=float)
        right.errorbar(xs, p50, yerr=[np.zeros_like(p50), p99 - p50], marker="o", capsize=3, color=colour,
                       label=f"{name}: p50, whisker to p99")
        right.scatter(xs, p90, marker="_", s=120, color=colour, zorder=3)
    left.axhline(report["offline"]["requests_per_s"], color="gray", linestyle="--",
                 label=f"offline correct_batch at {report['offline']['batch_size']}")
    right.axhline(report["in_process_single"]["p50_ms"], color="gray", linestyle="--",
                  label="in-process correct, p50")
    right.scatter([], [], marker="_", s=120, color="black", label="p90")
    right.set_yscale("log")
    left.set_ylim(bottom=0)
    clients = [int(c) for c in next(iter(report["servers"].values()))["clients"]]
    for ax, ylabel in ((left, "throughput (answered requests / s)"), (right, "latency per request (ms, log scale)")):
        ax.set_xscale("log")  # 1, 4, 16, 64: geometric
        ax.set_xticks(clients, [str(c) for c in clients])
        ax.minorticks_off()
        ax.set_xlabel("concurrent clients (log scale)")
        ax.set_ylabel(ylabel)
        # below the axes, where it covers no point
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=1, frameon=False)
    right.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    machine = report["machine"]
    fig.suptitle(f"lmcor serve: {Path(report['data']).name}, {report['requests']} requests cycled, "
                 f"{report['seconds']:g} s per point, server batch {report['batch_size']}\n"
                 f"{machine['cpu']}, {machine['cores']} cores, ONNX Runtime threads {report['threads'] or 'default'}",
                 fontsize=9)
    fig.tight_layout()
    path = out / "serve.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")  # "tight": the legends below the axes are kept
    plt.close(fig)
    return path
