"""`lmcor bench`: lmcor and its peers side by side, and the side runs (drafts, gate, shared prefix,
host work)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from lmcor.runtime.errors import InputError

from . import options, say


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lmcor.bench.backends import BACKENDS
    from lmcor.bench.harness import BenchConfig
    from lmcor.bench.workloads import SHAPES

    d = BenchConfig()
    parser.add_argument("--shape", choices=sorted(SHAPES), default=d.shape, help="random-init T5 of this shape (default: %(default)s)")
    parser.add_argument("--model", help="Hugging Face checkpoint folder to benchmark instead of --shape")
    parser.add_argument("--data", help="JSONL correction requests (default: random ids shaped by --source/--k/--candidate)")
    parser.add_argument("--backends", default=",".join(d.backends), help="comma-separated, from: " + ", ".join(BACKENDS) + " (default: all)")
    parser.add_argument("--threads", type=options.positive_int, default=d.threads, help="for every backend (default: cores)")
    parser.add_argument("--requests", type=options.positive_int,
                        help=f"default: {d.requests} (--host: 100, --serve: 256)")
    parser.add_argument("--rounds", type=options.positive_int, default=d.rounds,
                        help="timed rounds, interleaved across backends (default: %(default)s)")
    parser.add_argument("--batch-size", type=options.batch_size,
                        help=f"for the throughput run (default: {d.batch_size}; --host and --serve: 16)")
    parser.add_argument("--source", type=options.positive_int, default=d.source, help="source tokens S (default: %(default)s)")
    parser.add_argument("--k", type=options.positive_int, default=d.k, help="candidates K (default: %(default)s)")
    parser.add_argument("--candidate", type=options.positive_int, default=d.candidate, help="tokens per candidate C (default: %(default)s)")
    parser.add_argument("--new-tokens", type=options.positive_int, default=d.new_tokens, help="output tokens N (default: %(default)s)")
    parser.add_argument("--natural", action="store_true", help="stop at EOS instead of forcing N tokens")
    parser.add_argument("--ragged", action="store_true", help="draw every length from [0.5x, 1.5x]")
    parser.add_argument("--sweeps", action="store_true", help="also latency against K and throughput against batch "
                        "size (minutes more)")
    parser.add_argument("--out", default=str(d.out), help="folder for bench.json and the plots (default: %(default)s)")
    parser.add_argument("--cache", default=str(d.cache), help="converted models are kept here (default: %(default)s)")
    parser.add_argument("--drafts", action="store_true",
                        help="instead: drafts on vs off on --bundle over --data (--requests, --rounds, --batch-size)")
    parser.add_argument("--shared-prefix", action="store_true",
                        help="instead: a causal-LM --bundle with a rules prefix run once vs in every prompt")
    parser.add_argument("--gate", nargs="?", const="",
                        help="instead: the corrector (--bundle) alone vs behind this gate (alone: the gate shipped with "
                        "lmcor) over --data lines with targets (--requests, --rounds, --batch-size, --gate-threshold)")
    parser.add_argument("--gate-threshold", type=options.probability,
                        help="with --gate (default: the gate's calibrated threshold)")
    parser.add_argument("--candidates", action="store_true",
                        help="instead: LMCor's candidate generation with a causal-LM --bundle vs transformers generate "
                        "on the same model's --model checkpoint, over --data sources (--requests, --rounds, --batch-size)")
    parser.add_argument("--prompt", help="with --candidates: the LLM's prompt with {source} (default: lmcor "
                        "candidates' few-shot prompt)")
    parser.add_argument("--serve", action="store_true",
                        help="instead: lmcor serve (--bundle) under 1-64 concurrent clients vs the same server one request "
                        "at a time vs offline correct_batch at --batch-size, over --data (default: recipes/splits/"
                        "test.jsonl; --requests distinct ones cycled, default 256; --seconds, --clients, --threads)")
    parser.add_argument("--host", action="store_true",
                        help="instead: the compiled core vs the Python references on --bundle over --data (default: "
                        "recipes/splits/test.jsonl): batch-1 host time outside ONNX Runtime per request, and batch "
                        "throughput against the FLOP bound (--requests default 100, --rounds, --batch-size default 16)")
    parser.add_argument("--seconds", type=_seconds,
                        help=f"with --serve: seconds of load at each concurrency (default: {SECONDS:g})")
    parser.add_argument("--clients", help=f"with --serve: concurrencies (default: {CLIENTS})")
    parser.add_argument("--prefix-tokens", type=options.positive_int, default=500,
                        help="with --shared-prefix: tokens of the rules prefix (default: %(default)s)")
    parser.add_argument("--bundle", help="with --drafts, --gate, --host and --serve: corrector bundle folder (default: the corrector "
                        "shipped with lmcor); with --shared-prefix and --candidates: a causal-LM bundle")


SECONDS, CLIENTS = 15.0, "1,4,16,64"
# The modes that run instead of the peer comparison, and the flags only they read.
MODES = {"--drafts": "drafts", "--shared-prefix": "shared_prefix", "--gate": "gate", "--candidates": "candidates",
         "--serve": "serve", "--host": "host"}
ONLY = {"--gate-threshold": ("gate_threshold", "--gate"), "--prompt": ("prompt", "--candidates"),
        "--seconds": ("seconds", "--serve"), "--clients": ("clients", "--serve")}
# Flags with a default that one run alone reads: given another value elsewhere, they would be ignored.
PEER_ONLY = ("--shape", "--backends", "--source", "--k", "--candidate", "--new-tokens", "--natural", "--ragged",
             "--sweeps", "--cache")
DEFAULTED_ONLY = {"--prefix-tokens": "--shared-prefix"}
NOT_READ = {"--shared-prefix": ("--data",), "--serve": ("--rounds",)}


def _given(args: argparse.Namespace) -> list[str]:
    """The flags of `PEER_ONLY`, `DEFAULTED_ONLY` and `NOT_READ` set to other values than their defaults."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = parser.parse_args([])
    flags = dict.fromkeys([*PEER_ONLY, *DEFAULTED_ONLY, *(f for read in NOT_READ.values() for f in read)])
    return [f for f in flags if getattr(args, f[2:].replace("-", "_")) != getattr(defaults, f[2:].replace("-", "_"))]


