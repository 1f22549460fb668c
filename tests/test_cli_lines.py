"""The line pipeline of `lmcor correct` at its edges: bad lines, pipes, FIFOs, signals, resume, strict output.

Every good line must be answered exactly as it is alone, whatever surrounds it.
"""

import array
import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import termios
import threading
import time

import pytest
from conftest import make_requests

from lmcor import Corrector, InputError
from lmcor.cli import main

GOOD = make_requests(6, seed=11)
DECODE = ["--max-new-tokens", "6", "-q"]


def _strict(line: str) -> dict:
    def refuse(constant: str):
        raise AssertionError(f"non-strict JSON constant {constant}")

    assert "\u2028" not in line and "\u2029" not in line
    return json.loads(line, parse_constant=refuse)


def _records(path) -> list[dict]:
    return [_strict(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def expected(bundles) -> dict[int, str]:
    """Each good request's output, corrected alone."""
    corrector = Corrector.load(bundles["t5"])
    return {r["id"]: corrector.correct_batch([r], max_new_tokens=6)[0].text for r in GOOD}


def _lmcor(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmcor.cli", *args], capture_output=True, timeout=300, **kwargs)


BAD = {
    "invalid UTF-8": (b'{"source": "caf\xe9", "candidates": ["a"]}', "not valid UTF-8"),
    "surrogate in source": (b'{"source": "x\\ud800", "candidates": ["a"]}', "lone surrogate"),
    "surrogate in candidates": (b'{"source": "x", "candidates": ["\\udfff"]}', "lone surrogate"),
    "surrogate in id": (b'{"id": "\\ud800", "source": "x", "candidates": ["a"]}', "lone surrogate"),
    "deep nesting": (b"[" * 100_000 + b"]" * 100_000, "nested deeper"),
    "huge integer": (b'{"id": ' + b"9" * 5000 + b', "source": "x", "candidates": ["a"]}', "a number with more than"),
    "infinite id": (b'{"id": 1e999, "source": "x", "candidates": ["a"]}', "NaN, Infinity or a number out of range"),
    "array line": (b'["x", ["a"]]', "expected a JSON object"),
    "string candidates": (b'{"source": "x", "candidates": "abc"}', "must be a list of strings"),
    "null candidates": (b'{"source": "x", "candidates": null}', "must be a list of strings"),
    "too long": (b'{"source": "' + b"a" * 300_000 + b'", "candidates": ["a"]}', "over the limit of 250000"),
}


def test_every_bad_line_is_its_own_error_and_the_rest_are_answered(bundles, expected, tmp_path):
    lines = [json.dumps(GOOD[0]).encode()]
    for bad, _ in BAD.values():
        lines += [bad, json.dumps(GOOD[len(lines) % len(GOOD)]).encode()]
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # a BOM must not cost the first line
    out = tmp_path / "out.jsonl"
    code = main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), "--max-line-bytes", "250000",
                 "--batch-size", "3", *DECODE])
    assert code == 1
    records = _records(out)
    assert [r["line"] for r in records] == list(range(1, len(lines) + 1))
    good = [r for r in records if "error" not in r]
    assert len(good) == len(BAD) + 1
    assert all(r["output"] == expected[r["id"]] for r in good)
    for record, (name, (_, message)) in zip(records[1::2], BAD.items()):
        assert message in record["error"], name


def test_output_text_is_strict_json_lines(bundles, tmp_path):
    request = {"id": "a\u2028b\u0085c", "source": "line\u2029end", "candidates": ["one\u2028two"]}
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(request, ensure_ascii=False) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), *DECODE]) == 0
    text = out.read_text(encoding="utf-8")
    assert len(text.splitlines()) == 1 and "\\u2028" in text  # splitlines: at U+0085, U+2028, U+2029 too
    assert _records(out)[0]["id"] == "a\u2028b\u0085c"


def test_output_equal_to_input_is_refused_and_input_kept(bundles, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    content = "".join(json.dumps(r) + "\n" for r in GOOD)
    source.write_text(content)
    link = tmp_path / "link.jsonl"
    link.symlink_to(source)
    for output in (source, link):
        assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(output), *DECODE]) == 2
        assert "is the input file" in capsys.readouterr().err
        assert source.read_text() == content


def test_a_failed_run_leaves_an_existing_output_as_it_was(bundles, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    out = tmp_path / "out.jsonl"
    out.write_text("earlier results\n")
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), "--fallback-below", "200",
                 *DECODE]) == 2
    assert out.read_text() == "earlier results\n"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert capsys.readouterr().err.count("lmcor: error:") == 1


def test_output_through_a_link_a_fifo_or_a_missing_folder(bundles, expected, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    want = [expected[r["id"]] for r in GOOD]
    # A link stays a link: its target gets the records.
    target, link = tmp_path / "target.jsonl", tmp_path / "link.jsonl"
    target.write_text("old\n")
    link.symlink_to(target)
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(link), *DECODE]) == 0
    assert link.is_symlink() and [r["output"] for r in _records(target)] == want
    # A FIFO is written in place (it cannot be replaced), and cannot be resumed.
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(fifo), *DECODE]) == 0
    reader.join(timeout=60)
    assert fifo.is_fifo() and [_strict(line)["output"] for line in got[0].splitlines()] == want
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(fifo), "--resume", *DECODE]) == 2
    assert "--resume needs -o to be a regular file" in capsys.readouterr().err
    # /dev/stdout into a pipe: a link to a pipe, written in place.
    piped = subprocess.run(f"{sys.executable} -m lmcor.cli correct --model {bundles['t5']} {source} -o /dev/stdout "
                           + " ".join(DECODE) + " | cat", shell=True, capture_output=True, timeout=300)
    assert [_strict(line)["output"] for line in piped.stdout.decode().splitlines()] == want, piped.stderr
    # An unusable -o is named as given, not as the temporary file beside it.
    missing = tmp_path / "no" / "out.jsonl"
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(missing), *DECODE]) == 2
    assert f"-o {missing}: cannot write there (the folder {missing.parent} does not exist)" in capsys.readouterr().err


