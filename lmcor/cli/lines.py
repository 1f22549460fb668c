"""The JSONL pipeline of every command that answers lines: read, answer in batches, write in order.

- Input is read once, as a stream: a file, `-`, a pipe or a FIFO alike. A reader thread hands
  lines over as they arrive; a batch goes out when it is full or `--max-wait-ms` after its first
  line arrived, so a caller feeding one line at a time gets each answer at once.
- Every line is its own failure domain: a line that cannot be read or used gets an error record
  naming its number (`runtime.jsonl`), and every other line is still answered, in order.
- Output is never lost: records go to a temporary file beside `-o`, written after every chunk of
  lines (whole, or cut back where a write fails) and renamed over `-o` at the end. On SIGINT/SIGTERM
  the chunk in flight is finished (a second signal drops it), everything finished is kept in `-o`,
  and `--resume` answers the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import glob
import json
import os
import queue
import re
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TextIO

from tqdm import tqdm

from lmcor.runtime.errors import InputError, LmcorError
from lmcor.runtime.jsonl import blank, dump_record, json_kind, parse_line
from lmcor.runtime.options import shown

from . import STDERR, say

EXIT_BAD_LINES = 1
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
_BLOCK = 1 << 16


@dataclass(frozen=True)
class RecordFields:
    """The fields of a command's answer records besides `id` and `line`: those every one has and those
    some have. An error record has `error` alone. `--resume` refuses an -o of another command's records."""

    always: frozenset[str]
    sometimes: frozenset[str] = frozenset()

    def match(self, record: dict) -> bool:
        fields = set(record) - {"id", "line"}
        return fields == {"error"} or self.always <= fields <= self.always | self.sometimes


@dataclass(frozen=True)
class Line:
    number: int  # 1-based, counting every line of the input, blank ones too
    size: int  # bytes, newline included
    value: Any  # the parsed JSON value, or the InputError that says why there is none


def split_lines(read: Callable[[int], bytes], max_bytes: int) -> Iterator[tuple[bytes | None, int]]:
    """(line, size in bytes) of each line that `read` gives; the line is None when it holds more than
    `max_bytes` (its bytes past the limit are counted, never kept)."""
    pending = bytearray()
    size = 0
    while block := read(_BLOCK):
        start = 0
        while (end := block.find(b"\n", start)) != -1:
            size += end + 1 - start
            if len(pending) <= max_bytes:
                pending += block[start : end + 1]
            yield (bytes(pending) if size - 1 <= max_bytes else None), size
            pending.clear()
            size = 0
            start = end + 1
        size += len(block) - start
        if len(pending) <= max_bytes:
            pending += block[start:]
    if size:
        yield (bytes(pending) if size <= max_bytes else None), size


def read_lines(read: Callable[[int], bytes], max_bytes: int, *, after: int = 0,
               skipped: Callable[[int, int, bool], None] | None = None) -> Iterator[Line]:
    """The non-blank lines after line `after` of what `read` gives, each parsed or with its error
    (`skipped` is told the number and size of each line up to `after`, and whether it gets a record:
    `gets_record`)."""
    for number, (raw, size) in enumerate(split_lines(read, max_bytes), start=1):
        if number <= after:
            if skipped is not None:
                skipped(number, size, gets_record(number, raw))
            continue
        if (line := line_at(number, raw, size, max_bytes)) is not None:
            yield line


class NotResumable(LmcorError):
    """The -o to --resume is another input's output."""


def gets_record(number: int, raw: bytes | None) -> bool:
    """Whether line `number` of `split_lines` gets a record: it is not blank (`line_at`)."""
    return raw is None or not blank(raw, first=number == 1)


