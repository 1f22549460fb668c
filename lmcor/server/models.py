"""`Models`: the bundles a server holds, and `Batcher`, which runs one model's calls from concurrent
requests together.

The corrector answers through its own `Engine` (continuous batching, `max_batch` rows). Classifiers
and generators have no engine: a `Batcher` thread per bundle takes whatever calls wait and makes one
batch call of them, so concurrent requests share a model call instead of queueing for it.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from lmcor.runtime.bundle import load_manifest, shipped_bundle
from lmcor.runtime.classifier import Classification, Classifier, check_gate_bundle
from lmcor.runtime.corrector import Corrector
from lmcor.runtime.engine import Engine
from lmcor.runtime.errors import InputError, LmcorError
from lmcor.runtime.generator import Generation, Generator, row_seed
from lmcor.runtime.sessions import known_providers, usable_providers

from .config import ServeConfig

T = TypeVar("T")
R = TypeVar("R")

CLASSIFY_BATCH = 32  # `lmcor classify`'s default
GENERATE_BATCH = 8  # `lmcor generate`'s default
_ITEM_PREFIX = re.compile(r"^item \d+: ")


class Batcher(Generic[T, R]):
    """Calls of one model from many threads, run together: a worker thread takes what waits (at most
    `batch_size` items), calls `run` on them, and answers each item through its future (`run` returns
    a result or an exception per item; an exception it raises answers all of them)."""

    def __init__(self, name: str, run: Callable[[list[T]], list[R | Exception]], batch_size: int):
        self._run, self._batch_size = run, batch_size
        self._cond = threading.Condition()
        self._waiting: deque[tuple[T, Future]] = deque()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=f"lmcor-{name}", daemon=True)
        self._thread.start()

    def submit(self, item: T) -> Future[R]:
        future: Future[R] = Future()
        with self._cond:
            if self._closed:
                raise LmcorError("this model is closed: it takes no more requests")
            self._waiting.append((item, future))
            self._cond.notify()
        return future

    def close(self) -> None:
        """Take no more calls; return once every call taken is answered."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._closed):
                    self._cond.wait()
                if not self._waiting:
                    return
                taken = [self._waiting.popleft() for _ in range(min(self._batch_size, len(self._waiting)))]
            taken = [(item, future) for item, future in taken if future.set_running_or_notify_cancel()]
            if not taken:
                continue
            try:
                results = self._run([item for item, _ in taken])
            except Exception as e:  # the model failed on this batch: its calls fail, later ones run
                results = [e] * len(taken)
            for (_, future), result in zip(taken, results):
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)


@dataclass(frozen=True)
class Prompt:
    """One /v1/generate request: a prompt and how to continue it."""

    text: str
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


def _generate(generator: Generator, prompts: list[Prompt]) -> list[Generation | InputError]:
    """Prompts that continue alike share a `generate_batch` call; each keeps its own seed, so its
    sample does not depend on the others: a request's `seed` samples as `Generator.generate(prompt,
    seed=)` does, and as `lmcor generate --seed` does a file's first line."""
    groups: dict[tuple, list[int]] = {}
    for n, p in enumerate(prompts):
        groups.setdefault((p.max_new_tokens, p.temperature, p.top_p, p.stop, p.seed is None), []).append(n)
    out: list[Any] = [None] * len(prompts)
    for (most, temperature, top_p, stop, unseeded), rows in groups.items():
        try:
            results = generator.generate_batch([prompts[n].text for n in rows], max_new_tokens=most,
                                               temperature=temperature, top_p=top_p, stop=stop, errors="return",
                                               seed=None if unseeded else [row_seed(prompts[n].seed, 0) for n in rows],
                                               batch_size=GENERATE_BATCH)
        except Exception as e:  # an option every prompt of the group has, or a failure of this group's alone
            results = [e] * len(rows)
        for n, result in zip(rows, results):
            # A prompt's own error is numbered by its place in this batch, which means nothing to its caller.
            out[n] = InputError(_ITEM_PREFIX.sub("", str(result))) if isinstance(result, InputError) else result
    return out