def test_resume_refuses_the_output_of_another_input(bundles, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in GOOD[:2]))
    out = tmp_path / "out.jsonl"
    other = "".join(json.dumps({"id": n, "line": n, "output": "x", "truncated": False, "input_tokens": 3,
                                "output_tokens": 1}) + "\n" for n in range(1, 6))
    out.write_text(other)
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), "--resume", *DECODE]) == 2
    assert f"answers input lines up to 5, but {source} has 2: it is another input's output" in capsys.readouterr().err
    assert out.read_text() == other
    # as many lines or more, but the last record's id is not the one of its line here
    source.write_text("".join(json.dumps({**r, "id": f"mine-{n}"}) + "\n" for n, r in enumerate(GOOD[:6])))
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), "--resume", *DECODE]) == 2
    assert f"answers line 5 with the id 5, but that line of {source} has the id 'mine-4'" in capsys.readouterr().err
    assert out.read_text() == other
    # JSON nested past Python's recursion limit
    out.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), "--resume", *DECODE]) == 2
    assert f"--resume: -o {out} line 1 is not a record of this command's" in capsys.readouterr().err
    # refused, it leaves -o as it was (a torn last line too) and a killed run's file it read from, and
    # names that file (the file's records went into -o, and the file was deleted)
    out.write_text(other + '{"id": 6, "li')
    orphan = tmp_path / ".out.jsonl.abcd1234.partial"
    orphan.write_text("".join(json.dumps({"id": f"b{n}", "line": n, "output": "y", "truncated": False,
                                          "input_tokens": 3, "output_tokens": 1}) + "\n" for n in range(1, 7)))
    os.utime(orphan, (time.time() + 5, time.time() + 5))  # newer than -o: a later run's
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), "--resume", *DECODE]) == 2
    assert f"--resume: {orphan} (a killed run's, into -o {out}) answers line 6 with the id 'b6'" in capsys.readouterr().err
    assert out.read_text() == other + '{"id": 6, "li' and orphan.is_file()
    orphan.unlink()
    out.write_text(other)
    # the same input's output, cut after its second record, resumes (ids of every kind, or none)
    source.write_text("".join(json.dumps({**r, "id": ident}) + "\n" for r, ident in zip(GOOD[:4], [7, None, "b", 1.5])))
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), *DECODE]) == 0
    whole = out.read_text()
    out.write_text("".join(whole.splitlines(keepends=True)[:2]))
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), "--resume", *DECODE]) == 0
    assert out.read_text() == whole


def test_closed_standard_streams_get_one_line(bundles, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(GOOD[0]) + "\n")
    command = [sys.executable, "-m", "lmcor.cli", "correct", "--model", str(bundles["t5"]), *DECODE]
    closed_in = subprocess.run(f"{' '.join(command)} - <&-", shell=True, capture_output=True, timeout=300)
    assert closed_in.returncode == 2 and b"standard input is closed" in closed_in.stderr, closed_in.stderr
    closed_out = subprocess.run(f"{' '.join(command)} {source} >&-", shell=True, stderr=subprocess.PIPE, timeout=300)
    assert closed_out.returncode == 2 and b"standard output is closed" in closed_out.stderr, closed_out.stderr


def test_pipes_and_fifos_are_read_once(bundles, expected, tmp_path):
    content = "".join(json.dumps(r) + "\n" for r in GOOD)
    piped = subprocess.run(f"cat | {sys.executable} -m lmcor.cli correct --model {bundles['t5']} /dev/stdin "
                           + " ".join(DECODE), shell=True, input=content.encode(), capture_output=True, timeout=300)
    assert piped.returncode == 0, piped.stderr
    assert [_strict(line)["output"] for line in piped.stdout.decode().splitlines()] == [expected[r["id"]] for r in GOOD]

    fifo = tmp_path / "requests.fifo"
    os.mkfifo(fifo)

    def feed():
        with open(fifo, "w") as f:
            f.write(content)

    writer = threading.Thread(target=feed)
    writer.start()
    run = _lmcor("correct", "--model", str(bundles["t5"]), str(fifo), *DECODE)
    writer.join()
    assert run.returncode == 0, run.stderr
    assert [_strict(line)["output"] for line in run.stdout.decode().splitlines()] == [expected[r["id"]] for r in GOOD]


