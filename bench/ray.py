"""lmcor on Ray against lmcor alone, in one run (`python -m lmcor.bench.ray`; needs the ray and
bench extras).

On `requests` requests from one data file (cycled, each with its own id), on one local Ray cluster
started here:
- batch: `lmcor correct` against `lmcor correct --ray` with 1 and 2 workers (the machine's cores
  shared out as ONNX Runtime threads), each timed from the command's start to its last record
  written (bundles loaded and Ray Data's actors started inside that time; the cluster's own start
  is reported apart), and each output compared with the plain one byte for byte;
- serving: `lmcor serve` (a subprocess) against Ray Serve with 1 and 2 replicas, each driven by
  `clients` concurrent clients for `seconds` (`bench.serve`'s driver): requests/s, p50/p99
  latency, errors, lost requests, outputs equal to the offline ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lmcor.cli.bench import MAX_CLIENTS, MAX_SECONDS
from lmcor.recipes import command_line
from lmcor.runtime.corrector import Corrector
from lmcor.runtime.errors import InputError
from lmcor.runtime.options import MAX_BATCH_SIZE, check_int

from . import serve as serve_bench
from .drafts import read_requests
from .harness import cpu_model

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "recipes" / "splits" / "test.jsonl"
SIZES = (1, 2)  # workers, replicas


@dataclass(frozen=True)
class RayBenchConfig:
    data: Path = DEFAULT_DATA
    requests: int = 512
    seconds: float = 15.0  # of load on each server
    clients: int = 16
    batch_size: int = 16
    out: Path = Path("bench-out")


def _jsonl(config: RayBenchConfig, folder: Path, corrector: Corrector) -> tuple[Path, list[bytes]]:
    """The requests, each refused by its line if the corrector cannot read it, before anything runs."""
    requests = read_requests(config.data, config.requests, fit=(corrector.tokenizer, corrector.manifest))
    bodies = [json.dumps({"id": n, "source": requests[n % len(requests)].source,
                          "candidates": list(requests[n % len(requests)].candidates)}).encode()
              for n in range(config.requests)]
    path = folder / "requests.jsonl"
    path.write_bytes(b"\n".join(bodies) + b"\n")
    return path, bodies


def _batch(config: RayBenchConfig, path: Path, folder: Path) -> dict:
    from lmcor.cli import main

    runs: dict[str, dict] = {}
    plain = folder / "plain.jsonl"
    for name, extra in [("lmcor correct", [])] + [(f"--ray, {k} worker{'s' * (k > 1)}", ["--ray", "--workers", str(k)])
                                                 for k in SIZES]:
        out = folder / f"{len(runs)}.jsonl"
        started = time.perf_counter()
        code = main(["correct", str(path), "-o", str(out), "-q", "--batch-size", str(config.batch_size), *extra])
        seconds = time.perf_counter() - started
        if code != 0:
            raise SystemExit(f"lmcor correct {' '.join(extra)} exited {code}")
        if not extra:
            out.replace(plain)
            out = plain
        runs[name] = {"seconds": seconds, "requests_per_s": config.requests / seconds,
                      "identical_to_plain": out.read_bytes() == plain.read_bytes()}
    return runs


def _serving(config: RayBenchConfig, bodies: list[bytes], expected: dict[int, str], folder: Path) -> dict:
    from lmcor.integrations import ray as lmcor_ray
    from lmcor.server.config import ServeConfig

    runs: dict[str, dict] = {}
    settings = serve_bench.ServeBenchConfig(data=config.data, batch_size=config.batch_size)
    process, url = serve_bench._start(settings, config.batch_size, folder / "serve.log")
    try:
        runs["lmcor serve"] = serve_bench._drive(url, bodies, expected, config.clients, config.seconds)
    finally:
        serve_bench._stop([process])
    for k in SIZES:
        with lmcor_ray.running(ServeConfig(port=0, max_batch=config.batch_size, timeout_s=300), replicas=k) as url:
            runs[f"Ray Serve, {k} replica{'s' * (k > 1)}"] = serve_bench._drive(url, bodies, expected, config.clients,
                                                                               config.seconds)
    return runs


def run(config: RayBenchConfig) -> dict:
    import ray

    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        corrector = Corrector.load()
        path, bodies = _jsonl(config, folder, corrector)
        requests = [json.loads(b) for b in bodies]
        expected = {r["id"]: c.text for r, c in zip(requests, corrector.correct_batch(
            requests, batch_size=config.batch_size))}
        started = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False, logging_level="warning")
        cluster_s = time.perf_counter() - started
        try:
            batch = _batch(config, path, folder)
            serving = _serving(config, bodies, expected, folder)
        finally:
            ray.shutdown()
    return {"data": str(config.data), "requests": config.requests, "batch_size": config.batch_size,
            "clients": config.clients, "seconds": config.seconds, "cluster_start_s": cluster_s,
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average": os.getloadavg()},
            "batch": batch, "serving": serving}


def table(report: dict) -> str:
    machine = report["machine"]
    rows = [f"{Path(report['data']).name}: {report['requests']} requests, batch {report['batch_size']}; "
            f"{machine['cpu']}, {machine['cores']} cores, load average {machine['load_average'][0]:.1f}; "
            f"local Ray cluster started in {report['cluster_start_s']:.1f} s (not counted below)",
            "", f"{'batch job':<28} {'seconds':>8} {'req/s':>7} {'vs plain':>8} {'output':>10}"]
    base = report["batch"]["lmcor correct"]["requests_per_s"]
    for name, r in report["batch"].items():
        rows.append(f"{name:<28} {r['seconds']:>8.1f} {r['requests_per_s']:>7.1f} {r['requests_per_s'] / base:>7.2f}x "
                    f"{'identical' if r['identical_to_plain'] else 'DIFFERENT':>10}")
    rows += ["", f"{'server, ' + str(report['clients']) + ' clients':<28} {'req/s':>7} {'vs plain':>8} {'p50 ms':>8} "
             f"{'p99 ms':>8} {'errors':>6} {'lost':>5} {'same as offline':>15}"]
    base = report["serving"]["lmcor serve"]["requests_per_s"]
    for name, r in report["serving"].items():
        rows.append(f"{name:<28} {r['requests_per_s']:>7.1f} {r['requests_per_s'] / base:>7.2f}x {r['p50_ms']:>8.1f} "
                    f"{r['p99_ms']:>8.1f} {sum(r['errors'].values()):>6} {r['lost']:>5} "
                    f"{r['identical_outputs']:>7} of {r['answered']:<5}")
    return "\n".join(rows)


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmcor.bench.ray", description=__doc__.split("\n\n")[0])
    d = RayBenchConfig()
    parser.add_argument("--data", type=Path, default=d.data, help="JSONL correction requests (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=d.requests, help="(default: %(default)s)")
    parser.add_argument("--seconds", type=float, default=d.seconds, help="of load on each server (default: %(default)s)")
    parser.add_argument("--clients", type=int, default=d.clients, help="concurrent clients (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    parser.add_argument("--out", type=Path, default=d.out, help="folder of ray.json (default: %(default)s)")
    args = parser.parse_args(argv)
    for flag, value, least, most in (("--requests", args.requests, 1, None), ("--clients", args.clients, 1, MAX_CLIENTS),
                                     ("--batch-size", args.batch_size, 1, MAX_BATCH_SIZE)):
        check_int(flag, value, least, most)
    if not 0 < args.seconds <= MAX_SECONDS:  # `lmcor bench --serve`'s bounds
        raise InputError(f"--seconds must be above 0 and at most {MAX_SECONDS}, got {args.seconds}")
    if not args.data.is_file():
        raise InputError(f"--data {args.data}: no such file (JSONL correction requests)")
    args.out.mkdir(parents=True, exist_ok=True)  # before minutes of measuring: a file there is said now
    config = RayBenchConfig(data=args.data, requests=args.requests, seconds=args.seconds, clients=args.clients,
                            batch_size=args.batch_size, out=args.out)
    report = run(config)
    (config.out / "ray.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(table(report))
    same = all(r["identical_to_plain"] for r in report["batch"].values()) and all(
        not r["errors"] and not r["lost"] and r["identical_outputs"] == r["answered"] for r in report["serving"].values())
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
