"""`lmcor eval`: the four systems' table and JSON, and bad data lines named by number."""

import json

from conftest import make_requests
from lmcor.bench import quality

from lmcor.cli import main


def test_consensus_picks_the_candidate_closest_to_the_others():
    assert quality.consensus(["the cat sat.", "the cat sat!", "a dog ran", "the cat sat."]) == "the cat sat."
    assert quality.consensus(["only"]) == "only"


def test_the_oracle_takes_the_candidate_equal_to_the_target_among_those_chrf_ties():
    """chrF reads no spaces: "home ." and "home." tie on it, and an upper bound takes the exact one."""
    assert quality.oracle(["She goes home .", "She goes home."], "She goes home.") == "She goes home."
    assert quality.oracle(["She goes home .", "She go home ."], "She goes home.") == "She goes home ."


def test_exact_match_reads_the_words_not_their_spacing():
    """A candidate returned as written keeps its trailing space; a decoded output or the edit vote is
    spaced anew: the same sentence scores the same whichever system wrote it."""
    target = "She goes home."
    outputs = ["She goes home. ", "She goes\nhome.", "She goes home .", "she goes home."]
    assert quality.score(outputs, [target] * 4)["exact_match"] == 50.0
    assert quality.score([quality.oracle(["She goes home. "], target)], [target])["exact_match"] == 100.0


def test_eval_table_json_and_bad_lines(bundles, tmp_path, capsys):
    rows = [dict(r, target=r["candidates"][0]) for r in make_requests(6, seed=5)]
    lines = [json.dumps(r) for r in rows]
    lines.insert(2, '{"source": "x", "candidates": ["y"]}')  # no target
    lines.insert(4, "{broken")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "scores.json"
    code = main(["eval", "--model", str(bundles["t5"]), str(data), "--json", str(out), "--max-new-tokens", "8"])
    assert code == 1
    captured = capsys.readouterr()
    assert "line 3: missing field 'target'" in captured.err and "line 5: not valid JSON" in captured.err
    table = captured.out.strip().splitlines()
    assert table[0].split() == ["system", "exact", "match", "chrF"]
    assert [row.rsplit(None, 2)[0] for row in table[1:]] == list(quality.SYSTEMS)
    report = json.loads(out.read_text())
    assert report["items"] == 6 and [e["line"] for e in report["errors"]] == [3, 5]
    assert report["options"]["max_new_tokens"] == 8 and report["options"]["fallback_below"] is None  # the bundle's
    first = report["systems"]["first candidate"]
    assert first["exact_match"] == 100.0 and first["chrf"] == 100.0  # the targets are the first candidates
    assert report["systems"]["oracle candidate"]["chrf"] == 100.0
    for scores in report["systems"].values():
        assert 0.0 <= scores["exact_match"] <= 100.0 and 0.0 <= scores["chrf"] <= 100.0


def test_eval_checks_json_before_it_runs_and_names_the_file_when_nothing_can_be_scored(bundles, tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"source": "a " * 2000, "candidates": ["b"], "target": "c"}) + "\n")
    assert main(["eval", "--model", str(bundles["t5"]), str(data), "--json", "/proc/scores.json", "-q"]) == 2
    err = capsys.readouterr().err
    assert "--json /proc/scores.json: cannot write there" in err and "left out of the scores" not in err
    out = tmp_path / "scores.json"
    assert main(["eval", "--model", str(bundles["t5"]), str(data), "--json", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"{data}: line 1: " in err and f"{data}: the corrector could take none of its 1 usable lines" in err
    assert not out.exists()


def test_eval_json_paths_that_would_lose_the_table_or_the_data_are_refused(bundles, tmp_path, capsys):
    import subprocess
    import sys

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"source": "a b", "candidates": ["a b"], "target": "a b"}) + "\n")
    for json_path, said in (("-", "--json -: standard output gets the table"),
                            (f"{tmp_path}/scores.json/", "not a directory")):
        assert main(["eval", "--model", str(bundles["t5"]), str(data), "--json", json_path, "-q"]) == 2
        assert said in capsys.readouterr().err
    with open(data, "rb") as stdin:  # the data read from stdin, the scores about to replace it
        run = subprocess.run([sys.executable, "-m", "lmcor.cli", "eval", "--model", str(bundles["t5"]), "-",
                              "--json", str(data), "-q"], stdin=stdin, capture_output=True, timeout=300)
    assert run.returncode == 2 and b"is what standard input reads" in run.stderr
    assert json.loads(data.read_text())["target"] == "a b"


def test_eval_json_through_a_link_to_a_file_not_written_yet(bundles, tmp_path, capsys):
    """The scores go to the file the link names, and the link stays: no empty file is left beside it."""
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"source": "a b", "candidates": ["a b"], "target": "a b"}) + "\n")
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "report.json")
    assert main(["eval", "--model", str(bundles["t5"]), str(data), "--json", str(link), "-q"]) == 0
    assert link.is_symlink() and json.loads((tmp_path / "report.json").read_text())["items"] == 1
    nowhere = tmp_path / "nowhere.json"
    nowhere.symlink_to(tmp_path / "missing-folder" / "report.json")
    assert main(["eval", "--model", str(bundles["t5"]), str(data), "--json", str(nowhere), "-q"]) == 2
    assert nowhere.is_symlink() and not (tmp_path / "missing-folder").exists()
    (tmp_path / "a").symlink_to(tmp_path / "b")  # a loop: said as a path that cannot be written
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert main(["eval", "--model", str(bundles["t5"]), str(data), "--json", str(tmp_path / "a"), "-q"]) == 2
    assert f"--json {tmp_path / 'a'}: cannot write there" in capsys.readouterr().err


def test_the_edit_vote_keeps_the_sources_line_breaks():
    """As the corrector's fallback writes it: a source's line breaks and tabs between the words it
    keeps (the vote rejoins words with spaces), so a line answered as it was scores as it is."""
    from lmcor.runtime.corrector import Corrector

    text = "It is fine.\nReally fine."
    items = [quality.Item(1, text, (text, text), text)]
    report = quality.evaluate(Corrector.load(), items)
    assert report["systems"]["edit vote"]["exact_match"] == 100.0


def test_eval_json_to_a_fifo_and_the_scores_kept_when_the_tables_reader_leaves(bundles, tmp_path):
    """A FIFO is written in place at the end (probed, its reader saw the end of the file at once, and the
    last write waited for ever); the scores are written before the table, so a closed stdout keeps them."""
    import os
    import subprocess
    import sys
    import threading

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"source": "a b", "candidates": ["a b"], "target": "a b"}) + "\n")
    fifo = tmp_path / "scores.fifo"
    os.mkfifo(fifo)
    read = []
    reader = threading.Thread(target=lambda: read.append(fifo.read_text()), daemon=True)
    reader.start()
    command = [sys.executable, "-m", "lmcor.cli", "eval", "--model", str(bundles["t5"]), str(data), "-q", "--json"]
    assert subprocess.run([*command, str(fifo)], capture_output=True, timeout=120).returncode == 0
    reader.join(timeout=60)
    assert json.loads(read[0])["items"] == 1
    kept = tmp_path / "kept.json"
    with open("/dev/full", "w") as full:  # the table cannot be written
        done = subprocess.run([*command, str(kept)], stdout=full, stderr=subprocess.PIPE, timeout=300)
    assert done.returncode == 2 and json.loads(kept.read_text())["items"] == 1
    assert f"standard output: cannot write the table (No space left on device); the scores are in {kept}" \
        in done.stderr.decode()