def test_stdin_lines_are_answered_as_they_arrive(bundles, expected):
    process = subprocess.Popen([sys.executable, "-m", "lmcor.cli", "correct", "--model", str(bundles["t5"]), "-",
                                *DECODE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for request in GOOD[:2]:
            process.stdin.write((json.dumps(request) + "\n").encode())
            process.stdin.flush()
            answer = _strict(process.stdout.readline().decode())  # stdin is still open
            assert answer["output"] == expected[request["id"]]
    finally:
        process.stdin.close()
        assert process.wait(timeout=60) == 0


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_keeps_everything_finished_and_resume_answers_the_rest(bundles, expected, tmp_path, signum, code):
    fifo = tmp_path / "requests.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "out.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "lmcor.cli", "correct", "--model", str(bundles["t5"]), str(fifo),
                                "-o", str(out), *DECODE], stderr=subprocess.PIPE)
    with open(fifo, "w") as feed:
        for request in GOOD[:3]:
            feed.write(json.dumps(request) + "\n")
        feed.flush()
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(".out.jsonl.*.partial")) or not next(tmp_path.glob(".out.jsonl.*.partial")).stat().st_size:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        process.send_signal(signum)
        assert process.wait(timeout=60) == code
    err = process.stderr.read().decode()
    assert "--resume" in err and "Traceback" not in err
    kept = _records(out)
    assert kept and [r["output"] for r in kept] == [expected[r["id"]] for r in GOOD[: len(kept)]]

    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    with open(out, "a") as f:
        f.write('{"id": 99, "line": 9')  # a torn last line is answered again
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), "--resume", *DECODE]) == 0
    assert [(r["line"], r["output"]) for r in _records(out)] == [(n + 1, expected[r["id"]]) for n, r in enumerate(GOOD)]

    # A signal while a resumed run still reads past the lines already answered: interrupted, not "another input's"
    whole = out.read_text()
    process = subprocess.Popen([sys.executable, "-m", "lmcor.cli", "correct", "--model", str(bundles["t5"]), str(fifo),
                                "-o", str(out), "--resume", *DECODE], stderr=subprocess.PIPE)
    with open(fifo, "w") as feed:  # opened once the run reads it, its signal handlers set
        feed.write(json.dumps(GOOD[0]) + "\n")
        feed.flush()
        time.sleep(0.5)
        process.send_signal(signum)
        assert process.wait(timeout=60) == code
    err = process.stderr.read().decode()
    assert "--resume" in err and "another input's output" not in err and out.read_text() == whole


def test_eval_reports_a_line_that_is_not_an_object(bundles, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    good = {**GOOD[0], "target": GOOD[0]["source"]}
    data.write_text(json.dumps(good) + "\n" + json.dumps([GOOD[1]["source"], GOOD[1]["candidates"]]) + "\n")
    assert main(["eval", str(data), "--model", str(bundles["t5"]), "--json", str(tmp_path / "e.json"), "-q",
                 "--max-new-tokens", "6"]) == 1
    assert "line 2: expected a JSON object" in capsys.readouterr().err
    assert json.loads((tmp_path / "e.json").read_text())["items"] == 1


def test_eval_leaves_out_a_request_too_long_and_checks_json_first(bundles, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    long = {"source": " ".join(["word"] * 600), "candidates": ["a"], "target": "a"}
    rows = [{**GOOD[0], "target": GOOD[0]["source"]}, long, {**GOOD[1], "target": GOOD[1]["source"]}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = tmp_path / "e.json"
    args = ["eval", str(data), "--model", str(bundles["t5"]), "-q", "--max-new-tokens", "6"]
    assert main([*args, "--json", str(report)]) == 1
    captured = capsys.readouterr()
    assert "line 2: the source and template" in captured.err and "left out of the scores" in captured.err
    assert "corrector" in captured.out  # the table is printed
    scores = json.loads(report.read_text())
    assert scores["items"] == 2 and [e["line"] for e in scores["errors"]] == [2]
    content = data.read_text()
    for path, message in ((data, "is the data file"), (tmp_path, "is a directory"),
                          (tmp_path / "no" / "e.json", "its folder does not exist")):
        assert main([*args, "--json", str(path)]) == 2
        assert message in capsys.readouterr().err
    assert data.read_text() == content


def _mutations(rng: random.Random) -> list[bytes]:
    request = json.dumps(rng.choice(GOOD)).encode()
    return [
        request[: rng.randrange(1, len(request))],  # cut short
        request.replace(b'"', b"'", 1),
        request[:5] + bytes([rng.randrange(0x80, 0x100)]) + request[5:],  # not UTF-8 (mostly)
        b'{"source": "x", "candidates": ["\\ud8' + rng.choice([b"00", b"3f", b"ff"]) + b'"]}',
        b"[" * rng.randrange(40, 5000) + b"]" * rng.randrange(40, 5000),
        b'{"id": ' + b"7" * rng.randrange(4400, 6000) + b', "source": "x", "candidates": ["a"]}',
        rng.choice([b"null", b"42", b'"text"', b"true", b"[]", b"{}", b"NaN", b"-Infinity"]),
        json.dumps({"source": rng.choice([None, 1, [], {}, ""]), "candidates": ["a"]}).encode(),
        json.dumps({"source": "x", "candidates": rng.choice([None, "abc", [], [1], [None], {}, [["a"]]])}).encode(),
        b'{"id": 1e' + str(rng.randrange(309, 999)).encode() + b', "source": "x", "candidates": ["a"]}',
        b'{"source": "' + b"b" * rng.randrange(3000, 9000) + b'", "candidates": ["a"]}',
        bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60))).replace(b"\n", b" "),
    ]


def test_fuzzed_bad_lines_never_change_a_good_answer(bundles, expected, tmp_path):
    rng = random.Random(5)
    lines, good_at = [], {}
    for _ in range(300):
        if rng.random() < 0.15:
            request = rng.choice(GOOD)
            good_at[len(lines) + 1] = request["id"]
            lines.append(json.dumps(request).encode())
        else:
            line = rng.choice(_mutations(rng))
            lines.append(line if line.strip() else b"-")
    source = tmp_path / "fuzz.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "out.jsonl"
    run = _lmcor("correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), "--max-line-bytes", "2048",
                 *DECODE)
    assert run.returncode == 1, run.stderr
    assert b"Traceback" not in run.stderr
    records = _records(out)
    assert [r["line"] for r in records] == list(range(1, len(lines) + 1))
    for record in records:
        if record["line"] in good_at:
            assert record.get("output") == expected[good_at[record["line"]]], record
        else:
            assert ("error" in record) != ("output" in record), record  # an answer or its error, never both
            assert isinstance(record.get("error", record.get("output")), str), record


