"""lmcor on Ray (`pip install 'lmcor[ray]'`): Ray Serve replicas of `lmcor serve`, and Ray Data jobs
that correct large JSONL files. Each replica or worker holds its own loaded bundle and runs lmcor's
own engine, so continuous batching, drafts, the gate and the fallback work the same at any scale.

Serving (`lmcor serve --ray`, or `serve run lmcor.integrations.ray:build`): `LmcorReplica` is a Serve
deployment whose ASGI app is `lmcor.server.app.create_app`'s, the very routes, limits, errors and
auth of `lmcor serve`; Serve routes requests to `replicas` of it (or autoscales between `replicas`
and `max_replicas`), each with its own engine and ONNX Runtime threads.

Batch jobs (`lmcor correct --ray IN.jsonl -o OUT.jsonl`, or `read_jsonl` + `correct_dataset`):
`JsonlLines` cuts the file into blocks of whole lines (the driver counts newlines once; each read
task reads its own byte range), `CorrectLines` (one actor per worker, one bundle each) answers a
block with `lmcor correct`'s own code (`lmcor.cli.lines.line_at` and `answer_chunk`), so a bad
line gets the same error record with its line number. The driver takes the blocks in input order
and writes them with the CLI's rules (`lmcor.cli.lines.write_answers`: a temporary file renamed at
the end, --resume, signals). A worker that dies is restarted by Ray and its block is run again
(up to `BLOCK_RETRIES` times): a block's records reach the driver once, whole.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import ray.data
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.data import ActorPoolStrategy, Dataset
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from lmcor.cli.correct import FIELDS, line_request, record as correction_record
from lmcor.cli.lines import (Answer, answer_chunk, check_resumed, line_at, regular_file_size, split_lines,
                             write_answers)
from lmcor.cli.options import DEFAULT_MAX_LINE_BYTES
from lmcor.runtime import errors
from lmcor.runtime.bundle import bundle_path, load_manifest, shipped_bundle
from lmcor.runtime.classifier import Classifier, check_gate_bundle
from lmcor.runtime.corrector import Corrector
from lmcor.runtime.errors import InputError, LmcorError
from lmcor.runtime.engine import check_gate_threshold, search_for
from lmcor.runtime.options import MAX_BATCH_SIZE, check_int, check_optional, check_threads
from lmcor.runtime.request import CorrectionOptions
from lmcor.runtime.sessions import known_providers
from lmcor.server.app import create_app
from lmcor.server.config import INTEGERS, ServeConfig

log = logging.getLogger("lmcor.server.ray")  # `lmcor serve`'s JSON log lines

APP_NAME = "lmcor"
# Lines a read task reads and a worker answers at once: `lmcor correct`'s chunk at its default batch.
LINES_PER_BLOCK = 128
# A block whose worker dies (killed, out of memory) runs again on a restarted one, this often at most;
# workers themselves are restarted for as long as the job runs (Ray Data's default).
BLOCK_RETRIES = 3
_SCAN_BLOCK = 1 << 20
_SCHEMA = pa.schema([("line", pa.int64()), ("size", pa.int64()), ("raw", pa.binary()), ("limit", pa.int64())])


def default_threads(workers: int) -> int:
    """ONNX Runtime threads of each of `workers`: the connected Ray cluster's CPUs shared out, no more
    than its largest node has (this machine's cores where Ray is not running yet), at least 1."""
    if not ray.is_initialized():
        return max(1, (os.cpu_count() or 1) // workers)
    total, largest = _cpus()
    return max(1, min(int(total) // workers, int(largest)))


def _cpus() -> tuple[float, float]:
    """The Ray cluster's CPUs, and those of its largest live node (a worker runs on one node)."""
    largest = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node.get("Alive")), default=0)
    return ray.cluster_resources().get("CPU", 0), largest


@contextlib.contextmanager
def cluster(address: str | None = None) -> Iterator[None]:
    """Ray, as this process finds it: the cluster it is already connected to; else `address` (None:
    $RAY_ADDRESS, else a new local cluster, stopped on exit)."""
    if ray.is_initialized():
        yield
        return
    asked = address or os.environ.get("RAY_ADDRESS")
    _check_reachable(asked, "--ray-address" if address else "RAY_ADDRESS")
    kept = sys.stdout
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        try:
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                     configure_logging=False)
        except ConnectionError as e:  # "auto" with no cluster running
            said = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
            raise InputError(f"Ray address {asked!r} (--ray-address or RAY_ADDRESS): {said}; start one (ray start "
                             "--head), or give no address for a local cluster") from None
        if main:  # `ray.init` put in its own SIGTERM handler, exit(15): lmcor's again, or exit 143 with Ray stopped
            signal.signal(signal.SIGTERM, before if callable(before) else _terminated)
        # Ray's driver prints its workers' failures ("(raylet) A worker died...") to sys.stdout, which may
        # carry records or the server's address: they go to stderr (the records to the stdout kept before).
        if kept is not None and sys.stderr is not None:  # a closed stdout stays closed: -o is asked for
            sys.stdout = sys.stderr
        yield
    finally:
        try:
            ray.shutdown()  # also after a signal during `ray.init`; its printing thread stops here
        finally:
            sys.stdout = kept
            if main:
                signal.signal(signal.SIGTERM, before)


def _terminated(number: int, _frame: object) -> None:
    raise SystemExit(128 + number)


def _check_reachable(address: str | None, named: str = "--ray-address", timeout_s: float = 10.0) -> None:
    """A cluster's host:port (or ray://host:port) must answer, and as Ray does (gRPC): Ray itself waits
    minutes for one that does not before it fails. `named`: where the address came from."""
    if not address or address == "auto" or address == "local":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or "://" in host:
        raise InputError(f"Ray address {address!r} ({named}) is not host:port (or ray://host:port, auto)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as connection:
            # A cluster with TLS (RAY_USE_TLS) answers nothing in the clear: its port answering is enough.
            grpc = os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true") or _speaks_http2(connection)
    except OSError as e:
        raise InputError(f"no Ray cluster answers at {address} ({named}: {e.strerror or e})") from None
    if not grpc:
        raise InputError(f"{address} ({named}) answers, but not as a Ray cluster does: give its GCS address (port "
                         "6379 unless `ray start --head` was told another; not the dashboard's 8265), or "
                         "ray://host:10001 for Ray Client")


# HTTP/2's client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS, its client server)
# answers with a SETTINGS frame of its own; an HTTP/1 server (a dashboard) with text, or not at all.
_HTTP2_HELLO = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _speaks_http2(connection: socket.socket) -> bool:
    connection.sendall(_HTTP2_HELLO)
    head = b""
    while len(head) < 9:  # a frame's header: length (3 bytes), type (1), flags, stream
        more = connection.recv(9 - len(head))
        if not more:
            break
        head += more
    return len(head) == 9 and head[3] == 0x04


def _check_cpus(count: int, cpus: int, what: str, threads: str = "--threads") -> None:
    have, largest = _cpus()
    if cpus > largest:  # Ray would wait for such a node for ever
        raise InputError(f"{what} of {cpus} CPU(s) each fit on no node of the Ray cluster (its largest has "
                         f"{largest:g}): lower {threads}, or add a larger node")
    if count * cpus > have:
        raise InputError(f"{count} {what} of {cpus} CPU(s) each need {count * cpus} CPUs; the Ray cluster has "
                         f"{have:g}: lower their number or {threads}, or add nodes")


# Batch jobs: Ray Data.

@dataclasses.dataclass(frozen=True)
class _Block:
    offset: int  # of its first line, in bytes
    length: int  # bytes
    first: int  # its first line's number (1-based, counting every line)
    lines: int


def _blocks(path: str, after: int, per_block: int) -> tuple[list[_Block], int, int]:
    """The blocks of `per_block` lines after line `after`, the bytes of the lines up to it, and the
    file's lines."""
    blocks: list[_Block] = []
    skipped = start = first = count = number = 0  # count: lines in the open block; number: lines seen

    def line(begin: int, end: int) -> None:
        nonlocal skipped, start, first, count, number
        number += 1
        if number <= after:
            skipped = end
            return
        if count == 0:
            start, first = begin, number
        count += 1
        if count == per_block:
            blocks.append(_Block(start, end - start, first, count))
            count = 0

    position = begin = 0  # position: of the chunk in the file; begin: of the line being read
    with open(path, "rb") as f:
        while chunk := f.read(_SCAN_BLOCK):
            i = 0
            while (j := chunk.find(b"\n", i)) != -1:
                line(begin, position + j + 1)
                begin = position + j + 1
                i = j + 1
            position += len(chunk)
    if position > begin:  # a last line without its newline
        line(begin, position)
    if count:
        blocks.append(_Block(start, position - start, first, count))
    return blocks, skipped, number


def _read_block(path: str, block: _Block, max_bytes: int) -> Iterator[pa.Table]:
    with open(path, "rb") as f:
        f.seek(block.offset)
        left = block.length

        def read(size: int) -> bytes:
            nonlocal left
            data = f.read(min(size, left))
            left -= len(data)
            return data

        rows = list(split_lines(read, max_bytes))
    yield pa.table([pa.array(range(block.first, block.first + len(rows)), pa.int64()),
                    pa.array([size for _, size in rows], pa.int64()),
                    pa.array([raw for raw, _ in rows], pa.binary()),
                    pa.array([max_bytes] * len(rows), pa.int64())], schema=_SCHEMA)


class JsonlLines(Datasource):
    """The lines of a JSONL file after line `after`, as rows {line, size, raw, limit}: `raw` is the
    line's bytes, newline included, or null when it holds more than `max_line_bytes`, the `limit`
    (as `split_lines` gives them; blank lines too). Each read task reads `lines_per_block` lines from its own byte
    range, so the file must not change during the job, and must be readable where the read tasks
    run (`read_jsonl` keeps them on the driver's node)."""

    def __init__(self, path: str | Path, *, after: int = 0, lines_per_block: int = LINES_PER_BLOCK,
                 max_line_bytes: int = DEFAULT_MAX_LINE_BYTES):
        super().__init__()
        self.path = str(Path(path).resolve())
        self.max_line_bytes = max_line_bytes
        check_int("after", after, 0)
        check_int("lines_per_block", lines_per_block, 1)
        check_int("max_line_bytes", max_line_bytes, 1)
        self.blocks, self.skipped_bytes, self.lines = _blocks(self.path, after, lines_per_block)

    def estimate_inmemory_data_size(self) -> int:
        return sum(b.length for b in self.blocks)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [ReadTask(functools.partial(_read_block, self.path, b, self.max_line_bytes),
                         BlockMetadata(num_rows=b.lines, size_bytes=b.length, input_files=[self.path], exec_stats=None),
                         schema=_SCHEMA)
                for b in self.blocks]


READ_CONCURRENCY = 2  # blocks read at once


def read_jsonl(source: str | Path | JsonlLines, **settings: Any) -> Dataset:
    """A JSONL file as a Ray Dataset of rows {line, size, raw, limit} (`JsonlLines`, which takes `settings`),
    read on this node: only the driver's machine needs the file."""
    if not isinstance(source, JsonlLines):
        source = JsonlLines(source, **settings)
    # Reads take no CPU of their own: the workers may hold every CPU, and a read is a seek and a copy.
    # So few at once: with no CPU to bound them, Ray would start a worker process for every block.
    return ray.data.read_datasource(source, num_cpus=0, concurrency=max(1, min(READ_CONCURRENCY, len(source.blocks))),
                                    label_selector={"ray.io/node-id": ray.get_runtime_context().get_node_id()})


class CorrectLines:
    """A Ray Data worker: loads the corrector (and gate) once, then answers batches of rows {line,
    size, raw, limit} with `lmcor correct`'s own code into rows {line, size, record, error}: `record` is the
    line's output record (one line of JSON, newline included), `error` why it is an error record
    (null when it was answered). Blank lines give no row. `gate`: a classifier bundle ("": the shipped
    gate; None: none); `threads`: ONNX Runtime's intra-op threads."""

    def __init__(self, *, model: str | None = None, options: CorrectionOptions | None = None,
                 gate: str | None = None, batch_size: int = 16, threads: int | None = None,
                 providers: list[str] | None = None):
        self.corrector = Corrector.load(model, providers=providers, threads=threads)
        self.gate = None if gate is None else Classifier.load(gate or shipped_bundle("gate"), providers=providers,
                                                              threads=threads)
        self.options = options or CorrectionOptions()
        self.batch_size = batch_size

    def _correct(self, requests: list) -> list:
        return self.corrector.correct_batch(requests, errors="return", options=self.options, gate=self.gate,
                                            batch_size=self.batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = zip(*(batch[c].to_pylist() for c in ("line", "raw", "size", "limit")))
        lines = [line for number, raw, size, limit in rows if (line := line_at(number, raw, size, limit))]
        answers = answer_chunk(lines, line_request, self._correct, correction_record)
        return pa.table({"line": pa.array([a.number for a in answers], pa.int64()),
                         "size": pa.array([a.size for a in answers], pa.int64()),
                         "record": pa.array([a.text for a in answers], pa.string()),
                         "error": pa.array([a.error for a in answers], pa.string())})


def _absolute(model: Any, gate: Any) -> dict[str, Any]:
    """The bundles' paths made absolute, for workers that run in other folders (None and "", the
    shipped ones, as they are; an empty or blank path is refused, not read as this folder)."""
    return {"model": model if model is None else str(bundle_path(model).resolve()),
            "gate": gate if gate is None or gate == "" else str(bundle_path(gate).resolve())}


def correct_dataset(dataset: Dataset, *, workers: int = 1, threads: int | None = None,
                    lines_per_batch: int = LINES_PER_BLOCK, worker: type = CorrectLines, **settings: Any) -> Dataset:
    """`dataset` (rows {line, size, raw, limit}, as `read_jsonl` gives) corrected by `workers` actors
    of `worker`, each with one bundle and `threads` ONNX Runtime threads (and as many Ray CPUs; None:
    the cluster's CPUs shared out, `default_threads`); `settings` are `CorrectLines`' (model, options,
    gate, batch_size, providers), the bundles' paths read from this process's folder.
    The result keeps the input's order. A worker that dies is restarted and its batch retried, up to
    `BLOCK_RETRIES` times (a batch that kills every worker it meets fails the job, with Ray's error,
    instead of retrying for ever): iterating the result then raises Ray's error, which `worker_error`
    turns into the lmcor error the worker raised, or one naming the exception at its root.

    What the workers would refuse is refused here, before any starts (`InputError`): the rows'
    schema, the counts, workers x threads more CPUs than the cluster has (Ray would wait for them for
    ever), and `CorrectLines`' settings (the bundles, the options against them)."""
    _check_rows(dataset)  # (reading its schema starts Ray, if the dataset did not)
    check_int("workers", workers, 1)
    check_threads(threads)
    check_int("lines_per_batch", lines_per_batch, 1)
    threads = default_threads(workers) if threads is None else threads  # else ONNX Runtime takes every core
    _check_cpus(workers, threads, "workers", "threads")
    if isinstance(worker, type) and issubclass(worker, CorrectLines):  # a subclass may take settings of its own
        settings.update({k: v for k, v in _absolute(settings.get("model"), settings.get("gate")).items()
                         if k in settings})
        taken = inspect.signature(worker).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in taken.values()):
            unknown = sorted(set(settings) - set(taken))
            if unknown:  # else every worker would fail at its start
                raise InputError(f"{unknown[0]!r} is not a setting of {worker.__name__} (its settings: "
                                 f"{', '.join(name for name in taken if name != 'threads')})")
        check_settings(**{k: v for k, v in settings.items() if k in inspect.signature(check_settings).parameters})
    answered = dataset.map_batches(worker, batch_size=lines_per_batch, batch_format="pyarrow",
                                   compute=ActorPoolStrategy(size=workers),
                                   fn_constructor_kwargs={**settings, "threads": threads}, num_cpus=threads,
                                   max_task_retries=BLOCK_RETRIES)
    # Its own context: Ray Data's child datasets share their parent's, and the caller's is left as it was.
    answered = Dataset.copy(answered, _deep_copy=True)
    answered.context.execution_options.preserve_order = True
    answered.context.enable_progress_bars = False  # the CLI shows its own
    return answered


def check_settings(*, model: str | None = None, options: CorrectionOptions | None = None, gate: str | None = None,
                   batch_size: int = 16, providers: list[str] | None = None) -> None:
    """`CorrectLines`' settings, checked without loading a model: the bundles' manifests, and the
    options against them."""
    options = check_optional("options", options, CorrectionOptions, "a CorrectionOptions") or CorrectionOptions()
    check_int("batch_size", batch_size, 1, MAX_BATCH_SIZE)
    if providers is not None:
        known_providers(providers)
    manifest = load_manifest(shipped_bundle("default") if model is None else model, verify=False, kind="corrector")
    search_for(manifest, options)
    check_gate_threshold(gate is not None, options)
    if gate is not None:
        check_gate_bundle(gate or shipped_bundle("gate"))


def worker_error(error: BaseException) -> LmcorError:
    """The lmcor error a Ray worker raised, one line, not the worker's traceback. Ray keeps it as an
    object only sometimes (a task's `cause`); an actor that died in its constructor, or Ray Data's
    wrapping of a worker's error, keeps its text alone, whose last lmcor error line is read back."""
    seen, inner = set(), error
    while isinstance(inner, BaseException) and id(inner) not in seen:
        seen.add(id(inner))
        if type(inner).__module__.split(".")[0] == "lmcor" and isinstance(inner, LmcorError):
            return inner
        inner = getattr(inner, "cause", None) or inner.__cause__
    kind, message = _said("\n".join(str(part) for part in (error, getattr(error, "error_msg", "")) if part))
    if kind is not None:
        return getattr(errors, kind, LmcorError)(message)
    return LmcorError(f"a Ray worker failed: {type(error).__name__}" + (f": {message}" if message else ""))


def _said(text: str) -> tuple[str | None, str]:
    """What a Ray message's text says: the last lmcor error in it (its kind and message), else (None,
    its last line), without terminal colours."""
    text = _ANSI.sub("", text)
    said = _LMCOR_ERROR.findall(text)
    if said:
        return said[-1]
    raised = _RAISED.search(text)  # the first exception a traceback shows: the root of its chain
    if raised:
        return None, f"{raised[1].rsplit('.', 1)[-1]}: {raised[2]}"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return None, lines[-1] if lines else ""


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_LMCOR_ERROR = re.compile(r"^lmcor(?:\.\w+)*\.(\w+Error): (.+)$", re.MULTILINE)
_RAISED = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$", re.MULTILINE)


def _check_rows(dataset: Dataset) -> None:
    """The rows `CorrectLines` reads: {line, size, raw, limit}, as `read_jsonl` gives them."""
    schema = dataset.schema()
    if schema is None:  # no rows at all (an empty file, or one answered already)
        return
    have = dict(zip(schema.names, schema.types))
    kinds = {"line": pa.types.is_integer, "size": pa.types.is_integer,
             "raw": lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_null(t),
             "limit": pa.types.is_integer}
    if not all(name in have and isinstance(have[name], pa.DataType) and good(have[name])
               for name, good in kinds.items()):
        shown = ", ".join(f"{name}: {kind}" for name, kind in have.items()) or "none"
        raise InputError(f"the dataset's rows must be {{line: int64, size: int64, raw: binary, limit: int64}}, as "
                         f"read_jsonl gives them (a line's bytes, not text); these have {{{shown}}}")


def answers(source: JsonlLines, stopping: Callable[[], bool], **correcting: Any) -> Iterator[tuple[list[Answer], int]]:
    """The answers to `source`'s lines, a block at a time in input order (`write_answers`' source)."""
    if not source.blocks:
        return
    batches = iter(correct_dataset(read_jsonl(source), **correcting).iter_batches(batch_size=None,
                                                                                  batch_format="pyarrow"))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except ray.exceptions.RayError as e:  # a worker's own error (not its death, which Ray retries)
            raise worker_error(e) from None
        yield [Answer(*row) for row in zip(*(batch[c].to_pylist() for c in ("line", "size", "record", "error")))], \
            source.skipped_bytes
        if stopping():
            return


def correct_lines(args: argparse.Namespace, options: CorrectionOptions, *, workers: int,
                  providers: list[str] | None = None, address: str | None = None) -> int:
    """`lmcor correct --ray`: `args`' input file into `args.output`, by `workers` Ray workers."""
    if args.input != "-" and os.path.isdir(args.input):
        raise InputError(f"{args.input}: is a directory, not a JSONL file")
    if args.input == "-" or regular_file_size(args.input) is None:
        raise InputError(f"--ray reads a file by byte ranges; {args.input!r} is not a regular file (drop --ray to "
                         "read a pipe)")
    model, gate = _absolute(args.model, args.gate).values()
    # What the workers would refuse, refused before Ray starts: the bundles and the options against them.
    check_settings(model=model, options=options, gate=gate, batch_size=args.batch_size, providers=providers)
    for name, level in (("ray", logging.WARNING), ("ray.data", logging.ERROR)):  # the CLI says what it does
        logging.getLogger(name).setLevel(level)

    def answered(kept: Sequence[int], stopping: Callable[[], bool]) -> Iterator[tuple[list[Answer], int]]:
        source = JsonlLines(args.input, after=kept[-1] if kept else 0, lines_per_block=args.batch_size * 8,
                            max_line_bytes=args.max_line_bytes)
        check_resumed(args, kept, source.lines)  # its lines up to there: checked by write_answers
        yield from answers(source, stopping, workers=workers, threads=threads, lines_per_batch=args.batch_size * 8,
                           model=model, options=options, gate=gate, batch_size=args.batch_size, providers=providers)

    records_to = sys.stdout  # `cluster` sends what else is printed there to stderr
    with cluster(address):  # first: `ray.init` puts in its own SIGTERM handler, `write_answers` then lmcor's
        threads = args.threads or default_threads(workers)
        _check_cpus(workers, threads, "workers")
        return write_answers(args, answered, "correcting", FIELDS, stdout=records_to)


# Serving: Ray Serve.

@serve.ingress()
class LmcorReplica:
    """One replica of `lmcor serve`: `create_app`'s app over its own models, loaded when the replica
    starts; it is ready (Serve's first health check passes) once they are loaded."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.state: Any = None

    def __serve_build_asgi_app__(self) -> Any:
        app = create_app(self.config)
        self.state = app.state.lmcor
        return app

    async def check_health(self) -> None:
        while self.state is None or self.state.status == "loading":
            await asyncio.sleep(0.05)
        if self.state.failure is not None:
            raise self.state.failure


def application(config: ServeConfig, *, replicas: int = 1, max_replicas: int | None = None) -> serve.Application:
    """The Serve application of `config`: `replicas` replicas, or autoscaling from `replicas` to
    `max_replicas` (aiming at `config.max_batch` requests in flight per replica). Each replica has
    `config.threads` ONNX Runtime threads (default: the cluster's CPUs shared out) and as many Ray
    CPUs; it takes up to `config.max_queue` requests at once, past which it answers 429 itself, and
    each of Serve's proxies (one a node) holds at most as many more waiting for a replica (429 with
    Retry-After past them)."""
    check_int("replicas", replicas, 1)
    if max_replicas is not None:
        check_int("max_replicas", max_replicas, 1)
    if max_replicas is not None and max_replicas < replicas:
        raise InputError(f"--max-replicas {max_replicas} is below --replicas {replicas}")
    threads = config.threads or default_threads(max_replicas or replicas)
    scaling: dict[str, Any] = ({"num_replicas": replicas} if max_replicas is None else {"autoscaling_config": {
        "min_replicas": replicas, "max_replicas": max_replicas, "target_ongoing_requests": config.max_batch}})
    # Serve queues what its replicas cannot take yet without bound unless told: a bounded queue, as
    # `lmcor serve`'s, refused with lmcor's status.
    deployment = serve.deployment(LmcorReplica, name=APP_NAME, ray_actor_options={"num_cpus": threads},
                                  max_ongoing_requests=config.max_queue, max_queued_requests=config.max_queue,
                                  backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1),
                                  max_constructor_retry_count=1, graceful_shutdown_timeout_s=config.timeout_s + 5,
                                  **scaling)
    return deployment.bind(dataclasses.replace(config, threads=threads))


def build(args: dict[str, Any]) -> serve.Application:
    """For `serve run lmcor.integrations.ray:build model=PATH replicas=2` (or a Serve config file's
    `args`): `ServeConfig`'s keys, and `replicas`, `max_replicas`. Host and port are Serve's."""
    args = dict(args)
    ServeConfig.check_keys(args, "serve run's args", also=("replicas", "max_replicas"))
    integer, number, flag = (int, "an integer"), (float, "a number"), (_flag, "true or false")
    kinds = {**{name: integer for name in (*INTEGERS, "replicas", "max_replicas")}, "timeout_s": number, "insecure": flag}
    for name, (kind, what) in kinds.items():
        if isinstance(args.get(name), str):
            try:
                args[name] = kind(args[name])
            except ValueError:
                raise InputError(f"{name} must be {what}, got {args[name]!r}") from None
    replicas, most = args.pop("replicas", 1), args.pop("max_replicas", None)
    return application(ServeConfig(**args), replicas=replicas, max_replicas=most)


def _flag(text: str) -> bool:
    if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(text)
    return text.lower() in ("1", "true", "yes")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _serve_address(asked: ServeConfig) -> tuple[str, int]:
    """The host and port Serve's proxies listen on: those asked for, unless Serve already ran on this
    cluster, where `serve.start` keeps its own and only logs a warning."""
    from ray.serve.context import _get_global_client  # no public way to read them back

    try:
        http = _get_global_client().http_config
        return http.host or asked.host, http.port
    except Exception:  # Serve's internals moved: trust what was asked for
        return asked.host, asked.port


@contextlib.contextmanager
def running(config: ServeConfig, *, replicas: int = 1, max_replicas: int | None = None,
            address: str | None = None) -> Iterator[str]:
    """`config` served by Ray Serve on its host and port (0: a free one) until exit; yields the URL
    once every replica has loaded its models. On exit the replicas answer what they took, then
    stop, and Serve stops too if it was started here (where Serve already runs, its proxies keep
    their own host and port). Left by a KeyboardInterrupt (a second signal), Serve is not drained."""
    # A cluster of this machine alone: its proxy binds here, where the port can be checked first.
    here = not (address or os.environ.get("RAY_ADDRESS"))
    with cluster(address):
        here = here and not ray.util.client.ray.is_connected()
        config = dataclasses.replace(absolute_paths(config),
                                     threads=config.threads or default_threads(max_replicas or replicas))
        _check_cpus(replicas, config.threads, "replicas")
        try:
            ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
            started_here = False
        except ValueError:
            started_here = True
        if started_here and here and config.port:
            _check_port(config.host, config.port)  # Serve would say only that its proxy failed
        serve.start(http_options={"host": config.host, "port": config.port or _free_port(config.host)})
        host, port = _serve_address(config)
        asked = config.host
        if host != asked:  # Serve ran before, elsewhere: that host needs what --host would
            ServeConfig.check_reach(host, config.api_key, config.insecure)
            config = dataclasses.replace(config, host=host)  # and the replicas answer requests for it
        if host in ("0.0.0.0", "::"):  # every interface: reached here as asked
            host = asked
        try:
            if APP_NAME in serve.status().applications:  # it would be replaced, then deleted under its server
                raise LmcorError(f"a Serve application named {APP_NAME!r} already runs on this Ray cluster (another "
                                 "`lmcor serve --ray`?): stop it first, or serve on another cluster")
            try:
                serve.run(application(config, replicas=replicas, max_replicas=max_replicas), name=APP_NAME,
                          route_prefix="/", blocking=False)
            except RuntimeError as e:
                with contextlib.suppress(Exception):  # the failure is what to say, not a failed cleanup's
                    serve.delete(APP_NAME)  # a failed application stays on a cluster that outlives this run
                raise LmcorError(f"the Serve application did not start: {_failure(e)}") from None
            try:
                yield f"http://{f'[{host}]' if ':' in host else host}:{port}"
            finally:
                serve.delete(APP_NAME)  # waits for the replicas to answer what they took
        except KeyboardInterrupt:  # stopped at once: Serve's shutdown would wait for its replicas again
            started_here = False
            raise
        finally:
            if started_here:
                serve.shutdown()


def absolute_paths(config: ServeConfig) -> ServeConfig:
    """`config` with its bundles' paths made absolute: replicas run in the folder the cluster was
    started in, not this one."""
    def resolved(paths: dict[str, str]) -> dict[str, str]:
        return {name: str(bundle_path(path).resolve()) for name, path in paths.items()}

    return dataclasses.replace(config, **_absolute(config.model, config.gate), classifiers=resolved(config.classifiers),
                               generators=resolved(config.generators))


def _check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise LmcorError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def _failure(error: RuntimeError) -> str:
    """Why the application did not start, in one line: its replicas' error where Serve has one."""
    try:
        app = serve.status().applications.get(APP_NAME)
        said = [d.message for d in app.deployments.values() if d.message] if app else []
    except Exception:  # noqa: BLE001 - Serve's status is a nicety here
        said = []
    return _said("\n".join(said) or str(error))[1] or type(error).__name__


def serve_forever(config: ServeConfig, *, replicas: int = 1, max_replicas: int | None = None,
                  address: str | None = None, announce: Callable[[str], None] = print) -> int:
    """`lmcor serve --ray`: serve until SIGTERM/SIGINT, then let every replica answer what it took and
    stop; a second signal stops at once. Returns 0 after a drain, 130/143 when cut short."""
    stop = threading.Event()
    forced: list[int] = []

    def handle(number: int, frame: object) -> None:
        if stop.is_set():
            forced.append(number)
            raise KeyboardInterrupt
        stop.set()

    previous: dict = {}
    try:
        with running(config, replicas=replicas, max_replicas=max_replicas, address=address) as url:
            # Installed once Ray runs (`ray.init` puts in its own), and kept through the drain that
            # leaving `running` is: a second signal there stops at once too.
            previous = {number: signal.signal(number, handle) for number in (signal.SIGTERM, signal.SIGINT)}
            announce(url)
            log.info("listening", extra={"fields": {"url": url, "replicas": replicas, "max_replicas": max_replicas}})
            while not stop.wait(0.5):
                pass
            log.info("draining", extra={"fields": {}})
    except KeyboardInterrupt:
        return {signal.SIGINT: 130, signal.SIGTERM: 143}.get(forced[0] if forced else signal.SIGINT, 130)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    log.info("stopped", extra={"fields": {}})
    return 0
