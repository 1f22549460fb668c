"""The compiled core (`lmcor._core`, C++ in `kernels/core/`), or the plain Python references.

Each decode step's host work has two implementations that compute the same values: the compiled one
and the Python reference beside its caller (`drafts.Drafts`, `sequence.RepeatBan`, `decode.accept`,
`RaggedDecoder.step`'s cache writes, `fallback.nearest`, `vote`'s alignments, `tokens._tokens_in`); `tests/test_core.py` compares them exactly.
Callers read `native` when they run: the extension module, or None where it is not built (lmcor says
so once) or `LMCOR_CORE=0` turns it off.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

log = logging.getLogger("lmcor")

native: ModuleType | None = None
_module: ModuleType | None = None  # the extension where usable, whether its computations are on or not
_warned = False


# What the Python layer calls: a module built from older sources (updated without a rebuild) lacks some.
NAMES = ("chrf", "nearest", "Drafts", "RepeatBan", "accept", "write_rows", "edit_vote", "opcodes", "matched", "fp_mode",
         "set_fp_mode", "tokens_in")
# The C++ sources, beside this package in a checkout (a wheel does not ship them).
SOURCES = Path(__file__).resolve().parents[1] / "kernels" / "core"


@functools.cache
def checkout_digest() -> str | None:
    """The digest of the checkout's core sources (`kernels/core/digest.py`), or None outside a checkout;
    read once per process, as each `configure` checks the module against it."""
    script = SOURCES / "digest.py"
    if not script.is_file():
        return None
    spec = importlib.util.spec_from_file_location("lmcor_core_digest", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sources_digest(SOURCES)


def built() -> ModuleType | None:
    """The extension module, or None (with one warning per process) where it cannot be imported or
    was built from older sources."""
    global _warned
    try:
        module = importlib.import_module("lmcor._core")
    except ImportError as e:
        problem = f"is not built ({e})"
    else:
        missing = [name for name in NAMES if not hasattr(module, name)]
        if missing:
            problem = f"was built from older sources (it lacks {', '.join(missing)})"
        elif checkout_digest() not in (None, getattr(module, "SOURCES", None)):
            problem = f"was built from other sources than {SOURCES}"
        else:
            return module
    if not _warned:
        _warned = True
        log.warning("lmcor's compiled core %s: the Python references run (slower, same results); reinstall "
                    "lmcor with a C++17 compiler to build it (pip install -e . in a checkout)", problem)
    return None


ON_WORDS, OFF_WORDS = ("1", "true", "on", "yes", ""), ("0", "false", "off", "no")  # of an LMCOR_ switch


def configure(enabled: bool | None = None) -> ModuleType | None:
    """Choose the implementation, and return `native`: `enabled` True or False, or None to read
    `LMCOR_CORE` (0 turns the core off; default: on where built). Sequences already started keep
    the draft index and n-gram bans they were built with."""
    global native, _module
    if enabled is None:
        chosen = os.environ.get("LMCOR_CORE", "1").strip().lower()
        enabled = chosen not in OFF_WORDS
        if enabled and chosen not in ON_WORDS:
            log.warning("LMCOR_CORE=%s is neither on (%s) nor off (%s): the core stays on", chosen, "/".join(ON_WORDS),
                        "/".join(OFF_WORDS))
    _module = built()
    native = _module if enabled else None
    return native


@contextmanager
def fp_mode(*, flush: bool) -> Iterator[None]:
    """Inside: this thread's floating-point mode with denormals flushed to zero (`flush`), or as it
    is; after: as it was. lmcor's sessions flush denormals (`sessions.open_session`), and ONNX
    Runtime applies that to its pool threads and, for good, to the thread that creates a session:
    lmcor undoes the latter and flushes the calling thread only while it runs ONNX Runtime, so the
    caller's own arithmetic keeps its mode. This is not one of the computations `LMCOR_CORE=0` hands to
    the references; where the extension cannot be used at all, ONNX Runtime's behaviour stands."""
    module = _module
    if module is None:
        yield
        return
    mode = module.fp_mode()
    if flush:
        module.set_fp_mode(mode | module.FLUSH_DENORMALS)
    try:
        yield
    finally:
        module.set_fp_mode(mode)


configure()
