"""Running the app: `serve` (the `lmcor serve` process, signals and all) and `running` (a server in a
thread of this process, for tests and benchmarks), on uvicorn, with lmcor's shutdown: the first
SIGTERM/SIGINT drains (503 for new requests, every request in flight answered, then exit 0), a
second stops at once (the process exits there: ONNX Runtime may be mid-call in the engine's thread,
and an interpreter shut down around it aborts). A drain waits at most `--timeout-s` and
`DRAIN_GRACE_S` more for its answers to be taken: a client that stops reading holds none open."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType

import uvicorn

from lmcor.runtime.errors import LmcorError

from .app import ServerState, create_app
from .config import ServeConfig

log = logging.getLogger("lmcor.server")
EXIT_FORCED = {signal.SIGINT: 130, signal.SIGTERM: 143}
DRAIN_GRACE_S = 10.0


class JsonLines(logging.Formatter):
    """One JSON object per log line: time, level, logger, message, and the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def log_to_stderr() -> None:
    """lmcor's and uvicorn's log lines as JSON on stderr (lmcor's from INFO: startup, drain, access)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLines())
    for name, level in (("lmcor.server", logging.INFO), ("uvicorn", logging.WARNING)):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.state = state
        self._drain_deadline: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Replaces uvicorn's, which stops accepting connections at once and re-raises the signal on exit.
        if not self.state.draining:
            self.state.drain()
            return
        log.warning("stopped at once by a second signal", extra={"fields": {"in_flight": self.state.in_flight}})
        for handler in logging.getLogger("lmcor.server").handlers:
            handler.flush()
        os._exit(EXIT_FORCED.get(sig, 1))

    async def on_tick(self, counter: int) -> bool:
        state = self.state
        if state.broken is not None:  # its bundles failed to load, or the corrector's engine stopped: it goes,
            state.drain()             # once the other models have answered what they took
        if state.draining and self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + state.config.timeout_s + DRAIN_GRACE_S
        if state.draining and state.in_flight == 0:
            # Answers handed to their connections may still be on their way to slow clients: uvicorn's
            # shutdown waits for the connections to close until the drain's deadline, not a second.
            self.config.timeout_graceful_shutdown = max(1, self._drain_deadline - time.monotonic())
            self.should_exit = True
        elif self._drain_deadline is not None and time.monotonic() > self._drain_deadline:
            log.warning("drain cut short: answers not taken in time", extra={"fields": {"in_flight": state.in_flight}})
            self.should_exit = True
        return await super().on_tick(counter)


def _server(config: ServeConfig) -> tuple[_Server, socket.socket]:
    app = create_app(config)
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on sockets that
    # say TCP, and with it on, each answer waits ~40 ms for the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((config.host, config.port))
        sock.listen(2048)  # from now on, connections wait in the backlog until uvicorn accepts them
    except OSError as e:
        sock.close()
        raise LmcorError(f"cannot listen on {config.host}:{config.port}: {e.strerror or e}") from None
    # uvicorn's own logging setup and access log are off: lmcor logs JSON lines (`log_to_stderr`).
    # timeout_graceful_shutdown: once the drain's deadline has passed, a connection whose client is
    # not reading is closed within a second rather than waited for (`on_tick` sets it for a drain).
    uv = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", timeout_keep_alive=30,
                        timeout_graceful_shutdown=1)
    return _Server(uv, app.state.lmcor), sock


def _url(config: ServeConfig, sock: socket.socket) -> str:
    host = f"[{config.host}]" if ":" in config.host else config.host
    return f"http://{host}:{sock.getsockname()[1]}"


def serve(config: ServeConfig, announce: Callable[[str], None] = print) -> int:
    """Serve until a signal drains the server; `announce` gets its URL once it listens (the port
    chosen when `config.port` is 0). Returns 0 after a drain (a second signal exits the process at
    once, 130/143); raises the error of bundles that failed to load."""
    server, sock = _server(config)
    url = _url(config, sock)
    if threading.current_thread() is threading.main_thread():  # a signal as soon as it listens drains it too
        for sig in EXIT_FORCED:
            signal.signal(sig, server.handle_exit)
    announce(url)
    log.info("listening", extra={"fields": {"url": url, "max_batch": config.max_batch, "max_queue": config.max_queue,
                                            "timeout_s": config.timeout_s, "auth": config.api_key is not None}})
    server.run(sockets=[sock])
    broken = server.state.broken
    if isinstance(broken, LmcorError):
        raise broken
    if broken is not None:  # the engine's loop stopped (it logged the traceback)
        raise LmcorError(f"the corrector's engine stopped: {type(broken).__name__}: {broken}") from broken
    log.info("stopped", extra={"fields": {}})
    return 0


@dataclass(frozen=True)
class Running:
    url: str
    state: ServerState


@contextmanager
def running(config: ServeConfig, *, load_timeout_s: float = 120.0) -> Iterator[Running]:
    """A server in a thread of this process, ready (bundles loaded) when this yields; on exit it
    drains as on a signal and its thread is joined."""
    server, sock = _server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="lmcor-serve", daemon=True)
    thread.start()
    state = server.state
    deadline = time.monotonic() + load_timeout_s
    try:
        while state.status == "loading" or not server.started:
            if state.failure is not None:
                raise state.failure
            if time.monotonic() > deadline or not thread.is_alive():
                raise LmcorError(f"the server did not start within {load_timeout_s:g} s")
            time.sleep(0.01)
        yield Running(_url(config, sock), state)
    finally:
        state.drain()
        thread.join()
