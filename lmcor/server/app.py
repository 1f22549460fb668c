"""`create_app`: lmcor's HTTP API (FastAPI), over the models of a `ServeConfig`.

Routes: POST /v1/correct, /v1/classify, /v1/generate (a body is one request object or a list of
them, answered in order); GET /health, /metrics (Prometheus), /openapi.json. Every answer that is not
a result is `{"error": {"kind", "message"}}` with its status: 400 bad JSON, 401 no or wrong API key,
404 no such route or no model of that kind, 413 body too large, 422 a bad field (the runtime's
message, which names it), 429 queue full (Retry-After), 503 loading or draining, 504 past the
deadline. In a list, an item refused (422, 504) is its error record in its place ("item N: ..."; in
a stream, its `error` event), and the others are answered. A request's fields are checked once, by
the runtime's own types (`Request`, `CorrectionOptions`, `as_texts`, the options checks); the
OpenAPI schemas only document them.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import hmac
import json
import logging
import re
import threading
import time
import typing
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import TypeAdapter
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from lmcor.runtime.bundle import load_manifest, shipped_bundle
from lmcor.runtime.classifier import Classification, as_texts
from lmcor.runtime.errors import InputError, LmcorError
from lmcor.runtime.generator import Generation
from lmcor.runtime.jsonl import (check_body, check_value, json_kind, json_number_error, marked_keys, record_id,
                                 utf8_text, whole_numbers)
from lmcor.runtime.options import (
    MAX_BEAMS,
    MAX_LENGTH_PENALTY,
    MAX_NO_REPEAT_NGRAM,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    check_flag,
    check_int,
    check_items,
    check_max_new_tokens,
    check_number,
    check_temperature,
    check_text,
    check_words,
    shown,
)
from lmcor.runtime.request import Correction, CorrectionOptions, as_request
from lmcor.runtime.spacing import cleaned_up

from .config import ServeConfig, loopback
from .metrics import ENDPOINTS, Metrics
from .models import Batcher, Models, Prompt

log = logging.getLogger("lmcor.server")

OPTIONS = tuple(f.name for f in dataclasses.fields(CorrectionOptions))
CORRECT_FIELDS = ("id", "source", "candidates", *OPTIONS, "timeout_s", "stream")
CLASSIFY_FIELDS = ("model", "id", "text", "pair", "timeout_s")
GENERATE_FIELDS = ("model", "id", "prompt", "max_new_tokens", "temperature", "top_p", "seed", "stop", "timeout_s")
ROUTES = ("/v1/correct", "/v1/classify", "/v1/generate", "/health", "/metrics", "/openapi.json", "/docs", "/redoc")
# Open without the API key: /health, and the API's description (it holds no data, names no bundle,
# and a browser opening /docs cannot send a bearer token for the document the page then fetches).
PUBLIC = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


class _JSON(JSONResponse):
    """JSON with every non-ASCII character escaped: a lone surrogate that a client sent in an `id`
    (valid JSON, not valid UTF-8) comes back as it came, instead of failing the answer."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode("ascii")