def check_resumed(args: argparse.Namespace, kept: Sequence[int], lines: int,
                  recorded: Sequence[int] | None = None) -> None:
    """`--resume` continues an -o whose records answer the input lines `kept` (ascending): the input, of
    `lines` lines, must reach the last, and where its lines up to it that get a record are known
    (`recorded`), they must be those: an -o that lacks some (records removed by hand) would leave
    them unanswered."""
    after = kept[-1] if kept else 0
    if lines < after:
        raise NotResumable(f"--resume: -o {args.output} answers input lines up to {after}, but {args.input} has "
                         f"{lines}: it is another input's output (remove it, or run without --resume)")
    if recorded is not None and list(recorded) != list(kept):
        kept_lines = set(kept)
        missing = next((n for n in recorded if n not in kept_lines), None)
        if missing is not None:
            raise NotResumable(f"--resume: -o {args.output} holds no record of input line {missing}, which "
                             f"{args.input} has, but answers lines after it: it was not written by an "
                             "interrupted run of this input (remove it, or run without --resume)")
        recorded_lines = set(recorded)
        extra = next(n for n in kept if n not in recorded_lines)
        raise NotResumable(f"--resume: -o {args.output} answers input line {extra}, which is blank in {args.input}: "
                         "it is another input's output (remove it, or run without --resume)")


def _check_resumed_file(args: argparse.Namespace, output: Output, echo: str | None,
                        again: Callable[[Line], dict] | None) -> None:
    """`--resume` continues an -o whose records answer the input lines `output.kept_lines`, the last
    `output.through`: the input (a regular file, read again up to it) must have a record's line for
    each (`check_resumed`), and that last line must hold the record's id (as JSON: true is not 1),
    and the record's `echo` field (a field it copies from its line; an error record has none) that
    line's. With `again` (the line's record as this run writes it), its answer must be the record's
    (`_check_last_answer`)."""
    recorded = []
    with open(args.input, "rb") as f:
        for number, (raw, size) in enumerate(split_lines(f.read, args.max_line_bytes), start=1):
            if gets_record(number, raw):
                recorded.append(number)
            if number == output.through:
                break
        else:
            return  # fewer lines: `check_resumed` says so
    check_resumed(args, output.kept_lines, number, recorded)
    try:
        value = parse_line(raw, first=number == 1) if raw is not None else None
    except InputError:
        return  # its record is an error record, which has no id to compare
    value = value if isinstance(value, dict) else {}
    echoed = echo is not None and "error" not in output.last_record
    for field in ("id", echo) if echoed else ("id",):
        if not _same_json(value.get(field), output.last_record.get(field)):
            raise NotResumable(f"--resume: {output.resumed_from} answers line {output.through} with the {field} "
                             f"{shown(output.last_record.get(field))}, but that line of {args.input} has the {field} "
                             f"{shown(value.get(field))}: it is another input's output (remove it, or run without "
                             "--resume)")
    if again is not None and "error" not in output.last_record:
        _check_last_answer(output, again(line_at(number, raw, size, args.max_line_bytes)))


def _check_last_answer(output: Output, again: dict) -> None:
    """The last record kept must be this run's answer to its line (`again`), else -o would mix two runs'
    answers: one written with another model or other options. Numbers agree to `_close`'s
    tolerance: another batch shape moves the last digits of a probability."""
    kept = output.last_record
    where = f"--resume: {output.resumed_from} answers line {output.through}"
    if "error" in again:
        raise NotResumable(f"{where}, which this run cannot ({again['error']}): it was written with another model "
                           "or other options, or the line changed since (give the same, or remove it)")
    fields = [*again, *(f for f in kept if f not in again)]  # the record's order: its answer first
    field = next((f for f in fields if f not in ("id", "line") and not _close(kept.get(f), again.get(f))), None)
    if field is not None:
        raise NotResumable(f"{where} with {_said(kept, field)}, where this run writes {_said(again, field)}: it was "
                           "written with another model or other options, or the line changed since (give the same, "
                           "or remove it)")


def _said(record: dict, field: str) -> str:
    return f"the {field} {shown(record[field])}" if field in record else f"no {field}"


def _close(a: Any, b: Any) -> bool:
    """Whether two JSON values are the same, numbers that are not integers within a relative 1e-4."""
    if isinstance(a, float) or isinstance(b, float):
        return (type(a) in (int, float) and type(b) in (int, float)
                and abs(a - b) <= 1e-4 * max(abs(a), abs(b), 1e-3))
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_close, a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    return _same_json(a, b)