def _check(args: argparse.Namespace) -> None:
    """One mode at a time, flags only where they are read, and --out and --model usable: said before
    any work, not after it."""
    for flag in ("--model", "--data", "--bundle", "--out", "--cache"):  # "" is no path (an unset variable), not a default
        if getattr(args, flag[2:]) is not None and not getattr(args, flag[2:]).strip():
            raise InputError(f"{flag} is empty: give a path, or leave the flag out for the default")
    modes = [flag for flag, name in MODES.items() if getattr(args, name) not in (None, False)]
    if len(modes) > 1:
        raise InputError(f"{modes[0]} and {modes[1]} are separate runs: give one")
    for flag, (name, mode) in ONLY.items():
        if getattr(args, name) is not None and mode not in modes:
            raise InputError(f"{flag} goes with {mode}")
    given = _given(args)
    for flag in given:
        if flag in DEFAULTED_ONLY and DEFAULTED_ONLY[flag] not in modes:
            raise InputError(f"{flag} goes with {DEFAULTED_ONLY[flag]}")
    if modes:
        for flag in given:
            if flag in PEER_ONLY:
                raise InputError(f"{flag} goes with the peer comparison (no mode flag), not {modes[0]}")
            if flag in NOT_READ.get(modes[0], ()):
                raise InputError(f"{modes[0]} does not read {flag}")
    else:
        if args.data:
            if not Path(args.data).is_file():
                raise InputError(f"--data {args.data}: no such file (JSONL correction requests)")
            if not args.model:  # the random-init shapes' tokenizer reads no text: one token a request
                raise InputError("--data goes with --model: the checkpoint its requests are for (a random-init "
                                 "--shape has no tokenizer for text)")
            shaping = [f for f in given if f in ("--source", "--k", "--candidate", "--ragged")]
            if shaping:
                raise InputError(f"{shaping[0]} shapes random requests: --data's lines have their own")
            if args.natural and "--new-tokens" in given:
                raise InputError("--new-tokens with --data --natural: each request stops at EOS or at the bundle's "
                                 "max output tokens; give one or the other")
        if args.model and "--shape" in given:
            raise InputError("--shape sizes a random-init model: --model is the model")
    if args.bundle and not modes:
        raise InputError("--bundle goes with a mode that runs instead (--drafts, --gate, --host, --serve, "
                         "--shared-prefix, --candidates); the peer comparison exports --model or --shape itself")
    if args.model and modes and modes != ["--candidates"]:
        raise InputError(f"--model goes with the peer comparison or --candidates, not {modes[0]} (which reads --bundle)")
    if not modes and not any(b.strip() for b in args.backends.split(",")):
        raise InputError("--backends is empty: name at least one")
    if args.model and not Path(args.model).is_dir():
        raise InputError(f"--model {args.model}: no such folder (a Hugging Face checkpoint folder: nothing is "
                         "downloaded)")
    out = Path(args.out).absolute()
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise InputError(f"--out {args.out}: not a folder that can be made or written ({existing} is "
                         f"{'a file' if not existing.is_dir() else 'not writable'})")