class Refused(Exception):
    """An answer that is not a result: its status, its kind (the errors metric's label), its message;
    `index` is the item of a list it concerns."""

    def __init__(self, status: int, kind: str, message: str, headers: dict[str, str] | None = None,
                 index: int | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.headers, self.index = status, kind, message, headers, index


class ServerState:
    """What the routes share: the config, the models once loaded, the requests pending per endpoint,
    and whether the server is loading, ready, draining or failed to load."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.models: Models | None = None
        self.failure: BaseException | None = None
        self.draining = False
        self.in_flight = 0  # HTTP requests being answered; changed on the event loop only
        self._lock = threading.Lock()
        self._pending = dict.fromkeys(ENDPOINTS, 0)
        self._loader: threading.Thread | None = None
        self.metrics = Metrics(self.pending, self._running, lambda: self.in_flight)

    @property
    def broken(self) -> BaseException | None:
        """Why the server cannot answer: its bundles failed to load, or its engine stopped."""
        if self.failure is None and self.models is not None:
            return self.models.engine.failure
        return self.failure

    @property
    def status(self) -> str:
        if self.broken is not None:
            return "failed"
        if self.models is None:
            return "loading"
        return "draining" if self.draining else "ready"

    def start_loading(self) -> None:
        """Load the bundles in a thread: the server answers /health ("loading") meanwhile."""
        self._loader = threading.Thread(target=self._load, name="lmcor-load", daemon=True)
        self._loader.start()

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            models = Models.load(self.config)
        except Exception as e:
            self.failure = e
            log.error("loading failed", extra={"fields": {"error": str(e)}})
            return
        self.models = models
        log.info("ready", extra={"fields": {"load_s": round(time.perf_counter() - started, 3), **models.describe(),
                                            "batches": models.engine.batches}})

    def drain(self) -> None:
        """Refuse new requests (503); the server stops once those in flight are answered."""
        if not self.draining:
            self.draining = True
            log.info("draining", extra={"fields": {"in_flight": self.in_flight}})

    def close(self) -> None:
        if self._loader is not None:
            self._loader.join()
        if self.models is not None:
            self.models.close()

    def pending(self, endpoint: str) -> int:
        with self._lock:
            return self._pending[endpoint]

    def _running(self) -> int:
        models = self.models
        return 0 if models is None else min(self.pending("correct"), models.engine.batch_size)

    def submit(self, endpoint: str, calls: list[Callable[[], Future]]) -> list[Future]:
        """Start every call, or none: 429 when the queue is full now."""
        count, limit = len(calls), self.config.max_queue  # (a list longer than the queue is refused before: `_each`)
        with self._lock:
            waiting = sum(self._pending.values())
            if waiting + count > limit:
                raise Refused(429, "queue_full", f"{waiting} requests are waiting and the server queues at most "
                              f"{limit}; retry later", {"Retry-After": "1"})
            self._pending[endpoint] += count
        futures: list[Future] = []
        try:
            for call in calls:
                futures.append(call())
        except BaseException:
            for future in futures:
                future.cancel()
            self._release(endpoint, count)
            raise
        for future in futures:
            future.add_done_callback(lambda _: self._release(endpoint, 1))
        return futures

    def _release(self, endpoint: str, count: int) -> None:
        with self._lock:
            self._pending[endpoint] -= count


# Parsing: one object or a list of them; each field checked by the runtime's own types.

async def _json_body(request: Request, limit: int, seconds: float) -> Any:
    """The body's JSON value, read within `seconds` (a client that stops sending would otherwise hold
    its request, and a drain, open for as long as it keeps the connection)."""
    encoding = ", ".join(value.strip() for value in request.headers.getlist("content-encoding")).lower()
    if any(coding.strip() not in ("", "identity") for coding in encoding.split(",")):  # of every such header
        raise Refused(415, "unsupported_encoding", f"the body is sent with Content-Encoding {encoding!r}; "
                      "send it uncompressed")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        # The connection closes: a client may skip a refused body (Expect: 100-continue), and what it
        # sends next would be read as that body.
        raise Refused(413, "too_large", f"the body has {declared} bytes, over the limit of {limit} (--max-body-bytes)",
                      {"Connection": "close"})
    try:
        body = await asyncio.wait_for(_body(request, limit), seconds)
    except asyncio.TimeoutError:
        raise Refused(408, "body_timeout", f"the body did not arrive within {seconds:g} s (--timeout-s)",
                      {"Connection": "close"}) from None
    except ClientDisconnect:
        raise Refused(400, "disconnected", "the client closed the connection before its body ended") from None
    try:  # a BOM may start it (RFC 8259: a parser may ignore one), as it may start a JSONL file
        text = utf8_text(body, first=True)
    except InputError as e:
        raise Refused(400, "bad_json", f"the body is {e}") from None
    try:  # a key given twice, NaN or a number out of range fails its own request (`_each`)
        value = json.loads(text, object_pairs_hook=marked_keys)
    except (ValueError, RecursionError) as e:  # bad JSON, NaN, a number past the digit limit, deep nesting
        why = json_number_error(e) if isinstance(e, ValueError) and not isinstance(e, json.JSONDecodeError) else e
        raise Refused(400, "bad_json", f"the body is not valid JSON: {why}") from None
    try:
        check_body(value)
    except InputError as e:
        raise Refused(400, "bad_json", f"the body is not one of lmcor's requests: {e}") from None
    return value


async def _body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refused(413, "too_large", f"the body is over the limit of {limit} bytes (--max-body-bytes)",
                          {"Connection": "close"})
        chunks.append(chunk)
    return b"".join(chunks)


def _each(body: Any, parse: Callable[[Any], Any], most: int) -> tuple[list, list, bool]:
    """The parsed items of a body (one object or a list of them), their ids, and whether it was a
    list. A single object that does not parse is refused (422); in a list, such an item is its
    `InputError`, answered in its place, and the others are still served. A list of more than `most`
    items (the queue's size) is refused whole (413), those that would not parse counted: each costs
    the event loop its answer, and a megabyte of them held every other client for seconds."""
    many = isinstance(body, list)
    if many and not body:
        raise Refused(422, "invalid", "the body is an empty list: send one request or a list of them")
    if many and len(body) > most:
        raise Refused(413, "too_large", f"{len(body)} requests in one body; the server queues at most {most} "
                      "(--max-queue)")
    items = body if many else [body]
    parsed = []
    for item in items:
        try:
            check_value(item, "the request")  # a lone surrogate, NaN, a field given twice: named
            parsed.append(parse(item))
        except InputError as e:
            if not many:
                raise Refused(422, "invalid", str(e)) from None
            parsed.append(e)
    return parsed, [record_id(item) for item in items], many


def _submitted(state: ServerState, endpoint: str, parsed: list, call: Callable[[int, Any], Future]) -> list[Future]:
    """Each item's future, in order: the parsed items submitted together (`call(n, item)`); an item
    that did not parse takes no place in the queue, and its error is its answer."""
    futures = iter(state.submit(endpoint, [functools.partial(call, n, p) for n, p in enumerate(parsed)
                                           if not isinstance(p, InputError)]))
    return [_failed(p) if isinstance(p, InputError) else next(futures) for p in parsed]


def _failed(error: InputError) -> Future:
    future: Future = Future()
    future.set_exception(error)
    return future


def _timeouts(parsed: list, default: float) -> list[float]:
    """Each item's deadline: the last field of a parsed item; `default` for one that did not parse."""
    return [default if isinstance(p, InputError) else p[-1] for p in parsed]


def _records(state: ServerState, outcomes: list, ids: list, record: Callable[[int, Any], dict]) -> list[dict]:
    """A list's records in order: each item's, or `{"id", "error": {"kind", "message"}}` for an item
    refused (its status would have been 422 or 504 alone)."""
    out = []
    for n, (outcome, ident) in enumerate(zip(outcomes, ids)):
        if isinstance(outcome, Refused):
            state.metrics.errors.labels(outcome.kind).inc()
            out.append({"id": ident, "error": {"kind": outcome.kind, "message": outcome.message}})
        else:
            out.append(record(n, outcome))
    return out


# Fields whose values are integers (8.0 taken as 8: `whole_numbers`).
_INTEGERS = frozenset({"max_new_tokens", "min_new_tokens", "num_beams", "no_repeat_ngram_size", "fallback_span", "seed"})


def _fields(item: Any, known: tuple[str, ...], what: str) -> dict:
    if not isinstance(item, dict):
        raise InputError(f"expected {what}, got {json_kind(item)}")
    for key in item:
        if key not in known:
            raise InputError(f"unknown field {shown(key)} (fields: {', '.join(known)})")
    return whole_numbers(item, _INTEGERS)


def _timeout(item: dict, most: float) -> float:
    value = item.get("timeout_s")
    return most if value is None else check_number("timeout_s", value, 0, most, what="a number of seconds",
                                                   above_low=True)


def _named(batchers: dict[str, Batcher], name: Any, kind: str, flag: str) -> str:
    if not batchers:
        raise Refused(404, "not_loaded", f"this server has no {kind} (start it with {flag})")
    if name is None and len(batchers) == 1:
        return next(iter(batchers))
    if not isinstance(name, str) or name not in batchers:
        raise InputError(f"field 'model' must name one of this server's {kind}s: {', '.join(batchers)}"
                         f"{'' if name is None else f', got {shown(name)}'}")
    return name


# Answering: every submitted call is awaited with its deadline. One request's refusal is the answer;
# a list's items are answered each on its own.

async def _answer(future: Future, timeout: float, index: int, many: bool, arrived: float) -> Any:
    """A request's result, or its refusal (422, 504): raised for a lone request, returned in its place
    for an item of a list. Any other failure (the models') is raised. The deadline runs from the
    request's arrival (`time.monotonic()`), its body's reading included: a drain, which waits at most
    --timeout-s for what was accepted, then never cuts an answer short."""
    where = f"item {index}: " if many else ""
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), max(0.0, arrived + timeout - time.monotonic()))
    except asyncio.TimeoutError:
        refused = Refused(504, "timeout", f"{where}no answer within {timeout:g} s (timeout_s)", index=index)
    except InputError as e:
        refused = Refused(422, "invalid", f"{where}{e}", index=index)
    if many:
        return refused
    raise refused