def test_split_lines_matches_splitlines_at_any_read_size():
    from lmcor.cli.lines import split_lines

    rng = random.Random(3)
    for _ in range(300):
        data = bytes(rng.choice(b"ab\n") for _ in range(rng.randrange(0, 60)))
        limit = rng.randrange(0, 8)
        pieces = iter([data[i : i + 3] for i in range(0, len(data), 3)] if rng.random() < 0.5 else [data])
        got = list(split_lines(lambda n: next(pieces, b""), limit))
        want = [(line if len(line.rstrip(b"\n")) <= limit else None, len(line)) for line in data.splitlines(keepends=True)]
        assert got == want, (data, limit)


def test_a_line_cut_short_is_said_at_its_own_end():
    from lmcor.runtime.jsonl import parse_line

    with pytest.raises(InputError, match=r"not valid JSON \(Expecting ',' delimiter at column 9\)"):
        parse_line(b'{"a": 1 \n')
    with pytest.raises(InputError, match=r"\(Invalid control character at column 8\)"):
        parse_line(b'{"a": "\x01"}\n')


def test_an_option_in_a_line_is_refused_and_other_fields_left_alone(bundles, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in (
        {**GOOD[0], "num_beams": 4}, {**GOOD[1], "target": "x", "line": 9}, {**GOOD[2], "min_new_tokens": 2},
        {**GOOD[3], "drafts": False})))
    out = tmp_path / "out.jsonl"
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), *DECODE]) == 1
    first, second, third, fourth = _records(out)
    assert first["error"] == ("field 'num_beams' is an option of the whole run here (--num-beams), not of one line "
                              "(lmcor serve takes options per request)")
    assert "output" in second
    assert "(--min-new-tokens), not of one line" in third["error"] and "(--no-drafts)" in fourth["error"]


def test_resume_refuses_a_file_that_holds_other_lines_and_leaves_it(bundles, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in GOOD[:3]))
    for foreign in ("".join(json.dumps(r) + "\n" for r in GOOD[:3]), "garbage\n",
                    json.dumps({"id": 0, "line": 1, "output": "x"}) + "\nnot a record\n"):
        out = tmp_path / "out.jsonl"
        out.write_text(foreign)
        assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), "--resume", *DECODE]) == 2
        assert "is not a record of this command's" in capsys.readouterr().err
        assert out.read_text() == foreign and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_a_resumed_run_counts_the_lines_that_failed_before(bundles, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"source": "x", "candidates": "abc"}) + "\n" + json.dumps(GOOD[0]) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), *DECODE]) == 1
    assert f"lmcor: {source}: line 1: field 'candidates' must be a list of strings" in capsys.readouterr().err
    whole = out.read_text()
    out.write_text(whole.splitlines(keepends=True)[0])
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), "--resume", *DECODE]) == 1
    assert "1 line(s) could not be answered" in capsys.readouterr().err and out.read_text() == whole


def test_resume_continues_from_what_a_killed_run_left(bundles, tmp_path, capsys):
    """A run killed outright (SIGKILL) leaves its records in its temporary file beside -o, not in -o:
    --resume continues from them where they are more than -o holds, and removes the file."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in GOOD))
    out = tmp_path / "out.jsonl"
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), *DECODE]) == 0
    whole = out.read_text().splitlines(keepends=True)
    out.write_text("".join(whole[:1]))
    killed = tmp_path / ".out.jsonl.x1y2z3.partial"
    killed.write_text("".join(whole[:4]) + whole[4][:9])  # torn where it was killed
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), "--resume", *DECODE]) == 0
    assert f"continuing from {killed}" in capsys.readouterr().err
    assert out.read_text() == "".join(whole) and not killed.exists()
    # Not another -o's ("out.jsonl.bak"), nor one older than -o (an earlier run's, whose records -o holds).
    from lmcor.cli.lines import resumed_from

    other = tmp_path / ".out.jsonl.bak.a1b2c3d4.partial"
    other.write_text("".join(whole))
    stale = tmp_path / ".out.jsonl.e5f6g7h8.partial"
    stale.write_text("".join(whole))
    os.utime(stale, (1, 1))
    assert resumed_from(out) == out


def test_resume_answers_again_a_line_whose_error_record_ends_the_output(bundles, tmp_path):
    """A producer stopped mid-line (`producer | lmcor correct -` and Ctrl-C) leaves a torn line whose error
    record ends -o: --resume answers that line again, from a file or a pipe, instead of refusing the
    output as another input's or keeping the error for a line that is whole now."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in GOOD[:3]))
    out = tmp_path / "out.jsonl"
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), *DECODE]) == 0
    whole = out.read_text()
    torn = whole.splitlines(keepends=True)[0] + json.dumps(
        {"id": None, "line": 2, "error": "not valid JSON (Unterminated string starting at: line 1 column 9)"}) + "\n"
    out.write_text(torn)
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), "--resume", *DECODE]) == 0
    assert out.read_text() == whole
    out.write_text(torn)
    done = _lmcor("correct", "--model", str(bundles["t5"]), "-", "-o", str(out), "--resume", *DECODE,
                  input=source.read_bytes())
    assert done.returncode == 0, done.stderr.decode()
    assert out.read_text() == whole


def test_a_line_that_comes_while_a_signal_is_handled_is_left_to_resume(tmp_path):
    from lmcor.cli.lines import _Reader

    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in GOOD[:2]))
    reader = _Reader(str(source), 1 << 20, 0, capacity=8)
    deadline = time.monotonic() + 10
    while reader._queue.qsize() < 2 and time.monotonic() < deadline:  # both lines read: one is there to take
        time.sleep(0.01)
    checks = iter([False])  # the signal is handled while the first line is awaited
    assert reader.chunk(8, 1.0, lambda: next(checks, True)) == []


