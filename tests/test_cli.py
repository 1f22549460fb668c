"""`lmcor export` and `lmcor correct` end to end, as a user runs them."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import make_requests
from lmcor.export import export_corrector
from lmcor.runtime.bundle import shipped_bundle

from lmcor import Corrector, ExportError
from lmcor.cli import main

GOOD = make_requests(5, seed=3)
BAD_LINES = {
    2: ("this is not json", "not valid JSON"),
    4: ('{"id": "no-source", "candidates": ["a"]}', "missing field 'source'"),
    5: ('{"id": 9, "source": "", "candidates": ["a"]}', "'source' is empty"),
    7: ('{"source": "x", "candidates": []}', "empty list"),
    8: ('{"source": "x", "candidates": ["ok", 3]}', "candidates[1] must be a string"),
}


def _input_lines() -> list[str]:
    good = iter(GOOD)
    return [BAD_LINES[n][0] if n in BAD_LINES else json.dumps(next(good)) for n in range(1, 11)]


def test_correct_round_trip_keeps_order_and_reports_bad_lines(bundles, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(_input_lines()) + "\n")
    out = tmp_path / "out.jsonl"
    code = main(["correct", "--model", str(bundles["t5"]), str(source), "-o", str(out), "--batch-size", "2",
                 "--max-new-tokens", "6"])
    assert code == 1
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in records] == list(range(1, 11))
    expected = Corrector.load(bundles["t5"]).correct_batch(GOOD, max_new_tokens=6)
    good = [r for r in records if "error" not in r]
    assert [r["output"] for r in good] == [c.text for c in expected]
    assert [r["id"] for r in good] == [g["id"] for g in GOOD]
    assert all(r["truncated"] is False and r["output_tokens"] <= 6 for r in good)
    for number, (_, message) in BAD_LINES.items():
        assert message in records[number - 1]["error"]
    assert records[3]["id"] == "no-source" and records[4]["id"] == 9
    err = capsys.readouterr().err
    assert "line 4: missing field 'source'" in err and "5 line(s) could not be answered" in err


def test_correct_reads_stdin_and_writes_stdout(bundles):
    lines = "\n".join(json.dumps(r) for r in GOOD[:3]) + "\n"
    run = subprocess.run([sys.executable, "-m", "lmcor.cli", "correct", "--model", str(bundles["bart"]), "-",
                          "--num-beams", "2", "--max-new-tokens", "5", "-q"],
                         input=lines, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in run.stdout.splitlines()]
    expected = Corrector.load(bundles["bart"]).correct_batch(GOOD[:3], num_beams=2, max_new_tokens=5)
    assert [r["output"] for r in records] == [c.text for c in expected]
    assert run.stderr == ""


def test_export_cli_and_truncation(checkpoints, tmp_path, capsys):
    out = tmp_path / "small"
    assert main(["export", str(checkpoints["t5v11"]), str(out), "--max-input-tokens", "48"]) == 0
    assert "greedy tokens identical" in capsys.readouterr().err
    assert main(["export", str(checkpoints["t5v11"]), str(out)]) == 2  # refuses to overwrite
    assert "exists and is not empty" in capsys.readouterr().err
    long = {"source": "she go to school", "candidates": ["My brother went to the station every day. " * 6] * 3}
    source = tmp_path / "long.jsonl"
    source.write_text(json.dumps(long) + "\n")
    assert main(["correct", "--model", str(out), str(source), "-o", str(tmp_path / "o.jsonl"), "-q"]) == 0
    record = json.loads((tmp_path / "o.jsonl").read_text())
    assert record["truncated"] is True and record["input_tokens"] <= 48


def test_export_refuses_a_bundle_that_fails_validation(checkpoints, tmp_path):
    out = tmp_path / "refused"
    with pytest.raises(ExportError, match=r"max \|logit diff\| .* exceeds the tolerance"):
        export_corrector(checkpoints["t5"], out, atol=-1.0)  # no export can meet a negative tolerance
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".refused")]  # no staging left behind


def test_export_of_a_non_checkpoint_is_one_line(tmp_path, capsys):
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no config.json" in err[0]


def test_export_refuses_an_opset_out_of_range_and_a_checkpoint_without_tokenizer(checkpoints, tmp_path, capsys):
    for opset in ("5", "999"):
        assert main(["export", str(checkpoints["t5"]), str(tmp_path / "out"), "--opset", opset]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--opset must be from 14 to" in err[0] and err[0].endswith(f"got {opset}")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text('{"model_type": "t5"}')
    assert main(["export", str(bare), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no tokenizer files" in err[0]


@pytest.mark.parametrize("args, says", [
    (["candidates", "--model", "m", "-k", "65", "in.jsonl"], "-k: must be an integer from 1 to 64, got 65"),
    (["correct", "in.jsonl", "--max-wait-ms", "-1"], "--max-wait-ms: must be a number >= 0, got -1"),
    (["export", "a", "b", "--atol", "-1"], "--atol: must be a number >= 0, got -1"),
    # refused by the flag even where no line would reach a batch (an empty or all-bad file)
    (["correct", "in.jsonl", "--batch-size", "1025"], "--batch-size: must be an integer from 1 to 1024, got 1025"),
    (["classify", "in.jsonl", "--model", "m", "--batch-size", "5000"], "--batch-size: must be an integer from 1 to 1024"),
])
def test_options_out_of_range_are_refused_before_anything_runs(args, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and says in capsys.readouterr().err


def test_an_unforeseen_failure_is_one_line(bundles, tmp_path, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : something deep\nand more lines")

    monkeypatch.setattr(Corrector, "correct_batch", broken)
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({**GOOD[0], "target": GOOD[0]["source"]}) + "\n")
    assert main(["eval", str(data), "--model", str(bundles["t5"]), "-q", "--json", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lmcor: error: RuntimeError: [ONNXRuntimeError] : 2 : INVALID_ARGUMENT : something deep "
                   "(lmcor -v shows the traceback)"]


def test_a_gate_threshold_without_a_gate_is_refused(bundles, tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps(GOOD[0]) + "\n")
    assert main(["correct", str(data), "--model", str(bundles["t5"]), "--gate-threshold", "0.3", "-q"]) == 2
    assert "--gate-threshold needs --gate" in capsys.readouterr().err


def test_int8_export_is_smaller_and_reports_its_agreement(checkpoints, tmp_path, capsys):
    out = tmp_path / "int8"
    assert main(["export", str(checkpoints["t5v11"]), str(out), "--precision", "int8"]) == 0
    err = capsys.readouterr().err
    assert "t5 int8" in err and "greedy tokens identical on" in err and "pre-processing" not in err
    corrector = Corrector.load(out)
    assert corrector.manifest.precision == "int8"
    validation = corrector.manifest.validation
    assert validation["tolerance"] is None and 0.0 <= validation["greedy_token_agreement"] <= 1.0
    fp32 = tmp_path / "fp32"
    export_corrector(checkpoints["t5v11"], fp32)
    size = lambda root: sum(p.stat().st_size for p in root.iterdir())  # noqa: E731
    assert size(out) < size(fp32)
    assert corrector.correct_batch(GOOD[:2], max_new_tokens=4)[0].stats.output_tokens <= 4


def test_correct_stats_and_no_drafts(bundles, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in GOOD) + "\n")
    outputs = {}
    for flag in ([], ["--no-drafts"]):
        out = tmp_path / f"out{len(flag)}.jsonl"
        args = ["correct", "--model", str(bundles["t5v11"]), str(source), "-o", str(out), "-q", "--stats",
                "--max-new-tokens", "8", *flag]
        assert main(args) == 0
        outputs[bool(flag)] = [json.loads(line)["output"] for line in out.read_text().splitlines()]
        err = capsys.readouterr().err
        assert "5 requests corrected" in err and "decoder calls" in err and "drafted tokens" in err
        assert (", 0 drafted tokens" in err) == bool(flag)
    assert outputs[True] == outputs[False]


def test_a_field_is_named_as_its_flag_only_where_a_flag_set_it():
    from lmcor import cli

    _, serve = cli._parser("serve")
    message = "max_batch must be an integer from 1 to 1024, got 0"
    assert cli._said_as_flags(message, serve, ["serve", "--max-batch", "0"]) == (
        "--max-batch must be an integer from 1 to 1024, got 0")
    assert cli._said_as_flags(message, serve, ["serve", "--max-batch=0"]).startswith("--max-batch must")
    assert cli._said_as_flags(message, serve, ["serve", "--config", "c.json"]) == message  # from the file
    assert cli._said_as_flags("model must be a string", serve, ["serve", "--config", "c.json"]) == "model must be a string"
    _, correct = cli._parser("correct")
    message = "min_new_tokens must be an integer from 0 to 10 (max_new_tokens), got 50"  # a bound another flag set
    assert cli._said_as_flags(message, correct, ["correct", "-", "--min-new-tokens", "50", "--max-new-tokens", "10"]) == (
        "--min-new-tokens must be an integer from 0 to 10 (--max-new-tokens), got 50")


def test_serve_checks_its_bundles_before_it_listens(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "none"), "--port", "0"]) == 2
    out, err = capsys.readouterr()
    assert "listening" not in out and "no such bundle directory" in err
    assert main(["serve", "--generator", f"g={shipped_bundle('gate')}", "--port", "0"]) == 2
    assert "a 'classifier' bundle, not a causal-lm" in capsys.readouterr().err
    unlabelled = tmp_path / "gate"  # a classifier whose labels hold no "right": no gate
    shutil.copytree(shipped_bundle("gate"), unlabelled)
    manifest = json.loads((unlabelled / "lmcor.json").read_text())
    (unlabelled / "lmcor.json").write_text(json.dumps({**manifest, "labels": ["neg", "pos"]}))
    assert main(["serve", "--gate", str(unlabelled), "--port", "0"]) == 2
    assert "the gate must have a 'right' label (it has neg, pos)" in capsys.readouterr().err


@pytest.mark.parametrize("command, flags", [
    ("correct", "CORRECTION_FLAGS"), ("eval", "CORRECTION_FLAGS"), ("generate", "generate"),
    ("candidates", "candidates")])
def test_a_lines_option_fields_name_flags_the_command_has(command, flags):
    """The fields a line may not hold (they are the run's options) each name a flag of the command."""
    import importlib

    from lmcor.cli import _parser, options
    from lmcor.runtime.request import OPTION_FIELDS

    assert options.CORRECTION_FLAGS.keys() == OPTION_FIELDS
    table = getattr(options, flags, None) or importlib.import_module(f"lmcor.cli.{flags}").LINE_OPTIONS
    _, parser = _parser(command)
    known = {flag for action in parser._actions for flag in action.option_strings}
    assert set(table.values()) <= known