async def _all(futures: list[Future], timeouts: list[float], many: bool, arrived: float,
               receive: Callable[[], Awaitable[dict]]) -> list:
    """Each request's outcome (`_answer`), in order. A client that leaves before its answer (`receive`
    says so) has its requests withdrawn, as a streaming client's are: they leave the engine's batch
    and the queue instead of decoding for no one."""
    tasks = [asyncio.ensure_future(_answer(f, t, n, many, arrived)) for n, (f, t) in enumerate(zip(futures, timeouts))]
    left = asyncio.ensure_future(_client_left(receive))
    try:
        waiting, watched = set(tasks), {left}
        while waiting:
            finished, _ = await asyncio.wait(waiting | watched, return_when=asyncio.FIRST_COMPLETED)
            if left in finished and watched:
                watched = set()
                if left.exception() is None:  # (an answer finished in the same turn is not sent either)
                    raise Refused(499, "client_left", "the client closed the connection before its answer")
                log.warning("cannot watch the connection (%s); answering without", left.exception())
            finished.discard(left)
            for task in finished:
                if task.exception() is not None:  # a lone request's refusal, or the models' failure
                    raise task.exception()
            waiting -= finished
        return [task.result() for task in tasks]
    finally:
        await _cancel(tasks + [left])  # after a failure the others' answers are not wanted


async def _client_left(receive: Callable[[], Awaitable[dict]]) -> None:
    """Returns once the client has closed the connection (its body was read whole before)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _cancel(tasks: list[asyncio.Future]) -> None:
    """Cancel what is still waiting (an engine skips a cancelled request it has not admitted), and
    collect every outcome, so that no failure is left unretrieved."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _event(name: str, data: dict) -> str:
    return f"event: {name}\ndata: {json.dumps(data, allow_nan=False)}\n\n"