def _classify(classifier: Classifier, items: list[dict]) -> list[Classification | InputError]:
    return classifier.classify_batch(items, batch_size=CLASSIFY_BATCH, errors="return")


class Models:
    """A server's bundles: the corrector with its engine and gate, and the named classifiers and
    generators, each behind its `Batcher`."""

    def __init__(self, corrector: Corrector, engine: Engine, gate: Classifier | None,
                 classifiers: dict[str, Classifier], generators: dict[str, Generator]):
        self.corrector, self.engine, self.gate = corrector, engine, gate
        self.classifiers, self.generators = classifiers, generators
        self.classify = {name: Batcher(f"classify-{name}", lambda items, c=c: _classify(c, items), CLASSIFY_BATCH)
                         for name, c in classifiers.items()}
        self.generate = {name: Batcher(f"generate-{name}", lambda items, g=g: _generate(g, items), GENERATE_BATCH)
                         for name, g in generators.items()}

    @staticmethod
    def check(config: ServeConfig, *, here: bool = True, named: Callable[[str], str] = str) -> None:
        """Read each bundle's manifest, of its kind, and check the providers (available in this ONNX
        Runtime build where the models load `here`; else, as a Ray cluster's machines may have others,
        known names): a wrong path or provider fails before the server listens (its models load
        after, while /health says "loading"). A failure is an `LmcorError` whose message starts with
        the setting's key as `named` names it (default: `classifiers.NAME: ...`)."""
        checks: list[tuple[str, Callable[[], Any]]] = [
            ("model", lambda: load_manifest(config.model if config.model is not None else shipped_bundle("default"),
                                            verify=False, kind="corrector"))]
        if config.providers is not None:
            checks.insert(0, ("providers", lambda: (usable_providers if here else known_providers)(config.providers)))
        if config.gate is not None:
            checks.append(("gate", lambda: check_gate_bundle(config.gate or shipped_bundle("gate"))))
        checks += [(f"classifiers.{name}", lambda path=path: load_manifest(path, verify=False, kind="classifier"))
                   for name, path in config.classifiers.items()]
        checks += [(f"generators.{name}", lambda path=path: load_manifest(path, verify=False, kind="causal-lm"))
                   for name, path in config.generators.items()]
        for key, check in checks:
            try:
                check()
            except LmcorError as e:
                raise type(e)(f"{named(key)}: {e}") from None

    @classmethod
    def load(cls, config: ServeConfig) -> Models:
        where: dict[str, Any] = {"providers": config.providers, "threads": config.threads}
        # One request at a time needs no second batch, nor its sessions.
        corrector = Corrector.load(config.model, batches=min(config.batches, config.max_batch), **where)
        # The corrector's own engine decodes 16 rows; the server's decodes `max_batch`, in its batches.
        engine = Engine(corrector.sessions, corrector.manifest, corrector.tokenizer, corrector.packed,
                        batch_size=config.max_batch, batches=corrector.engine.batches, narrow=corrector.engine.narrow)
        gate = None if config.gate is None else Classifier.load(config.gate or shipped_bundle("gate"), **where)
        return cls(corrector, engine, gate,
                   {name: Classifier.load(path, **where) for name, path in config.classifiers.items()},
                   {name: Generator.load(path, **where) for name, path in config.generators.items()})

    def describe(self) -> dict:
        return {"corrector": str(self.corrector.root), "gate": None if self.gate is None else str(self.gate.root),
                "classifiers": {n: str(c.root) for n, c in self.classifiers.items()},
                "generators": {n: str(g.root) for n, g in self.generators.items()}}

    def close(self) -> None:
        """Take no more requests; return once every one taken is answered."""
        self.engine.close()
        for batcher in [*self.classify.values(), *self.generate.values()]:
            batcher.close()
