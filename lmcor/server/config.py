"""`ServeConfig`: what `lmcor serve` loads and how it guards itself, from flags or a JSON file."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmcor.runtime.errors import InputError
from lmcor.runtime.jsonl import unique_keys, whole_numbers
from lmcor.runtime.options import MAX_BATCH_SIZE, MAX_BATCHES, check_flag, check_int, check_providers, check_threads, shown

# A correction request is a source and a few candidates: a megabyte is already far past one, and
# bounds what one client can make the server read and parse.
DEFAULT_MAX_BODY_BYTES = 1 << 20
# The bundle folders a config file names are relative to the file, not to where the server starts.
_PATHS = ("model", "gate")
_PATH_MAPS = ("classifiers", "generators")
# Settings whose values are integers (in a config file 8.0 taken as 8, as in request bodies:
# `whole_numbers`; in `serve run`'s args, text read as one).
INTEGERS = ("port", "max_queue", "max_batch", "batches", "max_body_bytes", "threads")


@dataclass(frozen=True)
class ServeConfig:
    """`model`: the corrector bundle (None: the shipped one); `gate`: a classifier bundle that may pass
    a request's first candidate ("": the shipped gate; None: no gate); `classifiers` and `generators`:
    name -> bundle. `max_queue` bounds the requests accepted and not yet answered (more: 429),
    `timeout_s` the time one may take (more: 504; a request may ask for less), `max_body_bytes` a
    request body (more: 413), `max_batch` the rows the corrector decodes at once (1: one request at a
    time), in all of its `batches`: decoded side by side, each by its own thread, so that one runs its
    Python while another's models run (`Corrector.load`). `api_key`, when set, is required as a bearer
    token on every route but /health and the API's description (/openapi.json, /docs, /redoc);
    binding a host other than loopback needs one, or `insecure`.
    A server on loopback answers requests for localhost and loopback addresses (their Host header),
    and for the names in `allowed_hosts` ("*": any), such as a proxy's in front of it."""

    model: str | None = None
    gate: str | None = None
    classifiers: dict[str, str] = field(default_factory=dict)
    generators: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    insecure: bool = False
    max_queue: int = 256
    max_batch: int = 16
    batches: int = 2
    timeout_s: float = 60.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    threads: int | None = None
    providers: tuple[str, ...] | None = None
    allowed_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("model", "gate", "host", "api_key"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise InputError(f"{name} must be a string, got {type(value).__name__}")
        for name in _PATH_MAPS:
            bundles = getattr(self, name)
            if not isinstance(bundles, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v
                                                        for k, v in bundles.items()):
                raise InputError(f"{name} must map names to bundle folders, got {bundles!r}")
        check_int("port", self.port, 0, 65535)
        check_int("max_queue", self.max_queue, 1)
        check_int("max_batch", self.max_batch, 1, MAX_BATCH_SIZE)
        check_int("batches", self.batches, 1, MAX_BATCHES)
        check_int("max_body_bytes", self.max_body_bytes, 1)
        check_threads(self.threads)
        check_flag("insecure", self.insecure)
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) \
                or not _finite(self.timeout_s) or self.timeout_s <= 0:
            raise InputError(f"timeout_s must be a number of seconds above 0, got {shown(self.timeout_s)}")
        if self.api_key == "":
            raise InputError("api_key is empty: give a secret, or no key")
        if self.api_key is not None and self.api_key != self.api_key.strip():
            raise InputError("api_key has white space at an end, which HTTP clients do not send: remove it")
        self.check_reach(self.host, self.api_key, self.insecure)
        object.__setattr__(self, "providers", check_providers(self.providers))
        hosts = self.allowed_hosts
        if not isinstance(hosts, (list, tuple)) or not all(isinstance(h, str) and h and h == "".join(h.split())
                                                           for h in hosts):
            raise InputError(f"allowed_hosts must be a list of host names (\"*\": any), got {shown(hosts)}")
        object.__setattr__(self, "allowed_hosts", tuple(h.lower() for h in hosts))

    @staticmethod
    def check_reach(host: str, api_key: str | None, insecure: bool) -> None:
        """A host other machines reach needs a key, or --insecure said out loud."""
        if not (api_key or insecure or loopback(host)):
            raise InputError(f"host {host!r} is reachable from other machines: give an API key (--api-key or "
                             "LMCOR_API_KEY), or --insecure to serve it without one")

    @classmethod
    def check_keys(cls, values: dict, where: str, *, also: tuple[str, ...] = ()) -> None:
        """The keys of `values` (from `where`) are this class's fields, or `also`."""
        known = sorted({f.name for f in dataclasses.fields(cls)} | set(also))
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise InputError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(known)})")

    @classmethod
    def read(cls, path: str | Path, **overrides: Any) -> ServeConfig:
        """The config in a JSON file (keys: this class's fields), then `overrides` (the flags given)."""
        path = Path(path)
        try:
            values = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=unique_keys)
        # ValueError: undecodable text, bad JSON, an integer of too many digits; InputError: a key given twice
        except (OSError, ValueError, RecursionError, InputError) as e:
            raise InputError(f"{path}: cannot read the config: {e}") from None
        if not isinstance(values, dict):
            raise InputError(f"{path}: the config must be a JSON object")
        cls.check_keys(values, str(path))
        here = path.resolve().parent

        def bundle(folder: str) -> str:
            try:
                return str(here / Path(folder).expanduser())
            except RuntimeError as e:  # "~user/..." of no such user, or no home folder
                raise InputError(f"{path}: cannot expand {folder!r}: {e}") from None
        for name in _PATHS:
            if isinstance(values.get(name), str) and values[name]:
                values[name] = bundle(values[name])
        for name in _PATH_MAPS:
            if isinstance(values.get(name), dict):
                values[name] = {k: bundle(v) if isinstance(v, str) and v else v for k, v in values[name].items()}
        values = whole_numbers(values, INTEGERS)
        try:
            return cls(**{**values, **overrides})
        except InputError as e:  # a value of the file's (not overridden by a flag) is said to be the file's
            key = str(e).split(" ", 1)[0]
            if key in values and key not in overrides:
                raise InputError(f"{path}: {e}") from None
            raise


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer past float's range
        return False


def loopback(host: str) -> bool:
    """Whether `host` (a name or an address) is this machine's own, reached by no other."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