def test_an_empty_input_path_is_refused_by_name(capsys):
    assert main(["correct", "", *DECODE]) == 2
    assert "lmcor: error: the input file's path is empty" in capsys.readouterr().err


@pytest.mark.parametrize("args, said", [
    (["-o", ""], "-o is empty"),
    (["--providers", ","], "--providers must be comma-separated"),
    (["--model", ""], "a bundle's path is empty"),
])
def test_empty_paths_and_names_are_refused(tmp_path, capsys, args, said):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(GOOD[0]) + "\n")
    assert main(["correct", str(source), *args, *DECODE]) == 2
    assert said in capsys.readouterr().err


def test_a_batch_waits_at_most_an_hour(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["correct", str(tmp_path / "in.jsonl"), "--max-wait-ms", "1e13"])
    assert "--max-wait-ms: must be a number of milliseconds from 0 to 3600000" in capsys.readouterr().err


def test_a_generated_sample_depends_on_its_line_alone(gpt2_bundle, tmp_path):
    """However the lines come (a pipe's one at a time, a resume mid-file), each line's sample is the
    one a whole-file run gives it."""
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps({"id": n, "prompt": "a b"}) + "\n" for n in range(4)))
    sample = ["generate", "--model", str(gpt2_bundle), "--temperature", "0.9", "--seed", "7", "--max-new-tokens",
              "5", "-q"]
    whole = _lmcor(*sample, str(prompts))
    assert whole.returncode == 0, whole.stderr
    assert len({_strict(line)["output"] for line in whole.stdout.decode().splitlines()}) > 1
    one_at_a_time = _lmcor(*sample, "-", "--batch-size", "1", input=prompts.read_bytes())
    assert one_at_a_time.stdout == whole.stdout
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"".join(whole.stdout.splitlines(keepends=True)[:2]))
    resumed = _lmcor(*sample, str(prompts), "-o", str(out), "--resume")
    assert resumed.returncode == 0 and out.read_bytes() == whole.stdout


def _good_file(tmp_path, name="in.jsonl", count=3):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in GOOD[:count]))
    return path


def test_an_unwritable_stderr_costs_no_record_and_no_exit_code(bundles, tmp_path):
    data = _good_file(tmp_path)
    data.write_text(data.read_text() + "[1]\n")  # a bad line too: its message goes to stderr
    command = f'"{sys.executable}" -m lmcor.cli correct "{data}" --model "{bundles["t5"]}" --max-new-tokens 6'
    for name, redirect in (("full", "2>/dev/full"), ("closed", "2>&-")):
        out = tmp_path / f"{name}.jsonl"
        run = subprocess.run(f'{command} -o "{out}" {redirect}', shell=True, timeout=300)
        assert run.returncode == 1, name  # some lines failed: 1, as with a working stderr
        assert [r["line"] for r in _records(out)] == [1, 2, 3, 4], name


def test_an_output_that_is_what_stdin_reads_is_refused(bundles, tmp_path):
    data = _good_file(tmp_path)
    before = data.read_bytes()
    with open(data, "rb") as stdin:
        run = _lmcor("correct", "-", "--model", str(bundles["t5"]), "-o", str(data), stdin=stdin)
    assert run.returncode == 2 and b"is what standard input reads" in run.stderr
    assert data.read_bytes() == before
    run = subprocess.run(f'cat "{data}" | "{sys.executable}" -m lmcor.cli correct - --model "{bundles["t5"]}" -q '
                         "-o /dev/stdin", shell=True, capture_output=True, timeout=60)
    assert run.returncode == 2 and b"is what standard input reads" in run.stderr
    with open(data, "rb") as stdin:  # a device such as /dev/null may be both
        assert _lmcor("correct", "-", "--model", str(bundles["t5"]), *DECODE, "-o", os.devnull,
                      stdin=stdin).returncode == 0


def test_resume_refuses_another_commands_records(bundles, tmp_path, capsys):
    data = _good_file(tmp_path)
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text(json.dumps({"id": None, "line": 1, "label": "right", "probabilities": [0.1, 0.9],
                                   "truncated": False}) + "\n")
    assert main(["correct", str(data), "--model", str(bundles["t5"]), *DECODE, "-o", str(foreign), "--resume"]) == 2
    assert "is not a record of this command's" in capsys.readouterr().err
    assert json.loads(foreign.read_text())["label"] == "right"  # left as it was
    generated = tmp_path / "generated.jsonl"  # `generate`'s records have an output too, but not a correction's fields
    generated.write_text(json.dumps({"id": GOOD[0]["id"], "line": 1, "output": "x", "output_tokens": 1}) + "\n")
    assert main(["correct", str(data), "--model", str(bundles["t5"]), *DECODE, "-o", str(generated), "--resume"]) == 2