class _Tokens:
    """A streamed request's text as the engine writes it: token ids arrive from the engine's thread,
    and each `token` event carries the text they added (decoded whole, so that a word split over two
    steps comes out right). What the next tokens may still change waits: a character whose bytes are
    split between tokens (decoded as U+FFFD until its last byte comes), and, where the bundle cleans
    up spaces ("a ," becomes "a,"), the last two words; it is sent before the result."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tokenizer: Any, count: int, *, clean_up: bool = False):
        self.loop, self.tokenizer, self.clean_up = loop, tokenizer, clean_up
        self.queue: asyncio.Queue[tuple[int, list[int]]] = asyncio.Queue()
        self.ids: list[list[int]] = [[] for _ in range(count)]
        self.shown = [""] * count
        self.answered: set[int] = set()  # a request answered (a deadline passed mid-decode) gets no more tokens
        self.started = asyncio.Event()  # the first tokens came

    def listener(self, index: int) -> Callable[[list[int]], None]:
        return lambda tokens: self.loop.call_soon_threadsafe(self._arrived, index, tokens)

    def _arrived(self, index: int, tokens: list[int]) -> None:
        self.queue.put_nowait((index, tokens))
        self.started.set()

    def events(self, first: list[tuple[int, list[int]]]) -> list[str]:
        """The events of `first` (taken from the queue already) and of everything queued after it."""
        out = []
        arrived = list(first)
        while not self.queue.empty():
            arrived.append(self.queue.get_nowait())
        for index, tokens in arrived:
            if index in self.answered:
                continue
            self.ids[index] += tokens
            out += self._added(index, settled=True)
        return out

    def rest(self, index: int) -> list[str]:
        """The event of the text a finished request's tokens added that `events` held back."""
        return self._added(index, settled=False)

    def _added(self, index: int, *, settled: bool) -> list[str]:
        text = self.tokenizer.decode(self.ids[index], skip_special_tokens=True)
        if self.clean_up:
            text = cleaned_up(text)
        if settled:
            text = text.rstrip("\ufffd")
            if self.clean_up:  # one replacement can make the next ("do n ' t": "do n't", then "don't"): two words wait
                text = text[: max(text.rfind(" ", 0, max(text.rfind(" "), 0)), 0)]
        shown = self.shown[index]
        if not (text.startswith(shown) and len(text) > len(shown)):
            return []
        self.shown[index] = text
        return [_event("token", {"index": index, "text": text[len(shown) :]})]


async def _started(future: Future, tokens: _Tokens, timeout: float, arrived: float,
                   receive: Callable[[], Awaitable[dict]]) -> None:
    """Returns once a lone streamed request has its first tokens or its answer, so that a refusal found
    only as it is admitted (an input too long for the model), its deadline or its client leaving gets
    its own status (422, 504, 499), as an unstreamed request's does, not a 200 and an error event."""
    loop = asyncio.get_running_loop()
    answered = asyncio.Event()
    future.add_done_callback(lambda _: loop.call_soon_threadsafe(answered.set))
    waits = [asyncio.ensure_future(event.wait()) for event in (answered, tokens.started)]
    left = asyncio.ensure_future(_client_left(receive))
    try:
        done, _ = await asyncio.wait([*waits, left], timeout=max(0.0, arrived + timeout - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        await _cancel([*waits, left])
    if left in done:
        if left.exception() is None:  # (an answer finished in the same turn is not sent either, as in `_all`)
            future.cancel()  # it leaves the engine's batch, as a stream's does when its client leaves
            raise Refused(499, "client_left", "the client closed the connection before its answer")
        log.warning("cannot watch the connection (%s); answering without", left.exception())
    if not done or (future.done() and not future.cancelled() and future.exception() is not None):
        await _answer(future, timeout, 0, False, arrived)  # raises its refusal (or the models' failure)


async def _stream(state: ServerState, futures: list[Future], timeouts: list[float], many: bool, arrived: float,
                  record: Callable[[int, Any], dict], tokens: _Tokens | None = None) -> AsyncIterator[str]:
    """Server-sent events: `token` events with each request's text as it is decoded (with `tokens`),
    one `result` (or `error`) per request as it finishes, then `done`; nothing more for a request
    once it is answered."""
    tasks = [asyncio.ensure_future(_answer(f, t, n, many, arrived)) for n, (f, t) in enumerate(zip(futures, timeouts))]
    index = {task: n for n, task in enumerate(tasks)}
    waiting = set(tasks)
    arrival = asyncio.ensure_future(tokens.queue.get()) if tokens is not None else None
    try:
        while waiting:
            finished, _ = await asyncio.wait(waiting | ({arrival} if arrival else set()),
                                             return_when=asyncio.FIRST_COMPLETED)
            if tokens is not None:
                first = []
                if arrival in finished:
                    first = [arrival.result()]
                    arrival = asyncio.ensure_future(tokens.queue.get())
                for event in tokens.events(first):  # before any result: a request's tokens come first
                    yield event
            finished &= waiting
            waiting -= finished
            for task in sorted(finished, key=index.__getitem__):
                try:
                    result = task.result()
                except Refused as e:
                    result = e
                except Exception as e:  # the models' failure: the headers are sent, so an error event, not a 500
                    log.error("internal error in a stream", exc_info=e)
                    result = Refused(500, "internal", f"{type(e).__name__}: {e}", index=index[task])
                if tokens is not None:
                    if not isinstance(result, Refused):
                        for event in tokens.rest(index[task]):
                            yield event
                    tokens.answered.add(index[task])
                if isinstance(result, Refused):
                    state.metrics.errors.labels(result.kind).inc()
                    yield _event("error", {"index": result.index, "kind": result.kind, "message": result.message})
                else:
                    yield _event("result", {"index": index[task], **record(index[task], result)})
        yield _event("done", {})
    finally:
        # The client went away: what is not decoded yet is skipped.
        await _cancel(tasks + ([arrival] if arrival is not None else []))


def correction_record(result: Correction) -> dict:
    """`lmcor correct`'s record, less its line number."""
    return {
        "id": result.id,
        "output": result.text,
        "truncated": result.truncated,
        "input_tokens": result.stats.input_tokens,
        "output_tokens": result.stats.output_tokens,
        **({"gated": True} if result.gated else {}),
        **({"fallback": True} if result.fallback else {}),
    }


# OpenAPI: the bodies the routes read and the records they answer, documented from the runtime's
# own option types and limits, and from this server's models.

_BOUNDS = {"max_new_tokens": {"minimum": 1}, "min_new_tokens": {"minimum": 0},
           "num_beams": {"minimum": 1, "maximum": MAX_BEAMS},
           "length_penalty": {"minimum": -MAX_LENGTH_PENALTY, "maximum": MAX_LENGTH_PENALTY},
           "no_repeat_ngram_size": {"minimum": 0, "maximum": MAX_NO_REPEAT_NGRAM},
           "gate_threshold": {"minimum": 0, "maximum": 1}, "fallback_below": {"minimum": 0, "maximum": 100},
           "fallback_span": {"minimum": 0}}


def _option_schemas(most_tokens: int | None, gate: bool) -> dict[str, dict]:
    """`CorrectionOptions`' fields with their bounds (max_new_tokens: this server's corrector's);
    `gate_threshold` only where the server has a gate to read it."""
    hints = typing.get_type_hints(CorrectionOptions)
    defaults = CorrectionOptions()
    out = {}
    for name in OPTIONS:
        if name == "gate_threshold" and not gate:
            continue
        schema = TypeAdapter(hints[name]).json_schema()
        bounds = {**_BOUNDS.get(name, {}), **({"maximum": most_tokens} if name.endswith("_new_tokens") and most_tokens else {})}
        if "anyOf" in schema:  # T | None: the bounds go with T
            schema = {"anyOf": [{**s, **bounds} if s.get("type") != "null" else s for s in schema["anyOf"]]}
        else:
            schema = {**schema, **bounds}
        out[name] = {**schema, "default": getattr(defaults, name)}
    return out


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def _one_or_many(item: dict, record: dict, *, stream: bool = False) -> dict:
    """A route's request body (one item or a list) and its 200 answer (one record, or a list of
    records and per-item errors; with `stream`, server-sent events too)."""
    answer = {"anyOf": [record, {"type": "array", "items": {"anyOf": [record, _ITEM_ERROR]}}]}
    content = {"application/json": {"schema": answer}}
    if stream:
        content["text/event-stream"] = {"schema": {"type": "string", "description": "with \"stream\": true: "
                                                   "token, result and error events, then done"}}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": {
        "anyOf": [item, {"type": "array", "items": item, "minItems": 1}]}}}},
        "responses": {"200": {"description": "the answer, in the order of the requests", "content": content}}}