def _same_json(a: Any, b: Any) -> bool:
    """Whether two JSON values are the same as JSON writes them (Python has True == 1 == 1.0)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def line_at(number: int, raw: bytes | None, size: int, max_bytes: int) -> Line | None:
    """Line `number` of `split_lines` (`raw` None: over `max_bytes`), parsed or with its error; None
    when it is blank. Also what a Ray worker runs on the lines it is handed (`lmcor.integrations.ray`)."""
    if raw is None:
        return Line(number, size, InputError(f"the line has {size} bytes, over the limit of {max_bytes} "
                                             "(--max-line-bytes)"))
    if not gets_record(number, raw):
        return None
    try:
        return Line(number, size, parse_line(raw, first=number == 1))
    except InputError as e:
        return Line(number, size, e)


def open_input(name: str) -> tuple[int, bool]:
    """The input's file descriptor, and whether it is ours to close (stdin is not).

    The reader thread reads the descriptor with `os.read`: a buffered file object would hold a
    lock while it waits on a pipe, and closing it from another thread (or at exit) would hang."""
    if name == "-":
        if sys.stdin is None:
            raise InputError("standard input is closed; give the input file's path instead of -")
        return sys.stdin.fileno(), False
    if os.path.isdir(name):
        raise InputError(f"{name}: is a directory, not a JSONL file")
    return os.open(name, os.O_RDONLY), True


def refuse_folder_path(flag: str, name: str) -> None:
    """An output file's path that ends in / names a folder (`Path` would drop the slash, and a file by
    the folder's name would be written): refused, unless it is a folder, which the caller refuses."""
    if name.endswith(("/", os.sep)) and not os.path.isdir(name):
        raise InputError(f"{flag} {name}: not a directory (a path ending in / names a folder; give a file's path)")


def same_file(input_name: str, found: os.stat_result) -> bool:
    """Whether the file `found` (-o's) is the input, or what standard input reads for `-` (a device such
    as /dev/null may be both)."""
    try:
        info = os.fstat(sys.stdin.fileno()) if input_name == "-" else os.stat(input_name)
    except (OSError, AttributeError, ValueError):  # no stdin, or an input that is not there (said elsewhere)
        return False
    return (info.st_dev, info.st_ino) == (found.st_dev, found.st_ino) and not stat.S_ISCHR(found.st_mode)


def regular_file_size(name: str) -> int | None:
    """The size of a regular input file; None for stdin, pipes, FIFOs and devices."""
    if name == "-":
        return None
    info = os.stat(name)
    return info.st_size if stat.S_ISREG(info.st_mode) else None


class _Reader:
    """Reads lines on a thread, so a batch can leave while the input is still open."""

    _END = object()

    def __init__(self, name: str, max_bytes: int, after: int, capacity: int):
        self.name = name
        self._queue: queue.Queue = queue.Queue(maxsize=capacity)  # bounded: memory stays flat on long inputs
        self.failure: OSError | None = None
        self.ended = False
        self.skipped_bytes = self.skipped_lines = 0  # the lines an earlier run answered (--resume)
        self.skipped_recorded: list[int] = []  # those of them that get a record
        fd, owned = open_input(name)
        threading.Thread(target=self._read, args=(fd, owned, max_bytes, after), daemon=True).start()

    def _read(self, fd: int, owned: bool, max_bytes: int, after: int) -> None:
        try:
            for line in read_lines(functools.partial(os.read, fd), max_bytes, after=after, skipped=self._skip):
                self._queue.put(line)
        except OSError as e:
            self.failure = e
        finally:
            if owned:
                os.close(fd)
            self._queue.put(self._END)

    def _skip(self, number: int, size: int, recorded: bool) -> None:
        self.skipped_bytes += size
        self.skipped_lines += 1
        if recorded:
            self.skipped_recorded.append(number)

    def chunk(self, size: int, wait_s: float, stopping: Callable[[], bool]) -> list[Line]:
        """Up to `size` lines: waits for the first, then at most `wait_s` more for the rest; the lines
        already read are taken whatever the wait (with `--max-wait-ms 0` a file is still batched)."""
        lines: list[Line] = []
        deadline = None
        while len(lines) < size and not self.ended:
            if stopping():  # the lines taken are answered; the wait for more ends
                break
            # Woken now and then to notice a signal: its handler returns, and a wait goes on after it.
            timeout = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                if deadline is not None and timeout <= 0:
                    break
                continue
            if item is self._END:
                self.ended = True
                break
            if stopping():  # a line that came while a signal was handled is not taken: --resume answers it
                break
            lines.append(item)
            if deadline is None:
                deadline = time.monotonic() + wait_s
        return lines