def test_dash_for_output_is_stdout_and_a_trailing_slash_names_a_folder(bundles, tmp_path, monkeypatch, capsys):
    data = _good_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["correct", str(data), "--model", str(bundles["t5"]), *DECODE, "-o", "-"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3 and not (tmp_path / "-").exists()
    kept = _good_file(tmp_path, "keep.jsonl")
    for target in ("newdir/", "keep.jsonl/"):
        assert main(["correct", str(data), "--model", str(bundles["t5"]), *DECODE, "-o", target]) == 2
        assert f"-o {target}: not a directory" in capsys.readouterr().err
    assert not (tmp_path / "newdir").exists() and kept.read_text().count("\n") == 3


def test_a_replaced_output_keeps_its_permissions(bundles, tmp_path):
    data = _good_file(tmp_path)
    out = tmp_path / "private.jsonl"
    out.write_text("old\n")
    out.chmod(0o600)
    assert main(["correct", str(data), "--model", str(bundles["t5"]), *DECODE, "-o", str(out)]) == 0
    assert (out.stat().st_mode & 0o777) == 0o600 and len(_records(out)) == 3


def test_a_bom_on_a_blank_first_line_is_no_line(bundles, tmp_path, capsys):
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf\n" + _good_file(tmp_path).read_bytes())
    assert main(["correct", str(data), "--model", str(bundles["t5"]), *DECODE]) == 0
    assert [json.loads(x)["line"] for x in capsys.readouterr().out.splitlines()] == [2, 3, 4]


def test_a_bom_inside_a_file_is_said_as_files_joined_together(bundles, tmp_path, capsys):
    one = b"\xef\xbb\xbf" + _good_file(tmp_path).read_bytes()
    data = tmp_path / "joined.jsonl"
    data.write_bytes(one + one)
    assert main(["correct", str(data), "--model", str(bundles["t5"]), *DECODE]) == 1  # the others answered
    records = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    bad = [r for r in records if "error" in r]
    assert len(records) == 6 and [r["line"] for r in bad] == [4]
    assert "a byte order mark (BOM) starts this line, not the file's first: files joined together?" in bad[0]["error"]


def test_records_piped_through_o_to_a_reader_that_leaves_are_not_said_to_be_resumable(bundles, tmp_path):
    """`-o /dev/stdout | head -1`: exit 141, and no "--resume answers the rest" (it refuses a pipe)."""
    import subprocess
    import sys

    data = tmp_path / "many.jsonl"
    data.write_text(_good_file(tmp_path).read_text() * 100)
    first = tmp_path / "first.jsonl"
    command = (f"{sys.executable} -m lmcor.cli correct {data} --model {bundles['t5']} -q --max-new-tokens 6 "
               f"--batch-size 1 -o /dev/stdout | head -1 >{first}; exit ${{PIPESTATUS[0]}}")  # lmcor's status
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=300)
    assert done.returncode == 141, done.stderr
    assert len(first.read_text().splitlines()) == 1 and "output" in json.loads(first.read_text())
    assert "--resume answers the rest" not in done.stderr and "record(s) kept" not in done.stderr


def test_write_errors_and_odd_paths_name_what_failed(bundles, tmp_path, capsys):
    data = _good_file(tmp_path)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "dangling.jsonl").symlink_to(tmp_path / "nodir" / "x.jsonl")
    for target, said in (("/dev/full", "-o /dev/full: cannot write (No space left on device)"),
                         (str(tmp_path / "loop"), f"-o {tmp_path / 'loop'}: Too many levels of symbolic links"),
                         (str(tmp_path / "dangling.jsonl"), f"the folder {tmp_path / 'nodir'} does not exist")):
        assert main(["correct", str(data), "--model", str(bundles["t5"]), *DECODE, "-o", target]) == 2, target
        assert said in capsys.readouterr().err, target
    with open("/dev/full", "wb") as full:
        run = subprocess.run([sys.executable, "-m", "lmcor.cli", "correct", str(data), "--model", str(bundles["t5"]),
                              *DECODE], stdout=full, stderr=subprocess.PIPE, timeout=300)
    assert run.returncode == 2 and b"standard output: cannot write (No space left on device)" in run.stderr


def test_an_error_record_keeps_an_id_it_can_write_back_and_names_json_types(bundles, tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text('{"id": 2, "source": "a b", "candidates": ["a"], "x": Infinity}\n'
                    '{"id": Infinity, "source": "a b", "candidates": ["a"]}\n'
                    '{"id": 4, "source": "x", "candidates": null}\n')
    assert main(["correct", str(data), "--model", str(bundles["t5"]), *DECODE]) == 1
    records = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in records] == [2, None, 4]
    assert records[2]["error"] == "field 'candidates' must be a list of strings, got null"


def test_no_wait_still_batches_the_lines_already_read(tmp_path):
    """`--max-wait-ms 0` waits for nothing more, but takes what the reader holds: a file is batched."""
    from lmcor.cli.lines import _Reader

    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"source": f"s{n}", "candidates": ["c"]}) + "\n" for n in range(40)))
    reader = _Reader(str(path), 1 << 20, 0, capacity=64)
    deadline = time.monotonic() + 10
    while reader._queue.qsize() < 41 and time.monotonic() < deadline:  # the lines and the end
        time.sleep(0.01)
    assert [len(reader.chunk(16, 0.0, lambda: False)) for _ in range(3)] == [16, 16, 8] and reader.ended


def test_a_signal_while_resume_copies_the_output_leaves_no_temporary_file(tmp_path, monkeypatch):
    from lmcor.cli.correct import FIELDS
    from lmcor.cli.lines import Output

    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps({"source": "s", "candidates": ["c"]}) + "\n")
    out.write_text(json.dumps({"id": None, "line": 1, "output": "c"}) + "\n")

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Output, "_keep_finished", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Output(str(out), str(source), True, FIELDS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_a_field_given_twice_fails_its_line(bundles, tmp_path, capsys):
    """Python keeps the last of two `source` fields without a word: the line is refused by name."""
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "source": "she go", "source": "x", "candidates": ["She goes."]}\n'
                      + json.dumps(GOOD[0]) + "\n"
                      + '{"source": "a", "source": "b", "id": 1, "id": 2, "candidates": ["A."]}\n')
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-q", *DECODE]) == 1
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert records[0]["error"] == "field 'source' appears twice in one object" and "output" in records[1]
    assert records[0]["id"] == 1  # its id is not in doubt
    assert records[2]["id"] is None and records[2]["error"] == "field 'source' appears twice in one object"