def _item(required: list[str], properties: dict, timeout_s: float) -> dict:
    return {"type": "object", "required": required, "additionalProperties": False,
            "properties": {**properties, "timeout_s": _nullable({
                "type": "number", "exclusiveMinimum": 0, "maximum": timeout_s,
                "description": "deadline in seconds from the request's arrival (at most the server's --timeout-s)"})}}


def _model_field(names: list[str]) -> dict:
    """`model`: one of the server's models (none: any name is refused, 404); null (or left out) only
    where it has one."""
    name = {"type": "string", "enum": names} if names else {"type": "string"}
    return _nullable(name) if len(names) == 1 else name


def _named_item(names: list[str], required: list[str], properties: dict, timeout_s: float) -> dict:
    """`_item` of a route whose `model` field must name one of several models."""
    return _item([*required, "model"] if len(names) > 1 else required,
                 {"model": _model_field(names), **properties}, timeout_s)


_ERROR = {"type": "object", "required": ["kind", "message"],
          "properties": {"kind": {"type": "string"}, "message": {"type": "string"}}}
_ITEM_ERROR = {"type": "object", "required": ["id", "error"], "properties": {"id": {}, "error": _ERROR}}
_TEXTS = {"type": "array", "items": {"type": "string"}}
# A character that is not white space as Python's str.strip() reads it, spelt out: JSON Schema's \S is
# ECMA-262's, which differs (U+FEFF is space there, U+001C-U+001F and U+0085 are not).
_NOT_SPACE = r"[^\t-\r\x1c- \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
_TEXT = {"type": "string", "pattern": _NOT_SPACE, "description": "not empty, not only white space"}
_ID = {"description": "any JSON value, returned as given"}
_CORRECTION = {"type": "object", "required": ["id", "output", "truncated", "input_tokens", "output_tokens"],
               "properties": {"id": {}, "output": {"type": "string"}, "truncated": {"type": "boolean"},
                              "input_tokens": {"type": "integer"}, "output_tokens": {"type": "integer"},
                              "gated": {"type": "boolean"}, "fallback": {"type": "boolean"}}}
_CLASSIFICATION = {"type": "object", "required": ["id", "label", "labels", "probabilities", "truncated"],
                   "properties": {"id": {}, "label": {"type": "string"}, "labels": {"type": "array", "items": {"type": "string"}},
                                  "probabilities": {"type": "array", "items": {"type": "number"}},
                                  "truncated": {"type": "boolean"}}}
_GENERATION = {"type": "object", "required": ["id", "output", "output_tokens"],
               "properties": {"id": {}, "output": {"type": "string"}, "output_tokens": {"type": "integer"}}}


