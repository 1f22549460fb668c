"""Checks of the public API's arguments, shared by `Corrector`, `Generator` and `Classifier`.

Each check raises an `InputError` that names the argument and says what it takes, so that a bad
option fails at the call that passed it, never later inside NumPy or ONNX Runtime, and never
silently. Each returns the value in the type the runtime uses.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from .errors import InputError
from .jsonl import check_text, json_kind

# Beam search past 16 beams is rare even for large models, and each beam multiplies the decoder's
# batch and its cache.
MAX_BEAMS = 16
# Requests (prompts, texts) per batch: far past where a batch fills a GPU; beyond it only padding
# and memory grow.
MAX_BATCH_SIZE = 1024
# ONNX Runtime's intra-op threads; more than this is a mistake, not a machine.
MAX_THREADS = 1024
# An engine's batches, each decoded by its own thread (`Engine`): past a few they only contend for the cores.
MAX_BATCHES = 64
# Beam search divides scores by length ** length_penalty: past +-10 that power overflows float32
# for long outputs.
MAX_LENGTH_PENALTY = 10.0
# Outputs are far shorter than 4096 tokens, so a larger n-gram would ban nothing; the bound also keeps
# the size within the compiled core's 64-bit integers.
MAX_NO_REPEAT_NGRAM = 4096
# Sampling below 0.001 is the argmax in all but name (and far below, logits / temperature overflows
# to NaN probabilities); above 100 it is close to uniform noise.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0
ERRORS = ("raise", "return")

T = TypeVar("T")

def shown(value: Any) -> str:
    """`repr`, bounded: a message must not quote (or first build) a megabyte of user text. Null and the
    booleans in JSON's spelling, which requests, lines and config files write them in."""
    if value is None:
        return "null"
    if isinstance(value, (bool, np.bool_)):
        return "true" if value else "false"
    try:
        return reprlib.repr(value)
    except ValueError:  # an integer of more digits than Python writes out
        return "an integer of thousands of digits"


def check_int(name: str, value: Any, least: int, most: int | None = None, *, most_is: str = "") -> int:
    """An integer from `least` to `most` (`most_is` says where `most` comes from)."""
    integer = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not integer or value < least or (most is not None and value > most):
        span = f">= {least}" if most is None else f"from {least} to {most}{most_is}"
        raise InputError(f"{name} must be an integer {span}, got {shown(value)}")
    return int(value)


def check_number(name: str, value: Any, low: float, high: float, *, what: str = "a number",
                 above_low: bool = False) -> float:
    """A finite real number from `low` (excluded with `above_low`) to `high`."""
    number = math.nan
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        try:
            number = float(value)
        except OverflowError:  # an int past float's range
            number = math.inf
    if not math.isfinite(number) or number < low or (above_low and number == low) or number > high:
        span = f"above {low:g} and at most {high:g}" if above_low else f"between {low:g} and {high:g}"
        raise InputError(f"{name} must be {what} {span}, got {shown(value)}")
    return number


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be true or false, got {shown(value)}")
    return bool(value)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InputError(f"{name} must be one of {', '.join(map(repr, choices))}, got {shown(value)}")
    return value


def check_optional(name: str, value: T | None, kind: type[T], what: str) -> T | None:
    """None, or an instance of `kind` (`what` names it for the message)."""
    if value is not None and not isinstance(value, kind):
        raise InputError(f"{name} must be {what} or None, got {type(value).__name__}")
    return value


def check_progress(progress: Any) -> Callable[[int], None] | None:
    if progress is not None and not callable(progress):
        raise InputError(f"progress must be a function of the number of items finished, or None, got "
                         f"{type(progress).__name__}")
    return progress


def check_items(name: str, items: Any, what: str) -> list:
    """The items of a batch call, as a list. A string or a mapping is iterable but is one item, not
    many: it is refused rather than read character by character or key by key. So is a 0-d NumPy
    array, which is Iterable but cannot be iterated."""
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable) or getattr(items, "ndim", None) == 0:
        raise InputError(f"{name} must be a list (or other iterable) of {what}, got {json_kind(items)}; "
                         "pass one item as a list of one")
    return list(items)


def check_words(where: str, text: Any) -> str:
    """A string with more than white space in it (a prompt, a text to classify), and Unicode text."""
    if isinstance(text, str) and text and not text.strip():
        raise InputError(f"{where} must be a non-empty string, got only white space")
    return check_string(where, text)


def check_string(where: str, text: Any) -> str:
    """A non-empty string (white space alone is one: a stop string "\n", a prompt's head) of Unicode text."""
    if not isinstance(text, str) or not text:
        raise InputError(f"{where} must be a non-empty string, got {'an empty one' if text == '' else json_kind(text)}")
    check_text(where, text)
    return text


def check_stops(stop: Any) -> tuple[str, ...]:
    """Stop strings: a list of non-empty strings (white space alone is one)."""
    stops = tuple(check_items("stop", stop, "strings"))
    for n, text in enumerate(stops):
        check_string(f"stop[{n}]", text)
    return stops


def check_threads(threads: Any) -> int | None:
    """`load`'s `threads`: None (ONNX Runtime's default) or 1 to MAX_THREADS."""
    return None if threads is None else check_int("threads", threads, 1, MAX_THREADS)


def check_providers(providers: Any) -> tuple[str, ...] | None:
    """ONNX Runtime execution providers: None (the default), or a list of their names. (ONNX Runtime
    itself takes a str as a list of one-letter names.)"""
    if providers is None:
        return None
    if not isinstance(providers, (list, tuple)) or not providers or not all(isinstance(p, str) for p in providers):
        raise InputError(f"providers must be a list of names such as ['CPUExecutionProvider'], got {shown(providers)}")
    return tuple(providers)


def check_max_new_tokens(value: Any, cap: int) -> int:
    """`max_new_tokens`: None is the bundle's `max_output_tokens`, which also caps it (an output that
    loops stops there)."""
    if value is None:
        return cap
    return check_int("max_new_tokens", value, 1, cap, most_is=" (the bundle's max_output_tokens)")


def check_temperature(value: Any) -> float:
    """0 (greedy) or from MIN_TEMPERATURE to MAX_TEMPERATURE."""
    try:
        number = check_number("temperature", value, 0, MAX_TEMPERATURE)
    except InputError:
        number = math.nan
    if number != 0 and not MIN_TEMPERATURE <= number <= MAX_TEMPERATURE:
        raise InputError(f"temperature must be 0 (greedy) or between {MIN_TEMPERATURE:g} and {MAX_TEMPERATURE:g}, "
                         f"got {shown(value)}")
    return number