def test_a_result_that_cannot_be_written_keeps_its_lines_id():
    """Its error record names the line's id, which --resume compares (a null one refused the file)."""
    from lmcor.cli.lines import Line, answer_chunk

    (answer,) = answer_chunk([Line(3, 10, {"id": "x7", "text": "a"})], lambda value, number: value,
                             lambda items: [0.5 for _ in items],
                             lambda number, ident, result: {"id": ident, "line": number, "p": float("nan")})
    assert json.loads(answer.text)["id"] == "x7" and answer.error


def _unread(pipe) -> int:
    """The bytes written into `pipe` that its reader has not read yet (Linux: FIONREAD on either end)."""
    count = array.array("i", [0])
    fcntl.ioctl(pipe.fileno(), termios.FIONREAD, count)
    return count[0]


def test_a_signal_while_a_batch_waits_for_more_lines_answers_those_taken_at_once(bundles, expected, tmp_path):
    """A line taken, the batch waiting --max-wait-ms for more: the signal ends the wait (it waited the
    whole of it, a signal handler's return resuming the queue's wait)."""
    out = tmp_path / "out.jsonl"
    process = subprocess.Popen([sys.executable, "-m", "lmcor.cli", "correct", "--model", str(bundles["t5"]), "-",
                                "-o", str(out), "--max-wait-ms", "60000", *DECODE],
                               stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        process.stdin.write((json.dumps(GOOD[0]) + "\n").encode())
        process.stdin.flush()
        deadline = time.monotonic() + 120
        while _unread(process.stdin):  # the line taken (its reader starts once the signal handlers are set)
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        time.sleep(1)  # the line from the reader's queue into the batch, which waits for more lines
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 143
        assert time.monotonic() - signalled < 10
    finally:
        process.kill()
        process.stdin.close()
    assert [r["output"] for r in _records(out)] == [expected[GOOD[0]["id"]]]


def test_progress_ends_at_the_whole_input_and_rates_only_this_runs_lines():
    """Blank lines are answered by no record: the bar ends at the input's size all the same (it stopped
    short); bytes an earlier run answered are shown, not counted in this run's rate (its ETA was short)."""
    from lmcor.cli.lines import Answer, _Progress

    progress = _Progress(1000, "correcting", quiet=False)
    progress.done([Answer(9, 100, "", None)], skipped_bytes=800)
    assert (progress.bar.n, progress.bar.initial) == (900, 800)
    progress.ended()
    assert progress.bar.n == 1000
    progress.bar.close()


def test_resume_refuses_an_output_that_misses_lines_it_answers_past(bundles, tmp_path, capsys):
    """An -o that skips input lines (records removed by hand: `grep -v error` to retry the failed lines)
    is no interrupted run's: --resume would never answer the lines it lacks. Refused, from a file
    before any work and from a pipe once it is read, and -o is left as it was."""
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(GOOD[0]) + "\n\n" + json.dumps({"source": "x", "candidates": "abc"}) + "\n"
                      + "".join(json.dumps(r) + "\n" for r in GOOD[1:4]))
    out = tmp_path / "out.jsonl"
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), *DECODE]) == 1
    whole = out.read_text().splitlines(keepends=True)
    assert [r["line"] for r in _records(out)] == [1, 3, 4, 5, 6]  # line 2 is blank: no record
    capsys.readouterr()
    for kept, missing in (([whole[0], *whole[2:4]], 3), (whole[3:4], 1)):
        out.write_text("".join(kept))
        assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), "--resume", *DECODE]) == 2
        said = capsys.readouterr().err
        assert f"--resume: -o {out} holds no record of input line {missing}, which {source} has" in said, said
        assert "record(s) kept" not in said and out.read_text() == "".join(kept)
        done = _lmcor("correct", "--model", str(bundles["t5"]), "-", "-o", str(out), "--resume", *DECODE,
                      input=source.read_bytes())
        assert done.returncode == 2 and f"holds no record of input line {missing}" in done.stderr.decode()
        assert out.read_text() == "".join(kept)
    # A record whose line is not a number of lines (true is no 1) is no record of this command's.
    out.write_text(whole[0].replace('"line": 1', '"line": true'))
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), "--resume", *DECODE]) == 2
    assert f"--resume: -o {out} line 1 is not a record of this command's" in capsys.readouterr().err


def test_resume_compares_ids_as_json_values(bundles, tmp_path, capsys):
    """The last record's id must be its line's as JSON writes it: true is not 1, nor is 1.0."""
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": 1, "line": 1, "output": "x", "truncated": False, "input_tokens": 3,
                               "output_tokens": 1}) + "\n")
    source = tmp_path / "in.jsonl"
    for other in (True, 1.0):
        source.write_text(json.dumps({**GOOD[0], "id": other}) + "\n" + json.dumps(GOOD[1]) + "\n")
        assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), "--resume", *DECODE]) == 2
        assert f"answers line 1 with the id 1, but that line of {source} has the id {json.dumps(other)}" in \
            capsys.readouterr().err