def _bodies(config: ServeConfig) -> dict[str, dict]:
    """The OpenAPI parts of the three routes, for this server's models and limits."""
    corrector = _most_tokens(config.model)
    generators = [m for m in (_most_tokens(path) for path in (config.generators or {}).values()) if m]
    correct = _one_or_many(_item(["source", "candidates"], {
        "id": _ID, "source": _TEXT, "candidates": {**_TEXTS, "minItems": 1},
        **_option_schemas(corrector, config.gate is not None),
        "stream": {"type": "boolean", "default": False, "description": "server-sent events (the same in every item)"}},
        config.timeout_s), _CORRECTION, stream=True)
    classify = _one_or_many(_named_item(list(config.classifiers or {}), ["text"], {
        "id": _ID, "text": _TEXT, "pair": _nullable({"type": "string"})}, config.timeout_s), _CLASSIFICATION)
    tokens = {"type": "integer", "minimum": 1, **({"maximum": max(generators)} if generators else {}),
              "description": "at most the generator's max_output_tokens"}
    generate = _one_or_many(_named_item(list(config.generators or {}), ["prompt"], {
        "id": _ID, "prompt": _TEXT,
        "max_new_tokens": _nullable(tokens),
        "temperature": {"anyOf": [{"type": "number", "enum": [0]},
                                  {"type": "number", "minimum": MIN_TEMPERATURE, "maximum": MAX_TEMPERATURE}],
                        "default": 0.0, "description": "0: greedy"},
        "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1.0},
        "seed": _nullable({"type": "integer", "minimum": 0}),
        "stop": {"type": "array", "items": {"type": "string", "minLength": 1}}}, config.timeout_s), _GENERATION)
    return {"correct": correct, "classify": classify, "generate": generate}


def _most_tokens(path: Any) -> int | None:
    """A bundle's max_output_tokens (None: the shipped corrector), for the schema; None where its
    manifest cannot be read: the server then fails to load it, and says why."""
    try:
        return load_manifest(path if path is not None else shipped_bundle("default"), verify=False).max_output_tokens
    except LmcorError:
        return None


ERRORS = {status: {"description": text, "content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": _ERROR}}}}} for status, text in (
    (400, "the body is not JSON, or (on loopback) the request is for another host"), (401, "no or wrong API key"), (404, "no such route, or no such model on this server"),
    (405, "the route takes another method"), (408, "the body did not arrive within the deadline"),
    (413, "the body is too large, or holds more requests than the queue"),
    (415, "the body is compressed (Content-Encoding)"),
    (422, "a bad field: the message names it"), (429, "the queue is full: retry after Retry-After seconds"),
    (500, "the models failed on its batch, or the engine stopped (kind internal)"),
    (503, "loading, or draining before it stops"), (504, "no answer within the deadline"))}
_HEALTH = {"content": {"application/json": {"schema": {
    "type": "object", "required": ["status", "live", "ready", "models"], "properties": {
        "status": {"type": "string", "enum": ["loading", "ready", "draining", "failed"]},
        "live": {"type": "boolean"}, "ready": {"type": "boolean"},
        "models": {"type": ["object", "null"], "description": "the bundles served (null without the API key)"}}}}}}


