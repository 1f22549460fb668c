"""JSON Lines, strictly: one input line is one JSON value, one output record is one line.

Reading fails line by line, never as a whole: a line that is not UTF-8, not JSON, nested too
deeply, holds an integer too long to convert, a number out of range or a lone surrogate gives an
`InputError` for that line alone. Writing is strict JSON: no NaN or Infinity, and U+2028/U+2029
escaped (JavaScript and some JSON Lines readers take them for line ends).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Collection
from typing import Any

from .errors import InputError

# Requests are flat objects; anything nested deeper is not one of lmcor's records.
MAX_DEPTH = 32
_BOM = "\ufeff"


def blank(raw: bytes, *, first: bool = False) -> bool:
    """Whether a line holds nothing to read (whitespace; on the input's first line, a BOM too)."""
    return not (raw.removeprefix(_BOM.encode()) if first else raw).strip()


def parse_line(raw: bytes, *, first: bool = False) -> Any:
    """The JSON value of one input line (`first`: the input's first line, which may carry a BOM)."""
    text = utf8_text(raw, first=first)
    try:
        # an error at the line's end is said at its column, not the next line's
        value = json.loads(text.rstrip("\r\n"), object_pairs_hook=marked_keys)
    except RecursionError:
        raise InputError(f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})") from None
    except ValueError as e:  # an integer over Python's digit limit (its message advises Python code)
        raise InputError(f"not usable JSON ({json_number_error(e)})") from None
    check_value(value)
    return value


def utf8_text(raw: bytes, *, first: bool) -> str:
    """`raw` decoded, a byte order mark left out where it may start the text (`first`: a file's first
    line, an HTTP body); refused with the offending byte's place."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1})") from None
    if first and text.startswith(_BOM):
        return text[1:]
    if text.startswith(_BOM):  # (json's own message advises decoding with "utf-8-sig")
        raise InputError("a byte order mark (BOM) starts this line, not the file's first: files joined together?")
    return text


def check_value(value: Any, whole: str = "the line") -> None:
    """Refuse what cannot be text or cannot be written back as strict JSON, or an object that gave a
    key twice (`marked_keys`), by the field (`whole`: what the value is called); the error keeps the
    value's id where it can be written back (`record_id`)."""
    try:
        _check(value, whole)
    except InputError as e:
        e.ident = record_id(value)
        raise


def record_id(value: Any) -> Any:
    """An object's `id`, where it can be written back as it came (else None)."""
    if not isinstance(value, dict) or (isinstance(value, Repeated) and "id" in value.repeated):
        return None
    ident = value.get("id")
    return ident if _usable(ident) else None


def whole_numbers(values: dict, keys: Collection[str]) -> dict:
    """`values` with each of `keys` that holds a float with no fraction as that integer: JSON has one
    number type, and 8.0 is the integer 8 to its schema (and to JavaScript's JSON.stringify, which
    writes 8). Past 2**53 a float is no count: left as sent, for its check to refuse."""
    whole = {key: int(value) for key, value in values.items()
             if key in keys and isinstance(value, float) and value.is_integer() and abs(value) <= 2**53}
    return {**values, **whole} if whole else values


def unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object whose keys are each given once (`json.loads`' `object_pairs_hook`): of two
    `source` fields, Python keeps the last without a word."""
    value = marked_keys(pairs)
    if isinstance(value, Repeated):
        raise InputError(f"field {value.repeated[0]!r} appears twice in one object")
    return value


class Repeated(dict):
    """A JSON object that gave keys twice (`repeated`, in the order they came again), kept to be refused
    by `check_value` as the field of its record: one request of a list, one line, fails alone, its id
    still known where it was given once."""

    repeated: tuple[str, ...] = ()


def marked_keys(pairs: list[tuple[str, Any]]) -> dict:
    """`json.loads`' `object_pairs_hook` for records: an object whose keys repeat is a `Repeated`."""
    value = dict(pairs)
    if len(value) == len(pairs):
        return value
    seen: set[str] = set()
    marked = Repeated(value)
    marked.repeated = tuple(key for key, _ in pairs if key in seen or seen.add(key))
    return marked


def _usable(value: Any) -> bool:
    try:
        _check(value)
    except InputError:
        return False
    return True


def json_kind(value: Any) -> str:
    """What a value is, in JSON's words where it is one of JSON's types (messages name what a line
    holds: "got null", not "got NoneType")."""
    if value is None:
        return "null"
    kinds = ((bool, "a boolean"), ((int, float), "a number"), (str, "a string"), (list, "an array"), (dict, "an object"))
    return next((kind for types, kind in kinds if isinstance(value, types)), f"a {type(value).__name__}")


def check_body(value: Any) -> None:
    """Refuse a value nested deeper than lmcor's records are (writing it back would recurse as deep).
    The rest is each item's own check (`check_value`), so that one bad item fails alone."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InputError(f"JSON nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)


def _check(value: Any, whole: str = "the line") -> None:
    """Refuse what cannot be text or cannot be written back as strict JSON (`whole`: what the value is
    called, where no field of it is to blame)."""
    stack = [(value, "", 1)]
    while stack:
        item, where, depth = stack.pop()
        name = f"field {where!r}" if where else whole
        if depth > MAX_DEPTH:
            raise InputError(f"JSON nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, str):
            check_text(name, item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise InputError(f"{name} is NaN, Infinity or a number out of range, which strict JSON cannot hold")
        elif isinstance(item, dict):
            if isinstance(item, Repeated):
                twice = f"{where}.{item.repeated[0]}" if where else item.repeated[0]
                raise InputError(f"field {twice!r} appears twice in one object")
            for key, child in item.items():
                check_text(f"a key of {name}", key)
                stack.append((child, f"{where}.{key}" if where else key, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{i}]", depth + 1) for i, child in enumerate(item))


def check_text(where: str, text: str) -> None:
    """Refuse a string that is not Unicode text: the tokenizer cannot take a lone surrogate (and
    `encode_batch` would fail for the whole batch), nor can a record hold one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{where} holds a lone surrogate (U+{ord(text[e.start]):04X}), "
                         "which is not Unicode text") from None


def dump_record(record: dict[str, Any]) -> str:
    """One record as one line of strict JSON, newline included."""
    try:
        text = json.dumps(record, ensure_ascii=False, allow_nan=False)
    except ValueError:
        raise InputError("a number in the record is out of range (not finite)") from None
    # The line breaks JSON leaves unescaped, which some readers of lines split at (Python's
    # str.splitlines, JavaScript's line terminators): they can only occur inside JSON strings, where
    # an escape means the same character.
    return text.replace("\u0085", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + "\n"


def json_number_error(error: ValueError) -> str:
    """What a ValueError of `json.loads` says, in a user's terms: Python's own message for a number
    past its digit limit advises a call to `sys.set_int_max_str_digits()`."""
    if "int_max_str_digits" in str(error) or "integer string conversion" in str(error):
        return f"a number with more than {sys.get_int_max_str_digits()} digits"
    return str(error).splitlines()[0]