def run(args: argparse.Namespace) -> int:
    _check(args)
    if args.serve:
        return _bench_serve(args)
    if args.host:
        return _bench_host(args)
    from lmcor.bench.harness import BenchConfig

    # Unless given, the other modes measure as many requests, and batch as many, as the harness.
    args.requests = BenchConfig.requests if args.requests is None else args.requests
    args.batch_size = BenchConfig.batch_size if args.batch_size is None else args.batch_size
    if args.drafts:
        return _bench_drafts(args)
    if args.gate is not None:
        return _bench_gate(args)
    if args.shared_prefix:
        return _bench_prefix(args)
    if args.candidates:
        return _bench_candidates(args)
    from lmcor.bench import harness

    config = harness.BenchConfig(
        shape=args.shape, model=Path(args.model) if args.model else None, data=Path(args.data) if args.data else None,
        backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()), threads=args.threads,
        requests=args.requests, rounds=args.rounds, batch_size=args.batch_size, source=args.source, k=args.k,
        candidate=args.candidate, new_tokens=args.new_tokens, natural=args.natural, ragged=args.ragged,
        sweeps=args.sweeps, out=Path(args.out), cache=Path(args.cache),
    )
    report = harness.run(config)
    path = harness.write(report, config.out)
    images = harness.plots(report, config.out)
    print(harness.table(report))
    say(f"wrote {path} and {', '.join(str(p) for p in images)}")
    return 0


def _write_report(path: Path, report: dict, table: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table)
    say(f"wrote {path}")


# Seconds of load per point: an hour is more than any measurement here needs.
MAX_SECONDS = 3600


def _seconds(text: str) -> float:
    value = options.finite_float(text)
    if not 0 < value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0 and at most {MAX_SECONDS}, got {text}")
    return value


# Client threads of one process: past a thousand, starting them takes longer than a point's load.
MAX_CLIENTS = 1024
_client_count = options.int_range(1, f"integers from 1 to {MAX_CLIENTS}", MAX_CLIENTS)


def _bench_serve(args: argparse.Namespace) -> int:
    from lmcor.bench import serve

    data = Path(args.data) if args.data else Path(__file__).resolve().parents[2] / "recipes" / "splits" / "test.jsonl"
    if not data.is_file():
        raise InputError(f"--serve needs --data: a JSONL file of correction requests ({data} is not there)")
    try:
        clients = tuple(_client_count(c) for c in (CLIENTS if args.clients is None else args.clients).split(","))
    except argparse.ArgumentTypeError as e:
        raise InputError(f"--clients: {e}") from None
    own = serve.ServeBenchConfig
    config = own(data=data, bundle=Path(args.bundle) if args.bundle else None, seconds=args.seconds or SECONDS,
                 clients=clients,
                 requests=own.requests if args.requests is None else args.requests,
                 batch_size=own.batch_size if args.batch_size is None else args.batch_size,
                 threads=args.threads, out=Path(args.out))
    report = serve.run(config)
    _write_report(Path(args.out) / "serve.json", report, serve.table(report))
    say(f"wrote {serve.plot(report, Path(args.out))}")
    servers = report["servers"].values()
    drained = all(s["exit_code"] == 0 and not any(r["lost"] for r in s["clients"].values()) for s in servers)
    return 0 if drained else 1


