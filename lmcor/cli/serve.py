"""`lmcor serve`: the corrector (and any gate, classifiers, generators) over HTTP, until SIGTERM/SIGINT
drains it. See `lmcor.server` for the routes."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from lmcor.runtime.errors import InputError

from . import options

API_KEY_ENV = "LMCOR_API_KEY"


def _named(text: str) -> tuple[str, str]:
    name, sep, bundle = text.partition("=")
    if not (sep and name and bundle):
        raise argparse.ArgumentTypeError(f"must be NAME=BUNDLE, got {text!r}")
    return name, bundle


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lmcor.server.config import DEFAULT_MAX_BODY_BYTES, ServeConfig

    d = ServeConfig()
    parser.add_argument("--config", help="JSON file of these settings (keys: model, gate, classifiers, generators, "
                        "host, port, api_key, insecure, allowed_hosts, max_queue, max_batch, batches, timeout_s, max_body_bytes, "
                        "threads, providers; bundle paths relative to the file; \"gate\": \"\" is the shipped gate); flags "
                        "given override it (--classifier/--generator: its whole map)")
    parser.add_argument("--model", help="corrector bundle folder (default: the corrector shipped with lmcor)")
    parser.add_argument("--gate", nargs="?", const="", help="answer a request with its first candidate where this "
                        "classifier bundle (alone: the gate shipped with lmcor) finds it right")
    parser.add_argument("--classifier", action="append", type=_named, metavar="NAME=BUNDLE",
                        help="a classifier bundle for /v1/classify (repeatable)")
    parser.add_argument("--generator", action="append", type=_named, metavar="NAME=BUNDLE",
                        help="a causal-LM bundle for /v1/generate (repeatable)")
    parser.add_argument("--host", help=f"address to bind (default: {d.host}; another needs an API key or --insecure)")
    parser.add_argument("--port", type=options.non_negative_int, help=f"(default: {d.port}; 0: a free port, printed)")
    parser.add_argument("--api-key", help="bearer token required on every route but /health and the API's description "
                        f"(/openapi.json, /docs, /redoc) (default: ${API_KEY_ENV})")
    parser.add_argument("--insecure", action="store_true", default=None,
                        help="serve a non-loopback host without an API key")
    parser.add_argument("--allow-host", action="append", metavar="NAME",
                        help="on loopback, also answer requests for this host name (a proxy's in front; *: any; "
                        "repeatable); others get 400, as a web page's reaching it through DNS rebinding")
    parser.add_argument("--max-queue", type=options.positive_int,
                        help=f"requests accepted and not yet answered; more get 429 (default: {d.max_queue})")
    parser.add_argument("--max-batch", type=options.positive_int,
                        help=f"rows the corrector decodes at once, in all its batches; 1: one request at a time "
                        f"(default: {d.max_batch})")
    parser.add_argument("--batches", type=options.positive_int,
                        help="batches the corrector decodes side by side, each by its own thread: one runs its "
                        "Python while another's models run; on the CPU at most one per thread, and while several "
                        "have work each runs on its share of the threads (the weights held twice); on a GPU, one "
                        f"(default: {d.batches})")
    parser.add_argument("--timeout-s", type=options.finite_float,
                        help=f"deadline of a request, which may ask for less; past it, 504 (default: {d.timeout_s:g})")
    parser.add_argument("--max-body-bytes", type=options.positive_int,
                        help=f"larger bodies get 413 (default: {DEFAULT_MAX_BODY_BYTES})")
    options.add_runtime(parser)
    options.add_ray(parser, "serve replicas of this server behind Ray Serve's proxy, on --host and --port "
                    "(--threads: each replica's, default there: the cluster's CPUs shared among --max-replicas, "
                    "else --replicas)")
    parser.add_argument("--replicas", type=options.positive_int, help="with --ray: replicas, each with its own "
                        "models and --threads (default: 1; and the least with --max-replicas)")
    parser.add_argument("--max-replicas", type=options.positive_int, help="with --ray: autoscale up to this many "
                        "replicas, aiming at --max-batch requests in flight on each")


def _by_name(flag: str, named: list[tuple[str, str]] | None) -> dict[str, str] | None:
    """NAME=BUNDLE pairs as a map; a name given twice is refused (the first bundle would be lost)."""
    if not named:
        return None
    out: dict[str, str] = {}
    for name, bundle in named:
        if name in out:
            raise InputError(f"{flag} {name}= is given twice ({out[name]} and {bundle}): give each bundle its own name")
        out[name] = bundle
    return out


def config(args: argparse.Namespace):
    """The `ServeConfig` of the flags given, over `--config`'s file, over the defaults."""
    from lmcor.server.config import ServeConfig

    given = _given(args)
    return ServeConfig.read(args.config, **given) if args.config else ServeConfig(**given)


def _given(args: argparse.Namespace) -> dict:
    """The settings the flags (and $LMCOR_API_KEY) give, by the config file's keys."""
    if args.api_key is None and os.environ.get(API_KEY_ENV) == "":
        raise InputError(f"{API_KEY_ENV} is set but empty: give a secret, or unset it")
    given = {
        "model": args.model, "gate": args.gate, "host": args.host, "port": args.port,
        "api_key": args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None,
        "insecure": args.insecure, "allowed_hosts": tuple(args.allow_host) if args.allow_host else None,
        "max_queue": args.max_queue, "max_batch": args.max_batch, "batches": args.batches, "timeout_s": args.timeout_s,
        "max_body_bytes": args.max_body_bytes, "threads": args.threads, "providers": options.providers(args),
        "classifiers": _by_name("--classifier", args.classifier),
        "generators": _by_name("--generator", args.generator),
    }
    return {name: value for name, value in given.items() if value is not None}


def _setting_named(args: argparse.Namespace, key: str) -> str:
    """A failing setting's key as its error names it: with the config file where the value is the
    file's (not a flag's, not a default). Read only on a failure."""
    top = key.partition(".")[0]
    if args.config and top not in _given(args) and top in json.loads(Path(args.config).read_text(encoding="utf-8")):
        return f"{args.config}: {key}"
    return key


def run(args: argparse.Namespace) -> int:
    # Nothing is in flight before the server listens: a SIGTERM or SIGINT then ends it as a drain would,
    # exit 0.
    previous = {number: signal.signal(number, _before_listening) for number in (signal.SIGTERM, signal.SIGINT)} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        return _run(args)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _before_listening(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def _run(args: argparse.Namespace) -> int:
    try:
        from lmcor.server import runner
    except ImportError as e:
        raise InputError(f"lmcor serve needs the serve extra: pip install 'lmcor[serve]' ({e})") from None
    options.ray_only(args, "replicas", "max_replicas")
    settings = config(args)
    from lmcor.server.models import Models

    Models.check(settings, here=not args.ray, named=lambda key: _setting_named(args, key))
    runner.log_to_stderr()
    stdout = sys.stdout  # kept: Ray's driver prints elsewhere while it runs (`ray.cluster`)
    announce = lambda url: print(f"lmcor serve: listening on {url}", flush=True, file=stdout)  # noqa: E731
    if args.ray:
        try:
            from lmcor.integrations import ray
        except ImportError as e:
            raise InputError(f"lmcor serve --ray needs the ray extra: pip install 'lmcor[ray]' ({e})") from None
        return ray.serve_forever(settings, replicas=args.replicas or 1, max_replicas=args.max_replicas,
                                 address=args.ray_address, announce=announce)
    return runner.serve(settings, announce=announce)