def create_app(config: ServeConfig) -> FastAPI:
    """The app; its lifespan loads the config's bundles (in a thread: /health says "loading"
    meanwhile) and closes them once every request taken is answered. `app.state.lmcor` is its
    `ServerState`."""
    state = ServerState(config)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.start_loading()
        yield
        await asyncio.to_thread(state.close)

    # No redirect from a path with a trailing slash: a 404 like any other unknown path (a redirect's
    # Location would be built from the client's own Host header).
    app = FastAPI(title="lmcor", summary="Small models that improve big ones, over HTTP", lifespan=lifespan,
                  redirect_slashes=False)
    app.state.lmcor = state
    app.add_middleware(_Guard, state=state)

    @app.exception_handler(Refused)
    async def refused(_: Request, e: Refused) -> Response:
        return _error(state, e.status, e.kind, e.message, e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> Response:
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http")
        return _error(state, e.status_code, kind, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def internal(_: Request, e: Exception) -> Response:  # outside `_Guard` alone; uvicorn logs it
        return _error(state, 500, "internal", f"{type(e).__name__}: {e}")

    bodies = _bodies(config)

    @app.post("/v1/correct", openapi_extra=bodies["correct"], responses=ERRORS)
    async def correct(request: Request) -> Response:
        """Correct one request `{"id"?, "source", "candidates", ...options}` or a list of them: one
        record each, in order. Options are `CorrectionOptions`' fields, per request; a gate, if the
        server has one, answers requests whose first candidate it finds right. `"stream": true`
        answers with server-sent events: `token` events with the text each request's decoder adds
        as it goes (greedy decoding), one `result` per request as it finishes (`index` says which;
        its `output` is final, the fallback may have replaced what the tokens spelled), then `done`."""
        arrived, models = time.monotonic(), _models(state)

        def parse(item: Any) -> tuple:
            item = _fields(item, CORRECT_FIELDS, "an object with 'source' and 'candidates'")
            options = CorrectionOptions(**{name: item[name] for name in OPTIONS if name in item})
            if options.gate_threshold is not None and models.gate is None:
                raise InputError("field 'gate_threshold': this server has no gate to read it (serve with --gate)")
            models.engine.search(options)  # against this bundle (max_new_tokens at most its max_output_tokens)
            request = as_request({name: item[name] for name in ("id", "source", "candidates") if name in item})
            return (request, options, check_flag("stream", item.get("stream", False)),
                    _timeout(item, config.timeout_s))

        body = await _json_body(request, config.max_body_bytes, config.timeout_s)
        parsed, ids, many = _each(body, parse, config.max_queue)
        # What every item asks for, those that did not parse too (their errors go the same way), but
        # not one that gave `stream` twice.
        streams = {item.get("stream", False) for item in (body if many else [body])
                   if isinstance(item, dict) and isinstance(item.get("stream", False), bool)
                   and "stream" not in getattr(item, "repeated", ())} or {False}
        if len(streams) > 1:
            raise Refused(422, "invalid", "field 'stream' must be the same in every item of a list")
        streamed = streams == {True}
        tokens = _Tokens(asyncio.get_running_loop(), models.engine.tokenizer, len(parsed),
                         clean_up=models.engine.manifest.clean_up_spaces) if streamed else None
        futures = _submitted(state, "correct", parsed, lambda n, p: models.engine.submit(
            p[0], p[1], gate=models.gate, on_tokens=tokens.listener(n) if tokens else None))
        timeouts = _timeouts(parsed, config.timeout_s)

        def record(n: int, result: Correction) -> dict:
            state.metrics.corrected(result)
            return correction_record(result)

        if streamed:
            if not many:
                await _started(futures[0], tokens, timeouts[0], arrived, request.receive)
            return StreamingResponse(_stream(state, futures, timeouts, many, arrived, record, tokens),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        outcomes = await _all(futures, timeouts, many, arrived, request.receive)
        return _JSON(_records(state, outcomes, ids, record) if many else record(0, outcomes[0]))

    @app.post("/v1/classify", openapi_extra=bodies["classify"], responses=ERRORS)
    async def classify(request: Request) -> Response:
        """Classify one text (or text pair) `{"model"?, "id"?, "text", "pair"?}` or a list of them.
        `model` names a classifier of the server (not needed when it has one). Concurrent requests
        share the model's batches."""
        arrived, models = time.monotonic(), _models(state)

        def parse(item: Any) -> tuple:
            item = _fields(item, CLASSIFY_FIELDS, "an object with 'text'")
            name = _named(models.classify, item.get("model"), "classifier", "--classifier NAME=BUNDLE")
            as_texts(item)
            return name, item, _timeout(item, config.timeout_s)

        parsed, ids, many = _each(await _json_body(request, config.max_body_bytes, config.timeout_s), parse,
                                  config.max_queue)
        futures = _submitted(state, "classify", parsed, lambda n, p: models.classify[p[0]].submit(p[1]))
        outcomes = await _all(futures, _timeouts(parsed, config.timeout_s), many, arrived, request.receive)

        def record(n: int, result: Classification) -> dict:
            state.metrics.requests.labels("classify", "classified").inc()
            return {"id": result.id, "label": result.label, "labels": list(models.classifiers[parsed[n][0]].labels),
                    "probabilities": result.probabilities.tolist(), "truncated": result.truncated}

        return _JSON(_records(state, outcomes, ids, record) if many else record(0, outcomes[0]))

    @app.post("/v1/generate", openapi_extra=bodies["generate"], responses=ERRORS)
    async def generate(request: Request) -> Response:
        """Continue one prompt `{"model"?, "id"?, "prompt", "max_new_tokens"?, "temperature"?,
        "top_p"?, "seed"?, "stop"?}` or a list of them (`Generator.generate_batch`'s options, per
        prompt; greedy by default). Concurrent prompts with the same options share batches; each
        samples with its own seed."""
        arrived, models = time.monotonic(), _models(state)

        def parse(item: Any) -> tuple:
            item = _fields(item, GENERATE_FIELDS, "an object with 'prompt'")
            name = _named(models.generate, item.get("model"), "generator", "--generator NAME=BUNDLE")
            if isinstance(item.get("id"), str):
                check_text("field 'id'", item["id"])
            if "prompt" not in item:
                raise InputError("missing field 'prompt'")
            prompt = check_words("field 'prompt'", item["prompt"])
            stop = check_items("stop", item.get("stop", []), "strings")
            for n, text in enumerate(stop):
                if not isinstance(text, str):
                    raise InputError(f"stop[{n}] must be a string, got {shown(text)}")
            seed = item.get("seed")
            most = item.get("max_new_tokens")
            return name, item.get("id"), Prompt(
                text=prompt,
                max_new_tokens=None if most is None else check_max_new_tokens(
                    most, models.generators[name].manifest.max_output_tokens),
                temperature=check_temperature(item.get("temperature", 0.0)),
                top_p=check_number("top_p", item.get("top_p", 1.0), 0, 1, above_low=True),
                seed=None if seed is None else check_int("seed", seed, 0), stop=tuple(stop),
            ), _timeout(item, config.timeout_s)

        parsed, ids, many = _each(await _json_body(request, config.max_body_bytes, config.timeout_s), parse,
                                  config.max_queue)
        futures = _submitted(state, "generate", parsed, lambda n, p: models.generate[p[0]].submit(p[2]))
        outcomes = await _all(futures, _timeouts(parsed, config.timeout_s), many, arrived, request.receive)

        def record(n: int, result: Generation) -> dict:
            state.metrics.requests.labels("generate", "generated").inc()
            return {"id": parsed[n][1], "output": result.text, "output_tokens": len(result.token_ids)}

        return _JSON(_records(state, outcomes, ids, record) if many else record(0, outcomes[0]))

    # One route for GET and HEAD (load balancers probe with HEAD), so that a 405 allows both.
    @app.api_route("/health", methods=["GET", "HEAD"],
                   responses={200: {"description": "ready", **_HEALTH},
                              503: {"description": "loading, draining, or failed to load", **_HEALTH}})
    async def health(request: Request) -> Response:
        """Live whenever it answers; ready (200) once its bundles are loaded and until it drains. The
        bundles' paths are this machine's: with an API key, only a caller that sends it reads them."""
        status = state.status
        models = state.models
        visible = models is not None and (config.api_key is None or _has_key(request.scope, config.api_key.encode()))
        return _JSON({"status": status, "live": True, "ready": status == "ready",
                      "models": models.describe() if visible else None},
                     status_code=200 if status == "ready" else 503)

    @app.api_route("/metrics", methods=["GET", "HEAD"], response_class=PlainTextResponse,
                   responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        """Prometheus text format: queue depth, batch size, requests, tokens, latencies, errors."""
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        """FastAPI's document with one operationId per operation: it gives a route's GET and HEAD
        the same id (invalid OpenAPI, which client generators refuse)."""
        if app.openapi_schema is None:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Duplicate Operation ID")
                schema = FastAPI.openapi(app)
            operations = [(method, op) for item in schema["paths"].values() for method, op in item.items()]
            count = collections.Counter(op["operationId"] for _, op in operations)
            for method, op in operations:
                if count[op["operationId"]] > 1:
                    op["operationId"] = f"{re.sub(r'_[a-z]+$', '', op['operationId'])}_{method}"
            if config.api_key is not None:  # what the key guards, so that /docs can send it ("Authorize")
                schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for path, item in schema["paths"].items():
                    for op in item.values():
                        op["security"] = [] if path in PUBLIC else [{"bearer": []}]
                        if path not in PUBLIC:
                            op["responses"].setdefault("401", ERRORS[401])
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _models(state: ServerState) -> Models:
    models = state.models
    if models is None:  # the guard refuses /v1 while loading; this is for the type checker and races
        raise Refused(503, "loading", "the server is loading its models", {"Retry-After": "1"})
    return models


def _error(state: ServerState, status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> Response:
    state.metrics.errors.labels(kind).inc()
    return _JSON({"error": {"kind": kind, "message": message}}, status_code=status, headers=headers)


class _Guard:
    """Before the routes: the API key (every route but those in `PUBLIC`), 503 for /v1 while loading or
    draining; around them: the in-flight count that draining waits on, the HTTP metrics and the JSON
    access log. Plain ASGI, so that a streamed answer counts until its last byte."""

    def __init__(self, app: Any, state: ServerState):
        self.app, self.state = app, state
        key = state.config.api_key
        self.key = None if key is None else key.encode()
        # On loopback, a request for another host is a web page's, reaching the server through DNS
        # rebinding (a name of the page's that resolves to 127.0.0.1), which would read the answers; or
        # a proxy's in front of it, named in allowed_hosts.
        allowed = state.config.allowed_hosts
        self.local_only = loopback(state.config.host) and "*" not in allowed
        self.allowed = frozenset(allowed)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state, path = self.state, scope["path"]
        route = path if path in ROUTES else "other"
        started = time.perf_counter()
        status = None  # until a response starts

        async def sent(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        state.in_flight += 1
        try:
            await (self._refusal(path, scope) or self.app)(scope, receive, sent)
        except Exception as e:
            if status is not None:  # a stream cut short: only a closed connection can tell its client
                raise
            # Answered here, not raised on to Starlette's last handler, which re-raises it: uvicorn
            # then closes the connection, and a client's next request on it is reset.
            log.error("internal error", exc_info=e, extra={"fields": {"method": scope["method"], "path": path[:200]}})
            await _error(state, 500, "internal", f"{type(e).__name__}: {e}")(scope, receive, sent)
        finally:
            status = 500 if status is None else status
            state.in_flight -= 1
            seconds = time.perf_counter() - started
            state.metrics.http.labels(route, str(status)).inc()
            state.metrics.http_seconds.labels(route).observe(seconds)
            log.info("request", extra={"fields": {"method": scope["method"], "path": path[:200], "status": status,
                                                  "ms": round(1000 * seconds, 2)}})

    def _refusal(self, path: str, scope: dict) -> Response | None:
        state = self.state
        hosts = [value for name, value in scope["headers"] if name == b"host"]
        if len(hosts) > 1:  # which one a proxy or this server would read is not agreed: refused (RFC 9112)
            return _error(state, 400, "bad_host", f"the request has {len(hosts)} Host headers; one at most")
        if self.local_only and hosts and not (loopback(host := _host_name(hosts[0])) or host in self.allowed):
            return _error(state, 400, "bad_host", f"the request is for the host {host[:100]!r}, but this server "
                          "listens on loopback and answers requests for localhost and loopback addresses (and "
                          "--allow-host names: a proxy's in front of it)")
        if path in PUBLIC:
            return None
        if self.key is not None and not _has_key(scope, self.key):
            return _error(state, 401, "unauthorized", "this server needs its API key: Authorization: Bearer KEY",
                          {"WWW-Authenticate": "Bearer"})
        if not path.startswith("/v1/"):
            return None
        if state.draining:
            return _error(state, 503, "draining", "the server is stopping: it takes no new requests",
                          {"Connection": "close"})
        if state.models is None:
            return _error(state, 503, "loading", "the server is loading its models", {"Retry-After": "1"})
        return None


def _host_name(value: bytes) -> str:
    """The host name a Host header's value names (no port; an IPv6 address without its brackets)."""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    name, colon, port = text.rpartition(":")
    return name if colon and port.isdigit() else text


def _has_key(scope: dict, key: bytes) -> bool:
    """Whether the request sends `key` as its bearer token."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)
    return False