def _bench_host(args: argparse.Namespace) -> int:
    from lmcor.bench import host

    data = Path(args.data) if args.data else Path(__file__).resolve().parents[2] / "recipes" / "splits" / "test.jsonl"
    if not data.is_file():
        raise InputError(f"--host needs --data: a JSONL file of correction requests ({data} is not there)")
    own = host.HostConfig
    config = own(data=data, bundle=Path(args.bundle) if args.bundle else None,
                 requests=own.requests if args.requests is None else args.requests, rounds=args.rounds,
                 batch_size=own.batch_size if args.batch_size is None else args.batch_size, threads=args.threads)
    report = host.run(config)
    _write_report(Path(args.out) / "host.json", report, host.table(report))
    return 0 if report["identical_outputs"] == report["requests"] else 1


def _bench_prefix(args: argparse.Namespace) -> int:
    from lmcor.bench import prefix

    if not args.bundle:
        raise InputError("--shared-prefix needs --bundle: a causal-LM bundle")
    config = prefix.PrefixConfig(bundle=Path(args.bundle), prefix_tokens=args.prefix_tokens, requests=args.requests,
                                 rounds=args.rounds, batch_size=args.batch_size, threads=args.threads)
    report = prefix.run(config)
    _write_report(Path(args.out) / "prefix.json", report, prefix.table(report))
    return 0 if report["identical_outputs"] == report["requests"] else 1


def _bench_candidates(args: argparse.Namespace) -> int:
    from lmcor.bench import candidates

    if not (args.bundle and args.model and args.data):
        raise InputError("--candidates needs --bundle (a causal-LM bundle), --model (the same model's Hugging Face "
                         "folder) and --data (JSONL lines with a source)")
    config = candidates.CandidatesConfig(bundle=Path(args.bundle), checkpoint=Path(args.model), data=Path(args.data),
                                         requests=args.requests, rounds=args.rounds, batch_size=args.batch_size,
                                         threads=args.threads, prompt=args.prompt)
    report = candidates.run(config)
    _write_report(Path(args.out) / "candidates.json", report, candidates.table(report))
    return 0 if report["identical_outputs"] == report["requests"] else 1


def _bench_gate(args: argparse.Namespace) -> int:
    from lmcor.bench import gate

    if not args.data:
        raise InputError("--gate needs --data: a JSONL file of correction requests with targets")
    config = gate.GateConfig(data=Path(args.data), gate=Path(args.gate) if args.gate else None,
                             bundle=Path(args.bundle) if args.bundle else None, threshold=args.gate_threshold,
                             requests=args.requests, rounds=args.rounds, batch_size=args.batch_size, threads=args.threads)
    report = gate.run(config)
    _write_report(Path(args.out) / "gate.json", report, gate.table(report))
    return 0


def _bench_drafts(args: argparse.Namespace) -> int:
    from lmcor.bench import drafts

    if not args.data:
        raise InputError("--drafts needs --data: a JSONL file of correction requests")
    config = drafts.DraftsConfig(data=Path(args.data), bundle=Path(args.bundle) if args.bundle else None,
                                 requests=args.requests, rounds=args.rounds, batch_size=args.batch_size,
                                 threads=args.threads)
    report = drafts.run(config)
    _write_report(Path(args.out) / "drafts.json", report, drafts.table(report))
    return 0 if report["identical_outputs"] == report["requests"] else 1