def resumed_from(output: str | Path, own: Path | None = None) -> Path:
    """What --resume continues: `output` (-o), or the temporary file of a run into it that was killed
    (SIGKILL, the machine going down) before it could put its records in place, where that holds more
    complete records; `own` is this run's temporary file."""
    output = Path(output)
    target = Path(os.path.realpath(output))
    # mkstemp's names: ".NAME." and 8 characters of [a-z0-9_] (another -o's, "NAME.bak", has a dot more);
    # one older than -o is an earlier run's, whose records -o has.
    own_name = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]+\.partial")
    newer = target.stat().st_mtime if target.is_file() else float("-inf")
    orphans = [p for p in target.parent.glob(f".{glob.escape(target.name)}.*.partial")
               if p != own and own_name.fullmatch(p.name) and p.is_file() and p.stat().st_mtime > newer]
    if not orphans:
        return output

    def records(path: Path) -> int:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))

    best = max(orphans, key=records)
    return output if output.is_file() and records(output) >= records(best) else best


class Output:
    """Where records go: stdout; or, for a regular file (or none yet) at `-o`, a temporary file beside
    it that replaces it at the end (through a symbolic link, its target); or, for a device, pipe or
    FIFO at `-o`, that itself, written as the records come (it cannot be replaced)."""

    def __init__(self, path: str | None, input_name: str, resume: bool, fields: RecordFields,
                 stdout: TextIO | None = None):
        if path is not None and not path.strip():
            raise InputError("-o is empty; give a file's path (or leave -o out for stdout)")
        if path is not None:
            refuse_folder_path("-o", path)
        self.path = Path(path) if path and path != "-" else None  # -o -: stdout, as - is stdin for the input
        self.fields = fields
        self.input_name = input_name
        self.kept_errors = 0  # error records kept by --resume: lines that failed in an earlier run
        self.records = 0  # written by this run and kept from an earlier one
        self.through = 0  # the last input line answered
        self.kept_lines: list[int] = []  # the input lines the records kept by --resume answer
        self.last_record: dict = {}  # its record
        self._before_last: tuple[int, int, dict] | None = None  # (offset, through, last_record) before it was kept
        self._temp: Path | None = None  # replaces `target` at the end
        self._orphan: Path | None = None  # a killed run's temporary file that --resume continued from
        self.target: Path | None = None
        self._file: IO[bytes] | None = None
        self._stdout = stdout or sys.stdout  # the records' own (Ray's driver prints to sys.stdout: `cluster`)
        if self.path is None:
            if resume:
                raise InputError("--resume needs -o: the file an interrupted run wrote")
            if self._stdout is None:
                raise InputError("standard output is closed; write to a file with -o")
            return
        try:
            found = os.stat(self.path)  # through links: /dev/stdout is a pipe's or a terminal's
        except FileNotFoundError:
            found = None
        except OSError as e:  # a loop of links, a folder on the way that is a file
            raise InputError(f"-o {self.path}: {e.strerror or e}") from None
        if found is not None and same_file(input_name, found):
            what = "the input file" if input_name != "-" else "what standard input reads (the input)"
            raise InputError(f"-o {self.path} is {what}; write to another file")
        if found is not None and stat.S_ISDIR(found.st_mode):
            raise InputError(f"-o {self.path} is a directory")
        kind = None if found is None else found.st_mode
        if kind is not None and not stat.S_ISREG(kind):
            if resume:
                raise InputError(f"--resume needs -o to be a regular file; {self.path} is a device, pipe or FIFO")
            self._file = self._opened(lambda: open(self.path, "wb", buffering=0))
            return
        target = self.target = Path(os.path.realpath(self.path))  # a link stays a link: its target gets the records
        fd, temp = self._opened(lambda: tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
        self._temp = Path(temp)
        self._file = os.fdopen(fd, "wb", buffering=0)  # each chunk of records written whole, or cut back (`put`)
        if resume:
            try:
                self._keep_finished()
            except BaseException:  # refused, interrupted (a signal while a long -o is copied), out of space
                self._file.close()
                self._temp.unlink()
                raise

    @property
    def resumed_from(self) -> str:
        """The file whose records --resume continues, as messages name it."""
        return f"{self._orphan} (a killed run's, into -o {self.path})" if self._orphan else f"-o {self.path}"

    def _opened(self, open_it: Callable[[], Any]) -> Any:
        """`open_it()`, an OSError said of `-o` (not of the temporary file beside it)."""
        try:
            return open_it()
        except OSError as e:
            folder = (self.target or self.path).parent if self.path is not None else None  # a link's: its target's
            if folder is not None and not folder.is_dir():
                why = f"the folder {folder} does not exist"
            elif e.errno == errno.ENOENT:  # the folder is there, but takes no new file (/proc, /sys)
                why = f"no file can be created in {folder}"
            else:
                why = e.strerror or str(e)
            raise InputError(f"-o {self.path}: cannot write there ({why})") from None

    def _resumed(self) -> Path:
        assert self.path is not None
        source = resumed_from(self.path, self._temp)
        if source != self.path:
            say(f"lmcor: --resume: continuing from {source}, which a killed run into -o {self.path} left")
            self._orphan = source
        return source

    def _keep_finished(self) -> None:
        """Copy the complete records of an interrupted `-o` (`_resumed`) and note the last line they
        answer. A torn last line is left out (answered again), and so is a last error record
        (`_forget_last`); a file that holds anything else is refused, not replaced."""
        assert self.path is not None and self._file is not None
        source = self._resumed()
        if not source.exists():
            return
        pending, written = bytearray(), 0  # copied in blocks: the file is unbuffered
        with open(source, "rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):
                    break  # torn where the run stopped: answer again from here
                try:
                    record = json.loads(raw)
                except (ValueError, RecursionError):  # not JSON; JSON nested past Python's recursion limit
                    record = None
                if (not isinstance(record, dict) or type(record.get("line")) is not int or record["line"] <= self.through
                        or not self.fields.match(record)):
                    named = f"-o {source}" if source == self.path else str(source)
                    raise InputError(f"--resume: {named} line {number} is not a record of this command's (one per "
                                     "input line, in order); it was not written by an interrupted run of it: give "
                                     "another -o, or remove the file")
                self._before_last = (written + len(pending), self.through, self.last_record)
                pending += raw
                if len(pending) >= _BLOCK:
                    self._put(pending)
                    written, pending = written + len(pending), bytearray()
                self.records += 1
                self.kept_errors += "error" in record
                self.through, self.last_record = record["line"], record
                self.kept_lines.append(record["line"])
        self._put(pending)
        if "error" in self.last_record:
            self._forget_last()

    def _forget_last(self) -> None:
        """Leave out the last record kept, an error record: its line is answered again. An interrupted
        producer can leave a torn line behind (`producer | lmcor correct -` stopped by Ctrl-C), whose
        error record would otherwise stand for the whole line the input holds now."""
        assert self._file is not None and self._before_last is not None
        offset, self.through, self.last_record = self._before_last
        self._file.seek(offset)
        self._file.truncate()
        self.records -= 1
        self.kept_errors -= 1
        self.kept_lines.pop()

    def put(self, texts: list[str], through: int) -> None:
        """Write records (each a line of text) that answer the input up to line `through`, and count
        them. Into a file they go whole or not at all: where a write fails (a full disk), the file is
        cut back to the records before them, and those alone are counted as kept."""
        data = "".join(texts)
        with self._writing():
            if self._file is None:
                self._stdout.write(data)
                self._stdout.flush()
            elif self._temp is None:  # a device, pipe or FIFO: as it takes them
                self._put(data.encode("utf-8"))
            else:
                before = self._file.tell()
                try:
                    self._put(data.encode("utf-8"))
                except OSError:
                    self._file.truncate(before)  # frees space, never needs it
                    self._file.seek(before)
                    raise
        self.records += len(texts)
        self.through = through

    def _put(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        while view:  # an unbuffered write may take part of it
            view = view[self._file.write(view):]

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A failed write (a full disk) said of -o or stdout; a reader of stdout gone is main()'s to handle."""
        try:
            yield
        except BrokenPipeError:
            raise
        except OSError as e:
            if self._file is None:  # what stdout holds unwritten would fail the interpreter's flush at exit too
                os.dup2(os.open(os.devnull, os.O_WRONLY), self._stdout.fileno())
            raise LmcorError(f"{f'-o {self.path}' if self.path else 'standard output'}: cannot write "
                             f"({e.strerror or e})") from None

    def close(self, *, keep: bool) -> None:
        """Put the records in place (`keep`), or leave any earlier `-o` as it was."""
        if self._file is None:
            with self._writing():
                self._stdout.flush()
            return
        try:
            if keep and self._temp is not None:  # on the disk before it replaces -o: a crash then leaves one or the other whole
                os.fsync(self._file.fileno())
        except OSError:
            pass  # best effort, as the folder's (`_sync_folder`): some file systems cannot sync
        finally:
            self._file.close()  # unbuffered: nothing left to write
        if self._temp is None or self.target is None:  # written in place: nothing to put there
            return
        if keep:
            try:  # a replaced -o keeps its permissions; a new one gets ordinary ones (mkstemp's file is private)
                mode = stat.S_IMODE(os.stat(self.target).st_mode)
            except FileNotFoundError:
                umask = os.umask(0)
                os.umask(umask)
                mode = 0o666 & ~umask
            os.chmod(self._temp, mode)
            os.replace(self._temp, self.target)
            _sync_folder(self.target.parent)
            if self._orphan is not None:  # its records are in -o now
                self._orphan.unlink(missing_ok=True)
        else:
            self._temp.unlink(missing_ok=True)


def _sync_folder(folder: Path) -> None:
    """Put a rename into `folder` on the disk (best effort: some file systems cannot sync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Signals:
    """SIGINT/SIGTERM: the first asks to stop once the lines in flight are answered, a second drops them."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_Signals":
        if threading.current_thread() is threading.main_thread():
            for number in EXIT_SIGNAL:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame: object) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = number
        say("lmcor: stopping once the lines in flight are answered (signal again to drop them)")


class _Progress:
    """Counts bytes of a regular file against its size, else lines."""

    def __init__(self, total_bytes: int | None, desc: str, quiet: bool):
        self.by_bytes = total_bytes is not None
        self.bar = tqdm(total=total_bytes, unit="B" if self.by_bytes else " lines", unit_scale=self.by_bytes,
                        file=STDERR, disable=quiet, desc=desc)
        self._skipped = False

    def done(self, answers: list[Answer], skipped_bytes: int) -> None:
        """Count the lines of `answers`, and once the bytes of the lines a resumed run skipped (the ETA
        is for the rest)."""
        if self.by_bytes and skipped_bytes and not self._skipped:
            # done before this run: shown, but no part of its rate
            self.bar.initial = self.bar.n = self.bar.last_print_n = skipped_bytes
            self.bar.refresh()
            self._skipped = True
        self.bar.update(sum(a.size for a in answers) if self.by_bytes else len(answers))

    def ended(self) -> None:
        """The whole input read: its blank lines, which no answer counts, too."""
        if self.by_bytes and self.bar.total and self.bar.n < self.bar.total:
            self.bar.update(self.bar.total - self.bar.n)


@dataclass(frozen=True)
class Answer:
    """A line's output record, ready to write."""

    number: int  # the input line it answers
    size: int  # that line's bytes
    text: str  # the record: one line of strict JSON, newline included
    error: str | None  # why the line got an error record; None when it was answered


# answered(kept, stopping): the answers to the lines after the last of `kept` (the input lines that
# --resume's records answer, ascending; none: all lines), a chunk at a time, in input order, and the
# bytes of the lines up to it (for the progress bar); it stops early once `stopping()` says so, and
# raises `LmcorError` when the input cannot be read.
Answered = Callable[[Sequence[int], Callable[[], bool]], Iterator[tuple[list[Answer], int]]]


def answer_lines(
    args: argparse.Namespace,
    convert: Callable[[dict, int], Any],
    run: Callable[[list[Any]], list[Any]],
    record: Callable[[int, Any, Any], dict],
    verb: str,
    fields: RecordFields,
    echo: str | None = None,
    batches_per_chunk: int = 8,
    *,
    check_again: bool = True,
    recount: Callable[[], None] | None = None,
) -> int:
    """Answer every line of `args.input` into `args.output`.

    `convert` turns a line's JSON object and number into an item (raising `InputError`), `run` answers a list
    of items (an `InputError` in an item's place fails that item alone), `record` makes the output
    record of (line number, id, result), with `fields`, which may copy its line's field `echo` (both
    checked by --resume).
    `run` gets up to `batches_per_chunk` batches of lines at a time (more lines to group by length);
    a command whose batches take long takes 1, so that a signal stops it after the batch in flight (the
    chunk's records are written together: the chunk is what a signal waits for).
    Returns 0, or 1 when some lines failed; 130/143 after a signal. An error that stops the run keeps the records written so far, as a signal does.
    `--resume` answers the last line of a regular file's -o again (`check_again`; a command with a check of
    its own turns it off) and refuses the file when the record differs; `recount` then restarts the
    command's counters, that line not being this run's.
    """

    def again(line: Line) -> dict:
        [answer] = answer_chunk([line], convert, run, record)
        if recount is not None:
            recount()
        return json.loads(answer.text)

    def answered(kept: Sequence[int], stopping: Callable[[], bool]) -> Iterator[tuple[list[Answer], int]]:
        reader = _Reader(args.input, args.max_line_bytes, kept[-1] if kept else 0, capacity=args.batch_size * 16)
        while lines := reader.chunk(args.batch_size * batches_per_chunk, args.max_wait_ms / 1000, stopping):
            yield answer_chunk(lines, convert, run, record), reader.skipped_bytes
        if reader.failure is not None:
            raise LmcorError(f"{args.input}: reading failed ({reader.failure.strerror or reader.failure})")
        if not stopping():  # a signal stops the reader anywhere, even before the lines already answered
            check_resumed(args, kept, reader.skipped_lines, reader.skipped_recorded)

    return write_answers(args, answered, verb, fields, echo, again=again if check_again else None)


def write_answers(args: argparse.Namespace, answered: Answered, verb: str, fields: RecordFields,
                  echo: str | None = None, stdout: TextIO | None = None,
                  again: Callable[[Line], dict] | None = None) -> int:
    """Write what `answered` gives into `args.output` (or `stdout`, by default sys.stdout), with
    `answer_lines`' rules: a temporary file renamed at the end, `--resume` (`again`: a line's record
    as this run writes it, to check that the file's last is this run's), signals, the exit code."""
    output = Output(args.output, args.input, args.resume, fields, stdout)
    failed = output.kept_errors
    finished = refused = checking = False
    try:
        size = regular_file_size(args.input)
        if output.records and size is not None:
            checking = True  # whatever stops the check (a refusal, the model failing) leaves -o as it was
            _check_resumed_file(args, output, echo, again)
            checking = False
        with _Signals() as signals:
            progress = _Progress(size, verb, args.quiet)
            stopping = lambda: signals.received is not None  # noqa: E731
            try:
                for answers, skipped_bytes in answered(output.kept_lines, stopping):
                    failed += _write(answers, output)
                    progress.done(answers, skipped_bytes)
                if not stopping():
                    progress.ended()
            except KeyboardInterrupt:
                pass  # a second signal: the lines in flight are dropped
            finally:
                progress.bar.close()
            # The answers end early only when asked to stop (else the input ended, or an error was raised).
            finished = signals.received is None
            if not finished:
                return _interrupted(output, signals.received or signal.SIGINT)
    except KeyboardInterrupt:  # a signal before the handlers were installed, or outside main()'s thread
        refused = checking
        return _interrupted(output, signal.SIGINT)
    except Exception as e:  # lmcor's errors, and what it did not foresee (an ONNX Runtime failure)
        refused = isinstance(e, NotResumable) or checking
        if output.records and output.target is not None and not refused:  # a regular file: what --resume reads
            say(f"lmcor: {output.records} record(s) kept in {output.path} (input lines up to {output.through}); "
                "after fixing the error below, --resume answers the rest")
        raise
    finally:  # a refused --resume leaves -o, and the killed run's file it read, as they were
        output.close(keep=not refused and (finished or output.records > 0))
    if failed:
        say(f"lmcor: {failed} line(s) could not be answered; see their error records")
        return EXIT_BAD_LINES
    return 0


def answer_chunk(lines: list[Line], convert: Callable, run: Callable, record: Callable) -> list[Answer]:
    """The records of one chunk of lines, in order (`answer_lines` says what the callables do)."""
    items: list[tuple[Line, Any, Any]] = []  # (line, id, item or InputError)
    for line in lines:
        value = line.value
        ident = value.get("id") if isinstance(value, dict) else getattr(value, "ident", None)
        if not isinstance(value, (dict, InputError)):
            value = InputError(f"expected a JSON object, got {json_kind(value)}")
        elif isinstance(value, dict) and _error_record(value):  # piped from lmcor: its reason goes on
            value = InputError(f"the line is an error record of an earlier step: {value['error']}")
        if isinstance(value, dict):
            try:
                value = convert(value, line.number)
            except InputError as e:
                value = e
        items.append((line, ident, value))
    good = [n for n, (_, _, value) in enumerate(items) if not isinstance(value, InputError)]
    answers = dict(zip(good, run([items[n][2] for n in good]))) if good else {}
    out = []
    for n, (line, ident, value) in enumerate(items):
        result = answers.get(n, value)
        try:
            text = dump_record(error_record(line.number, ident, result) if isinstance(result, InputError)
                               else record(line.number, ident, result))
        except InputError as e:  # the result cannot be written (a number that is not finite): its line's id can
            result = e
            text = dump_record(error_record(line.number, ident, e))
        out.append(Answer(line.number, line.size, text, str(result) if isinstance(result, InputError) else None))
    return out


def _error_record(value: dict) -> bool:
    """Whether a line is an lmcor command's error record (`error_record`), not a request."""
    return isinstance(value.get("error"), str) and set(value) <= {"id", "line", "error"}


def _write(answers: list[Answer], output: Output) -> int:
    """Write one chunk's records; the number of failed lines."""
    for answer in answers:
        if answer.error is not None:
            say(f"lmcor: {output.input_name}: line {answer.number}: {answer.error}")
    if answers:
        output.put([answer.text for answer in answers], answers[-1].number)
    return sum(answer.error is not None for answer in answers)


def _interrupted(output: Output, number: int) -> int:
    if not output.records:
        kept = f"; {output.path} is left as it was" if output.path and output.path.exists() else ""
        say(f"lmcor: interrupted before any record was written{kept}")
        return EXIT_SIGNAL[number]
    where = f"to {output.path}" if output.path else "above"
    hint = ("; run the same command with --resume to answer the rest" if output.path
            else "; write to a file with -o to be able to --resume")
    lines = f" (input lines up to {output.through})"
    say(f"lmcor: interrupted: {output.records} record(s) written {where}{lines}{hint}")
    return EXIT_SIGNAL[number]


def error_record(number: int, ident: Any, error: InputError) -> dict:
    return {"id": ident, "line": number, "error": str(error)}