def test_resume_refuses_the_output_of_another_model_or_options(bundles, tmp_path, capsys):
    """--resume answers the file's last line again: a record written by another model or with other
    options is refused (the file would mix two runs' answers) and the file left as it was; this run's
    own is continued, and --stats counts this run's lines alone."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in GOOD[:4]))
    half = tmp_path / "half.jsonl"
    half.write_text("".join(json.dumps(r) + "\n" for r in GOOD[:2]))
    out = tmp_path / "out.jsonl"
    bart = Corrector.load(bundles["bart"])
    expected = [r.text for r in bart.correct_batch(GOOD[:4], max_new_tokens=6)]
    other = Corrector.load(bundles["t5"]).correct_batch([GOOD[1]], max_new_tokens=6)[0].text
    shorter = bart.correct_batch([GOOD[1]], max_new_tokens=3)[0].text
    assert expected[1] not in (other, shorter)  # what the refusals below stand on
    assert main(["correct", "--model", str(bundles["bart"]), str(half), "-o", str(out), *DECODE]) == 0
    written = out.read_text()
    for flags in (["--model", str(bundles["t5"]), *DECODE], ["--model", str(bundles["bart"]), "-q", "--max-new-tokens", "3"]):
        assert main(["correct", str(source), "-o", str(out), "--resume", *flags]) == 2
        err = capsys.readouterr().err
        assert f"--resume: -o {out} answers line 2 with the output" in err and \
            "where this run writes" in err and "it was written with another model or other options" in err
        assert out.read_text() == written
    # a record edited by hand is no run's
    out.write_text(written.replace(json.dumps(expected[1]), json.dumps("edited")))
    assert main(["correct", "--model", str(bundles["bart"]), str(source), "-o", str(out), "--resume", *DECODE]) == 2
    assert "answers line 2 with the output 'edited', where this run writes" in capsys.readouterr().err
    out.write_text(written)
    assert main(["correct", "--model", str(bundles["bart"]), str(source), "-o", str(out), "--resume", "--stats",
                 *DECODE]) == 0
    assert [r["output"] for r in _records(out)] == expected
    assert "lmcor: 2 requests corrected" in capsys.readouterr().err


def test_the_records_are_on_the_disk_before_they_replace_the_output(bundles, tmp_path, monkeypatch):
    """A crash (power lost) just after -o is replaced must not leave an empty -o: the temporary file
    is synced before the rename, and the folder after it."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in GOOD[:2]))
    out = tmp_path / "out.jsonl"
    out.write_text("an earlier run's\n")
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a))), replace(a, b)))
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), *DECODE]) == 0
    [(_, temp)] = [e for e in events if e[0] == "replace"]
    assert events == [("fsync", temp), ("replace", temp), ("fsync", str(tmp_path))]
    assert len(_records(out)) == 2


def test_a_sync_that_fails_costs_no_record_and_leaves_no_temporary_file(bundles, tmp_path, monkeypatch):
    """Some file systems cannot sync: the records still replace -o, and nothing is left beside it."""
    import errno

    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(GOOD[0]) + "\n")
    out = tmp_path / "out.jsonl"

    def refuse(fd):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "fsync", refuse)
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), *DECODE]) == 0
    assert len(_records(out)) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_a_failure_while_resume_checks_the_last_line_leaves_the_output_as_it_was(bundles, tmp_path, monkeypatch,
                                                                                  capsys):
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in GOOD[:3]))
    out = tmp_path / "out.jsonl"
    written = "".join(json.dumps({"id": r["id"], "line": n, "output": "x", "truncated": False, "input_tokens": 3,
                                  "output_tokens": 1}) + "\n" for n, r in enumerate(GOOD[:1], start=1))
    out.write_text(written + json.dumps({"id": GOOD[1]["id"], "line": 2, "error": "an earlier failure"}) + "\n")
    before = out.read_text()

    def fail(self, *args, **kwargs):
        raise RuntimeError("the model failed")

    monkeypatch.setattr(Corrector, "correct_batch", fail)
    assert main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), "--resume", *DECODE]) == 2
    assert "the model failed" in capsys.readouterr().err
    assert out.read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_resume_compares_numbers_within_a_tolerance():
    """Another batch shape moves the last digits of a probability: those agree; integers, types and
    larger differences do not."""
    from lmcor.cli.lines import _close

    assert _close([0.25, 0.75], [0.25 * (1 + 1e-7), 0.75 - 1e-9]) and _close(0.0, 1e-9) and _close({"p": 1.0}, {"p": 1})
    assert not _close([0.25, 0.75], [0.26, 0.74]) and not _close([0.5], [0.5, 0.5]) and not _close(0.5, "0.5")
    assert not _close(3, 4) and not _close(True, 1) and not _close(None, 0.0) and not _close({"p": 1.0}, {"q": 1.0})


def _limited(limit: int, *args: str) -> subprocess.CompletedProcess:
    """lmcor in a process that cannot write past `limit` bytes into any file (as a full disk refuses)."""
    import resource

    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "lmcor.cli", *args], capture_output=True, timeout=300,
                          preexec_fn=limit_files)


def test_a_write_that_fails_keeps_only_whole_records_and_counts_them(bundles, tmp_path):
    """-o on a disk that fills: the records kept are those written whole (a chunk that failed is left
    out, never torn), the count said is theirs, --resume answers the rest, and a run that wrote
    nothing leaves an earlier -o as it was."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in (GOOD + GOOD)[:10]))
    out = tmp_path / "out.jsonl"
    run = ["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), "--batch-size", "1", *DECODE]
    assert main(run) == 0
    whole = out.read_text(encoding="utf-8").splitlines(keepends=True)
    out.write_text('{"old": 1}\n')
    done = _limited(20, *run)
    assert done.returncode == 2, done.stderr.decode()
    assert "cannot write" in done.stderr.decode() and "record(s) kept" not in done.stderr.decode()
    assert out.read_text() == '{"old": 1}\n'
    first_chunk = len("".join(whole[:8]).encode())  # 8 batches of 1 line make a chunk
    done = _limited(first_chunk + 40, *run)
    assert done.returncode == 2, done.stderr.decode()
    assert f"8 record(s) kept in {out} (input lines up to 8)" in done.stderr.decode()
    assert out.read_text(encoding="utf-8") == "".join(whole[:8])
    assert main([*run, "--resume"]) == 0 and out.read_text(encoding="utf-8") == "".join(whole)
