"""`lmcor train-corrector` end to end on a tiny LLM and a tiny corrector: candidates cached and
resumed, training, export, calibration and the report, in seconds."""

import json
import re
import shutil

import pytest
import torch
from conftest import english_sentences
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lmcor import Corrector
from lmcor.cli import main

PROMPT = "Fix: {source}\n="  # the tiny LLM's 128 positions hold no few-shot prompt


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from lmcor.export.causal_lm import export_causal_lm

    texts = english_sentences(200, seed=8)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2))
    checkpoint = tmp_path_factory.mktemp("llm")
    model.save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    bundle = tmp_path_factory.mktemp("llm-bundle") / "bundle"
    export_causal_lm(checkpoint, bundle, max_output_tokens=12)
    return bundle


@pytest.fixture
def pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    lines = [json.dumps({"source": s.lower().replace(" the ", " teh "), "target": s})
             for s in english_sentences(80, seed=9)]
    path.write_text("\n".join(lines[:40] + ["not json", '{"source": "x"}'] + lines[40:]) + "\n")
    return path


def _size(extra):
    return [] if "--init" in extra or "--size" in extra else ["--size", "tiny"]  # --init's checkpoint has its own


def _train(pairs, out, llm, *extra):
    return main(["train-corrector", str(pairs), "--out", str(out), "--llm", str(llm), "--prompt", PROMPT, "-k", "2",
                 *_size(extra), "--minutes", "0.05", "--held-out", "0.3", "-q", *extra])


def _with_candidates(pairs, path, count=80):
    """The first `count` good pairs, each with candidates of its own: its target and its source."""
    rows = [json.loads(line) for line in pairs.read_text().splitlines() if line.startswith('{"source": "') and
            "target" in line][:count]
    path.write_text("".join(json.dumps({**r, "candidates": [r["target"], r["source"]]}) + "\n" for r in rows))
    return path


def _train_own(pairs, out, *extra):
    return main(["train-corrector", str(pairs), "--out", str(out), *_size(extra), "--minutes", "0.05",
                 "--held-out", "0.3", "-q", *extra])


def test_trains_a_corrector_on_the_llms_candidates_and_resumes(llm, pairs, tmp_path, capsys):
    out = tmp_path / "run"
    assert _train(pairs, out, llm) == 0
    table = capsys.readouterr()
    assert "line 41: not valid JSON" in table.err and "line 42: field 'target'" in table.err
    assert "%|" not in table.err  # -q: no bar of any stage (the fallback's calibration drew one)
    for system in ("source", "first candidate", "consensus candidate", "oracle candidate", "corrector alone", "corrector"):
        assert system in table.out
    report = json.loads((out / "report.json").read_text())
    assert report["items"] == len((out / "test.jsonl").read_text().splitlines())
    cached = (out / "candidates.jsonl").read_text().splitlines()
    assert len(cached) == 80 and all(len(json.loads(line)["candidates"]) == 2 for line in cached)
    corrector = Corrector.load(out / "bundle")
    assert corrector.manifest.fallback_below is not None
    assert isinstance(corrector.correct("teh cat went to school.", ["The cat went to school."]), str)

    # An interrupted candidates stage (half written, a torn last line) continues with the same candidates;
    # a record that is not well-formed is written again, and the records after it are kept.
    whole = (out / "candidates.jsonl").read_text()
    broken = [json.dumps({"line": json.loads(cached[40])["line"]}), json.dumps({**json.loads(cached[41]), "candidates": 5})]
    (out / "candidates.jsonl").write_text("\n".join(cached[:10] + broken + cached[10:30]) + '\n{"line": 3')
    assert _train(pairs, out, llm) == 0
    again = (out / "candidates.jsonl").read_text().splitlines()
    assert again[:22] == cached[:10] + broken + cached[10:20]
    assert sorted(line for line in again if line not in broken) == sorted(whole.splitlines())


def test_pairs_with_their_own_candidates_need_no_llm(pairs, tmp_path, capfd):
    out = tmp_path / "own"
    assert _train_own(_with_candidates(pairs, tmp_path / "with.jsonl"), out, "--synthetic", "0.5") == 0
    assert (out / "bundle" / "lmcor.json").is_file() and not (out / "candidates.jsonl").exists()
    assert capfd.readouterr().out.startswith("system ")  # with -q, stdout holds the report alone (no tokenizer progress)
    assert main(["train-corrector", str(pairs), "--out", str(tmp_path / "none"), "--size", "tiny", "-q"]) == 2
    said = capfd.readouterr().err.splitlines()  # the first bad lines, then a count: not one line per line of the file
    assert len([line for line in said if "field 'candidates' must be a non-empty list" in line]) == 10
    assert f"lmcor: {pairs}: 72 more bad lines skipped (82 in all)" in said


def test_cached_candidates_follow_the_pairs_and_the_options(llm, pairs, tmp_path):
    """A source's cached candidates are reused wherever it is, for the same LLM, prompt, k and
    temperature: a grown pairs file, or k changed and changed back, generate only what is missing."""
    out = tmp_path / "run"
    assert _train(pairs, out, llm) == 0

    def records():
        return [json.loads(line) for line in (out / "candidates.jsonl").read_text().splitlines()]

    first = records()
    lines = pairs.read_text().splitlines()
    pairs.write_text("\n".join([json.dumps({"source": "a new first line", "target": "A new first line."}),
                                *lines, lines[0]]) + "\n")  # a new source first, and a source twice
    assert _train(pairs, out, llm) == 0
    assert records()[: len(first)] == first and [r["source"] for r in records()[len(first):]] == ["a new first line"]
    sources = {json.loads(text)["source"] for text in pairs.read_text().splitlines()
               if text.startswith('{"source"') and "target" in text}
    # Other candidates need a restart (the corrector learned the others); what was made stays cached.
    assert _train(pairs, out, llm, "-k", "3", "--restart") == 0
    assert all(len(json.loads(line)["candidates"]) == 3 for line in (out / "test.jsonl").read_text().splitlines())
    before = len(records())
    assert before == len(first) + 1 + len(sources)
    assert _train(pairs, out, llm, "--restart") == 0 and len(records()) == before  # k back to 2: all cached
    # The same LLM exported again with other settings (its files unchanged): its candidates are its own.
    again = tmp_path / "llm-again"
    shutil.copytree(llm, again)
    manifest = json.loads((again / "lmcor.json").read_text())
    (again / "lmcor.json").write_text(json.dumps({**manifest, "max_output_tokens": 6}))
    assert _train(pairs, out, again, "-k", "3", "--restart") == 0
    assert len(records()) == before + len(sources)


def test_a_run_on_other_candidates_is_refused_and_a_finished_run_is_not_done_again(llm, pairs, tmp_path, monkeypatch,
                                                                                   capsys, caplog):
    """A corrector trained on one LLM's candidates does not go on as another's, nor as one trained on
    other options; a run with nothing left to train returns its report without exporting, calibrating
    or scoring again, and more --minutes train on."""
    import lmcor.export
    from lmcor.recipes import fallback

    out = tmp_path / "run"
    assert _train(pairs, out, llm) == 0
    report = json.loads((out / "report.json").read_text())
    first = capsys.readouterr().out
    other = tmp_path / "other-llm"
    shutil.copytree(llm, other)
    manifest = json.loads((other / "lmcor.json").read_text())
    (other / "lmcor.json").write_text(json.dumps({**manifest, "max_output_tokens": 6}))
    assert _train(pairs, out, other) == 2
    assert "a run trained on an LLM's candidates made otherwise" in capsys.readouterr().err
    for option in (("-k", "3"), ("--temperature", "0.9")):
        assert _train(pairs, out, llm, *option) == 2 and "made otherwise" in capsys.readouterr().err, option
    assert _train_own(_with_candidates(pairs, tmp_path / "own.jsonl"), out) == 2
    assert "and this one on the pairs file's own" in capsys.readouterr().err

    def not_again(*args, **kwargs):
        raise AssertionError("a finished stage done again")

    monkeypatch.setattr(lmcor.export, "export_corrector", not_again)
    monkeypatch.setattr(fallback, "calibrate_bundle", not_again)
    assert _train(pairs, out, llm) == 0
    assert capsys.readouterr().out == first and json.loads((out / "report.json").read_text()) == report
    assert "exported and reported" in caplog.text
    assert _train(pairs, out, llm, "--minutes", "0.04") == 0  # fewer minutes: nothing to train either
    assert _train(pairs, out, llm, "--minutes", "0.08") == 2  # more: trained on, and exported again
    assert "a finished stage done again" in capsys.readouterr().err


def test_restart_clears_the_run_and_another_model_needs_it(llm, pairs, tmp_path, checkpoints, capsys):
    out = tmp_path / "run"
    assert _train(pairs, out, llm) == 0
    # Another split would test on pairs the run trained on.
    assert _train(pairs, out, llm, "--held-out", "0.4") == 2
    assert "a run split with --held-out 0.3" in capsys.readouterr().err
    (out / "best.pt").write_bytes(b"not a checkpoint")  # a restart must not read the old run's files
    assert _train(pairs, out, llm, "--restart") == 0
    assert _train(pairs, out, llm, "--init", str(checkpoints["t5"])) == 2
    assert "a run of another model" in capsys.readouterr().err
    assert _train(pairs, out, llm, "--init", str(checkpoints["bart"]), "--restart") == 0  # BART's decoder inputs too
    assert _train(pairs, out, llm, "--init", str(tmp_path / "nowhere")) == 2
    assert "not a Hugging Face checkpoint folder" in capsys.readouterr().err


def test_bad_inputs_are_refused_before_out_is_touched(pairs, tmp_path, capsys):
    """Checked first, --out is neither made nor cleared: a missing or empty pairs file, a bad --llm, too
    few pairs, an --out that is a file, and a --restart of a folder that train-corrector did not write."""
    own = _with_candidates(pairs, tmp_path / "own.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    assert _train_own(tmp_path / "empty.jsonl", tmp_path / "a") == 2
    assert _train(pairs, tmp_path / "b", tmp_path / "no-llm") == 2
    assert f"--llm {tmp_path / 'no-llm'}: no such bundle directory" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    (tmp_path / "one.jsonl").write_text(own.read_text().splitlines()[0] + "\n")
    assert _train_own(tmp_path / "one.jsonl", tmp_path / "c") == 2
    assert "1 pair is too few: training, dev and test need at least 3 pairs" in capsys.readouterr().err
    assert _train_own(own, own) == 2
    assert f"--out {own}: not a folder" in capsys.readouterr().err

    other = tmp_path / "other"  # another tool's folder, with some of the same names
    (other / "hf").mkdir(parents=True)
    (other / "report.json").write_text("{}")
    assert _train_own(tmp_path / "missing.jsonl", other, "--restart") == 2
    assert _train_own(own, other, "--restart") == 2
    assert "not a train-corrector folder" in capsys.readouterr().err
    assert _train_own(own, other) == 2  # nor trained into, over them
    assert "not a train-corrector folder" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["hf", "report.json"]
    mine = tmp_path / "mine"  # a dev file of the user's own is not rewritten either
    mine.mkdir()
    (mine / "dev.jsonl").write_text('{"my": "data"}\n')
    assert _train_own(own, mine) == 2 and "its dev.jsonl stay" in capsys.readouterr().err
    assert (mine / "dev.jsonl").read_text() == '{"my": "data"}\n'
    model = tmp_path / "model"  # nor is any other folder with files in it (a model's, the working folder)
    model.mkdir()
    (model / "lmcor.json").write_text("{}")
    assert _train_own(own, model) == 2 and "is not empty, so its lmcor.json stay" in capsys.readouterr().err
    assert [p.name for p in model.iterdir()] == ["lmcor.json"]
    assert _train_own(own, tmp_path / "d", "-k", "3") == 2  # an option of the LLM's, without one
    assert "-k needs --llm" in capsys.readouterr().err and not (tmp_path / "d").exists()


def test_the_llm_options_and_the_init_are_checked_before_a_restart_clears(llm, pairs, tmp_path, gpt2_checkpoint, capsys):
    out = tmp_path / "run"
    assert _train(pairs, out, llm) == 0
    kept = sorted(p.name for p in out.iterdir())
    assert _train(pairs, out, llm, "--restart", "--temperature", "-1") == 2
    assert "--temperature must be 0 (greedy) or between" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # by the flag itself
        _train(pairs, out, llm, "--restart", "--llm-batch-size", "100000")
    assert exit_.value.code == 2 and "--llm-batch-size: must be an integer from 1 to 1024" in capsys.readouterr().err
    assert _train(pairs, out, llm, "--restart", "--max-new-tokens", "10000") == 2
    assert "--max-new-tokens must be an integer from 1 to 12" in capsys.readouterr().err
    assert _train(pairs, out, llm, "--restart", "--init", str(gpt2_checkpoint)) == 2
    assert "a gpt2 checkpoint, not a seq2seq one" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == kept


def test_a_run_that_takes_no_step_exports_nothing_and_an_interrupted_export_continues(pairs, tmp_path, monkeypatch,
                                                                                        caplog, capsys):
    from lmcor.recipes import fallback

    own, out = _with_candidates(pairs, tmp_path / "own.jsonl", 30), tmp_path / "run"  # a small dev: fast evaluations
    assert _train_own(own, out, "--minutes", "1e-9") == 2
    assert not (out / "bundle").exists() and not (out / "hf").exists()  # nor scored on dev
    assert not (out / "checkpoint.pt").exists()  # no run that trained: another split or size is taken
    capsys.readouterr()
    assert _train_own(own, out, "--minutes", "1e-9", "--held-out", "0.2", "--size", "small") == 2
    assert "ran out before the first training step" in capsys.readouterr().err
    assert not (out / "checkpoint.pt").exists()

    calibrate = fallback.calibrate_bundle

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fallback, "calibrate_bundle", interrupted)
    assert _train_own(own, out) == 130  # more minutes: the run continues from its checkpoint
    assert "interrupted during the fallback calibration" in caplog.text and "run the same command again" in caplog.text
    assert not (out / "report.json").exists()
    monkeypatch.setattr(fallback, "calibrate_bundle", calibrate)
    assert _train_own(own, out) == 0
    assert Corrector.load(out / "bundle").manifest.fallback_below is not None and (out / "report.json").is_file()


def test_cached_candidates_keep_the_good_records(tmp_path):
    """Candidates are kept by source and what made them; a record that is not well-formed is stale
    (its source is written again), whatever its place; a torn last line is cut off."""
    from lmcor.recipes.corrector import _cached_candidates

    def record(source, **changed):
        return {"line": 1, "source": source, "made_by": "m", "candidates": ["a"], **changed}

    lines = [record("s1"), record("s2"), record("s2", candidates=None), record("s3", candidates=5),
             record("s4", made_by=None), record(5), [1], record("s5"), record("s5", made_by="other", candidates=["b"])]
    path = tmp_path / "candidates.jsonl"
    text = ("".join(json.dumps(line) + "\n" for line in lines) + "not json\n" + "[" * 100_000 + "]" * 100_000 + "\n"
            + json.dumps(record("s6")) + "\n")
    path.write_text(text + '{"line": 7, "sou')
    assert _cached_candidates(path) == {("s1", "m"): ("a",), ("s5", "m"): ("a",), ("s5", "other"): ("b",),
                                        ("s6", "m"): ("a",)}
    assert path.read_text() == text


def test_pairs_that_share_a_source_or_a_target_are_held_out_together():
    """Several noisy sources per clean target (a common way to make correction data), and several
    targets for one source: no target and no source is in two parts (split by source alone, 305 of a
    test part's 307 targets were also trained on)."""
    from lmcor.recipes.corrector import Pair, split

    targets = english_sentences(600, seed=31)
    pairs = [Pair(0, f"{noise} {target}", target, ()) for target in targets for noise in ("um", "uh", "er")]
    pairs += [Pair(0, targets[0], "ANOTHER " + targets[0], ()), Pair(0, " " + targets[1].upper(), "x", ())]
    parts = split(pairs, 0.2)
    for key in ("source", "target"):
        seen = [{" ".join(getattr(p, key).split()).casefold() for p in parts[name]}
                for name in ("train", "dev", "test")]
        assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2]), key
    assert parts["dev"] and parts["test"] and sum(map(len, parts.values())) == len(pairs)
    # the file's order moves no pair between parts (it moved 134 of 800 where each group went by its first line)
    parts_again = split(pairs[::-1], 0.2)
    assert all(set(parts_again[name]) == set(parts[name]) for name in parts)


def test_a_run_split_by_an_earlier_rule_is_not_resumed(tmp_path):
    """Groups once went by their first line: continuing such a checkpoint under today's split would
    test on pairs it trained on."""
    from lmcor.recipes.corrector import MARK, SPLIT_RULE, Job, _check_out
    from lmcor.runtime.errors import InputError

    out = tmp_path / "run"
    out.mkdir()
    record = {"held_out": 0.1, "model": {}, "candidates": None}
    (out / MARK).write_text(json.dumps(record) + "\n")
    (out / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(InputError, match="split by an earlier lmcor's rule"):
        _check_out(Job(pairs=tmp_path / "pairs.jsonl", out=out), {}, None)
    (out / MARK).write_text(json.dumps({**record, "split": SPLIT_RULE}) + "\n")
    assert _check_out(Job(pairs=tmp_path / "pairs.jsonl", out=out), {}, None)["split"] == SPLIT_RULE


def test_a_split_written_earlier_seeds_the_cache_as_this_runs(tmp_path):
    """`recipes.llm_splits` starts a fresh machine's cache from the shipped split: its candidates are
    reused (records without what made them were passed over, and every source generated again)."""
    from lmcor.recipes.corrector import _cached_candidates
    from lmcor.recipes.llm_splits import _seed_cache

    split = tmp_path / "llm-dev.jsonl"
    split.write_text("".join(json.dumps({"id": n, "source": f"s{n}", "candidates": ["a", "b"], "target": "t"}) + "\n"
                             for n in range(3)))
    _seed_cache(tmp_path / "candidates.jsonl", split, "run")
    assert _cached_candidates(tmp_path / "candidates.jsonl") == {(f"s{n}", "run"): ("a", "b") for n in range(3)}


def test_a_torn_split_seeds_the_cache_with_its_whole_lines(tmp_path, caplog):
    """A blank, torn or foreign line of an earlier split is said and left to the LLM: the lines after
    it are reused (a traceback left a part-written cache, and the next run reused nothing)."""
    from lmcor.recipes.corrector import _cached_candidates
    from lmcor.recipes.llm_splits import _seed_cache

    lines = [json.dumps({"id": n, "source": f"s{n}", "candidates": ["a"], "target": "t"}) for n in range(4)]
    split = tmp_path / "llm-dev.jsonl"
    split.write_text(lines[0] + "\n\n" + lines[1] + "\n" + '{"id": 9}\n' + lines[2] + "\n" + lines[3][:20])
    with caplog.at_level("WARNING", logger="lmcor.recipes"):
        _seed_cache(tmp_path / "candidates.jsonl", split, "run")
    assert _cached_candidates(tmp_path / "candidates.jsonl") == {(f"s{n}", "run"): ("a",) for n in range(3)}
    assert f"{split}: 3 lines not reused (line 2: " in caplog.text
    assert {p.name for p in tmp_path.iterdir()} == {"candidates.jsonl", "llm-dev.jsonl"}  # no part-written file


def test_the_llm_splits_recipe_refuses_no_training_sentences():
    from lmcor.recipes.llm_splits import main

    for count in ("0", "-1"):  # -1 took every sentence but the last: hours of LLM time
        with pytest.raises(SystemExit):
            main(["--llm", "nowhere", "--train", count])


def test_an_interrupted_training_keeps_its_step(tmp_path):
    """Ctrl-C during training saves the checkpoint of the step reached; the same command continues.
    A model handed over in bf16 (transformers 5 loads a checkpoint in the dtype it was saved in)
    trains in fp32: AdamW's small updates vanish in bf16 weights."""
    from lmcor.recipes import train as recipe
    from lmcor.recipes.corrector import SIZES
    from lmcor.recipes.noise import Example

    settings = recipe.Settings(**SIZES["tiny"])
    sentences = english_sentences(60, seed=10)
    tokenizer_dir = tmp_path / "tokenizer"
    recipe.train_tokenizer(sentences, settings.vocab_size).save_pretrained(tokenizer_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    model = recipe.build_model(settings, len(tokenizer)).to(torch.bfloat16)

    def examples(step):
        for n, s in enumerate(sentences * 100):
            if n == 2000:  # past the first batches (the batcher reads ahead)
                raise KeyboardInterrupt
            yield Example(s.lower(), [s], s)

    with pytest.raises(KeyboardInterrupt):
        recipe.fit(tmp_path, 5, settings, model=model, tokenizer=tokenizer, examples=examples, dev=[], copy_warmup=False)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["state"]["step"] > 0
    assert {value.dtype for value in saved["model"].values()} == {torch.float32}


def test_a_torn_best_checkpoint_keeps_the_last_weights_and_more_minutes_warm_up_again(tmp_path, caplog):
    """best.pt is written whole or not at all; one torn by an earlier lmcor is said and passed over.
    A finished run given more --minutes warms its learning rate up again instead of jumping from the
    end of its decay back to the peak."""
    import dataclasses
    import logging

    from lmcor.recipes import train as recipe
    from lmcor.recipes.corrector import SIZES
    from lmcor.recipes.noise import Example

    settings = dataclasses.replace(recipe.Settings(**SIZES["tiny"]), warmup_steps=20)
    sentences = english_sentences(40, seed=11)
    tokenizer_dir = tmp_path / "tokenizer"
    recipe.train_tokenizer(sentences, settings.vocab_size).save_pretrained(tokenizer_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    dev = [Example(s.lower(), [s], s) for s in sentences[:4]]

    def examples(step):
        while True:
            yield from (Example(s.lower(), [s], s) for s in sentences)

    def fit(minutes, resume, eval_minutes):
        return recipe.fit(tmp_path / "run", minutes, settings, model=recipe.build_model(settings, len(tokenizer)),
                          tokenizer=tokenizer, examples=examples, dev=dev, copy_warmup=False, resume=resume,
                          eval_minutes=eval_minutes, show_progress=False)

    fit(0.05, False, 0.001)
    assert (tmp_path / "run" / "best.pt").is_file() and not list((tmp_path / "run").glob("*.tmp"))
    (tmp_path / "run" / "best.pt").write_bytes((tmp_path / "run" / "best.pt").read_bytes()[:100])
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["state"]
    more = (state["elapsed"] + 3) / 60  # some steps more, however long the first run took; no scoring to rewrite best.pt
    with caplog.at_level(logging.INFO, logger="lmcor"):
        assert (fit(more, True, 1000.0) / "config.json").is_file()  # the torn file is read at the end
    said = caplog.text
    assert "best.pt cannot be read" in said and "the learning rate warms up again" in said
    after = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["state"]
    assert after["warm_from"] == state["step"] < after["step"] and after["budget"] == pytest.approx(more * 60)


def test_dev_scores_come_from_outputs_the_bundle_would_write(tmp_path):
    """A checkpoint's generation settings that lmcor does not apply (min_length, repetition_penalty)
    take no part in choosing the weights and the n-gram ban; the model's own settings are kept."""
    from lmcor.recipes import train as recipe
    from lmcor.recipes.corrector import SIZES
    from lmcor.recipes.noise import Example

    settings = recipe.Settings(**SIZES["tiny"])
    sentences = english_sentences(12, seed=12)
    recipe.train_tokenizer(sentences, settings.vocab_size).save_pretrained(tmp_path / "tokenizer")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "tokenizer")
    torch.manual_seed(0)
    model = recipe.build_model(settings, len(tokenizer))
    dev = [Example(s.lower(), [s, s.upper()], s) for s in sentences]
    plain = recipe.evaluate(model, tokenizer, dev, no_repeat_ngram_size=3)
    model.generation_config.update(min_length=40, repetition_penalty=3.0)
    seen = []  # the bar of the scoring after training
    assert recipe.evaluate(model, tokenizer, dev, no_repeat_ngram_size=3, batch_size=5, progress=seen.append) == plain
    assert model.generation_config.min_length == 40 and model.generation_config.no_repeat_ngram_size != 3
    assert seen == [5, 5, 2]


def test_synthetic_examples_look_like_the_pairs():
    """As many candidates as the pair has, and a target whose white space the noise would change keeps
    its own candidates."""
    import itertools

    from lmcor.recipes.corrector import Pair, examples

    pairs = [Pair(1, "she go home", "She goes home.", ("She goes home.", "She go home.")),
             Pair(2, "line one\nline two", "Line one.\nLine two.", ("Line one.\nLine two.", "line one\nline two"))]
    drawn = list(itertools.islice(examples(pairs, 1.0, seed=3), 200))
    assert {len(e.candidates) for e in drawn} == {2}
    assert all(e.candidates == list(pairs[1].candidates) for e in drawn if e.target == pairs[1].target)
    assert {e.target for e in drawn} == {p.target for p in pairs}


def test_a_tokenizer_for_a_script_of_many_characters_grows_to_hold_them():
    from lmcor.recipes.train import train_tokenizer

    chars = [chr(0x4E00 + i) for i in range(900)]
    sentences = ["".join(chars[(7 * n + 13 * i) % 900] for i in range(20)) for n in range(400)]
    tokenizer = train_tokenizer(sentences, 600)
    assert len(tokenizer) > 900 and tokenizer.decode(tokenizer.encode(sentences[5]), skip_special_tokens=True) == sentences[5]


def test_training_inputs_are_cut_as_the_runtime_cuts_them():
    """A long example's candidates are cut evenly to what the corrector reads; a source longer than
    that is left out; a short one is encoded as before."""
    from lmcor.recipes import train as recipe
    from lmcor.recipes.noise import Example
    from lmcor.runtime.bundle import shipped_bundle
    from lmcor.runtime.template import render

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(shipped_bundle("default") / "tokenizer.json"))
    short = Example("She go to school every days.", ["She goes to school every day.", "She go to school."],
                    "She goes to school every day.")
    long, too_long = Example("a " * 100, ["b " * 300] * 5, "a"), Example("a " * 900, ["b"], "a")
    pairs = recipe._text_pairs(tokenizer, [short, long, too_long], copy=False)
    assert len(pairs) == 2 and len(pairs[1][0]) <= recipe.MAX_INPUT_TOKENS
    assert pairs[0][0] == tokenizer.backend_tokenizer.encode(render(recipe.TEMPLATE, short.source, short.candidates).text).ids


def test_sigterm_during_training_keeps_the_step_reached(pairs, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    own, out = _with_candidates(pairs, tmp_path / "own.jsonl", 30), tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "lmcor.cli", "train-corrector", str(own), "--out", str(out),
                                "--size", "tiny", "--minutes", "5", "--held-out", "0.3", "-q"],
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 240
    while not (out / "train_log.jsonl").exists():  # written every 50 steps: training is under way
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.poll() else ""
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert "interrupted at step" in err and (out / "checkpoint.pt").is_file()
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert records and all(r["steps_per_s"] > 0 and 0 <= r["data_share"] < 1 for r in records)  # what bounds the speed


def test_an_init_lmcor_cannot_export_or_whose_positions_are_short_is_refused_before_training(pairs, tmp_path,
                                                                                             checkpoints, capsys):
    own = _with_candidates(pairs, tmp_path / "own.jsonl", 30)
    for model_type, extra, said in (("marian", {}, "a marian checkpoint, a seq2seq type lmcor does not export"),
                                    ("bart", {"max_position_embeddings": 128}, "its 128 positions hold no training input")):
        init = tmp_path / model_type
        shutil.copytree(checkpoints["bart"], init)
        config = json.loads((init / "config.json").read_text())
        (init / "config.json").write_text(json.dumps({**config, "model_type": model_type, **extra}))
        assert _train_own(own, tmp_path / f"run-{model_type}", "--init", str(init)) == 2
        assert said in capsys.readouterr().err
        assert not (tmp_path / f"run-{model_type}").exists()


def test_candidates_cut_short_on_a_first_run_are_continued(llm, pairs, tmp_path, monkeypatch):
    """The folder is marked as this command's before the LLM writes: a signal then leaves a folder the
    same command continues, not one it refuses as another tool's."""
    from lmcor.recipes import corrector

    out = tmp_path / "run"
    written = corrector.llm_candidates

    def cut_short(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(corrector, "llm_candidates", cut_short)
    assert _train(pairs, out, llm) == 130
    monkeypatch.setattr(corrector, "llm_candidates", written)
    assert _train(pairs, out, llm) == 0


def test_pairs_none_of_which_fits_are_refused_and_another_pairs_file_is_said(pairs, tmp_path, capsys, caplog):
    own = _with_candidates(pairs, tmp_path / "own.jsonl", 30)
    rows = [json.loads(line) for line in own.read_text().splitlines()]
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({**r, "source": (r["source"] + " ") * 80}) + "\n" for r in rows))
    assert _train_own(long, tmp_path / "run-long", "--minutes", "0.5") == 2  # at once, not after the budget
    assert "no train pair fits the corrector's 512 input tokens" in capsys.readouterr().err
    out = tmp_path / "run"
    assert _train_own(own, out) == 0
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    assert _train_own(other, out) == 0
    assert "checkpoint was trained with another pairs file" in caplog.text and "--restart trains afresh" in caplog.text
    report = (out / "report.json").read_text()
    # a run on pairs none of which fits fails before training: the checkpoint and its report stay the
    # other file's, and are not returned as this one's when it runs again
    caplog.clear()
    for _ in range(2):
        assert _train_own(long, out) == 2 and "no train pair fits" in capsys.readouterr().err
    assert "exported and reported" not in caplog.text and (out / "report.json").read_text() == report
    caplog.clear()
    assert _train_own(other, out) == 0  # the file it trained on: its report, nothing said of another file
    assert "exported and reported" in caplog.text and "another pairs file" not in caplog.text
    # what else it read: another --synthetic share or --max-line-bytes is no finished run
    for flags, said in ((["--synthetic", "0.5"], "--synthetic 0.0"), (["--max-line-bytes", "100000"], "--max-line-bytes")):
        caplog.clear()
        assert _train_own(other, out, *flags) == 0
        assert "exported and reported" not in caplog.text and said in caplog.text, flags


def test_odd_pairs_and_synthetic_noise_that_empties_a_source_still_train(pairs, tmp_path, capsys):
    """A BOM-only first line is blank, a line over --max-line-bytes is reported and skipped, and
    synthetic noise over a one-word target (an article it may drop, leaving no source) costs that
    example only."""
    own = _with_candidates(pairs, tmp_path / "own.jsonl", 60)
    articles = [json.dumps({"source": s, "target": t, "candidates": [t, s]})
                for s, t in (("teh", "the"), ("Teh", "The"), ("thee", "the"), ("an", "a"), ("Ан", "An"), ("aa", "A"))]
    huge = json.dumps({"source": "a b c " * 200, "target": "x", "candidates": ["y"]})
    odd = tmp_path / "odd.jsonl"
    odd.write_text("\ufeff\n" + "\n".join(articles * 4 + [huge]) + "\n" + own.read_text())
    out = tmp_path / "run"
    assert _train_own(odd, out, "--synthetic", "0.9", "--max-line-bytes", "1000") == 0
    err = capsys.readouterr().err
    assert f"line 26: {len(huge) + 1} bytes, more than --max-line-bytes 1000: skipped" in err
    assert "line 1" not in err and (out / "bundle" / "lmcor.json").is_file()


def test_examples_the_runtime_would_refuse_are_left_out_of_training():
    from lmcor.recipes.noise import Example
    from lmcor.recipes.train import _encoded

    from lmcor.runtime.bundle import shipped_bundle

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(shipped_bundle("default") / "tokenizer.json"))
    items = [Example("", ["the"], "the"), Example("the cat", ["The cat.", ""], "The cat."),
             Example("teh cat", ["The cat."], "The cat."), Example("word " * 600, ["x"], "x")]
    encoded = _encoded(tokenizer, items, copy=False)
    assert [e is None for e in encoded] == [True, False, False, True]  # an empty candidate is served, and trained on
    assert encoded[2][1] == tokenizer.backend_tokenizer.encode("The cat.").ids


def test_options_out_of_range_or_empty_are_refused_by_name(pairs, tmp_path, checkpoints, capsys):
    own = _with_candidates(pairs, tmp_path / "own.jsonl", 30)
    for extra, said in ((["--minutes", "1e308"], "--minutes must be above 0 and at most 525600"),
                        (["--held-out", "5e-324"], "--held-out must be a share from 1e-06 to below 1"),
                        (["--init", ""], "--init is empty"), (["--llm", " "], "--llm is empty"),
                        (["--size", "base", "--init", str(checkpoints["t5"])], "--size is for a model trained from scratch")):
        assert _train_own(own, tmp_path / "run", *extra) == 2, extra
        assert said in capsys.readouterr().err, extra
    assert main(["train-corrector", str(own), "--out", "", "-q"]) == 2
    assert "--out is empty" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # a name of bytes that are not UTF-8 (a surrogate to Python): tokenizers cannot save there
    not_utf8 = tmp_path / "run\udcff"
    assert _train_own(own, not_utf8) == 2
    shown = str(not_utf8).encode("utf-8", "backslashreplace").decode()  # said, not lost (capsys' stderr is strict)
    assert f"--out {shown}: the path is not UTF-8 (byte 0xff)" in capsys.readouterr().err
    assert not not_utf8.exists()


def test_a_run_that_never_trained_leaves_nothing_in_the_way(pairs, tmp_path, capsys):
    """Its tokenizer is made again (it may be of another --size or pairs file), another --held-out is
    taken, and a test part none of which fits is refused before training."""
    from lmcor.recipes.corrector import part_of

    own = _with_candidates(pairs, tmp_path / "own.jsonl", 30)
    rows = [json.loads(line) for line in own.read_text().splitlines()]
    # (targets of their own: a pair that shares its target with a short one is held out with it)
    long_rows = [{**r, "source": (r["source"] + " ") * 80, "target": r["target"] + " Again."} for r in rows]
    kept = [r for r in long_rows if part_of(r["source"], 0.3) == "test"] + [r for r in rows if part_of(r["source"], 0.3) != "test"]
    assert any(part_of(r["source"], 0.3) == "test" for r in long_rows)
    long = tmp_path / "long-test.jsonl"
    long.write_text("".join(json.dumps(r) + "\n" for r in kept))
    out = tmp_path / "run"
    assert _train_own(long, out, "--minutes", "5") == 2  # at once, not after the budget
    assert "no test pair fits the corrector's 512 input tokens" in capsys.readouterr().err
    assert not (out / "checkpoint.pt").exists()
    (out / "tokenizer" / "tokenizer.json").write_text("{}")  # as another run's would be: not this job's
    (out / "best.pt").write_bytes(b"weights of another run")  # kept by a watch before its first checkpoint
    assert _train_own(own, out, "--held-out", "0.4") == 0
    assert Corrector.load(out / "bundle").correct("the cat sat.", ["The cat sat."])


def test_an_interrupted_scoring_after_training_says_so(pairs, tmp_path, monkeypatch, caplog):
    from lmcor.recipes import train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "choose_no_repeat", interrupted)
    own, out = _with_candidates(pairs, tmp_path / "own.jsonl", 30), tmp_path / "run"
    assert _train_own(own, out) == 130
    assert "interrupted while scoring the weights on dev (training is done and saved" in caplog.text
    assert (out / "checkpoint.pt").is_file() and not (out / "hf").exists()


def _mbart_checkpoint(path, tgt_lang, forced, cc25=False):
    """A tiny mBART-50 checkpoint whose tokenizer writes targets in `tgt_lang` and whose generation
    config forces the language code `forced` first (`cc25`: an mBART-cc25 one, whose targets end with
    their language code)."""
    from transformers import MBart50TokenizerFast, MBartConfig, MBartForConditionalGeneration, MBartTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(english_sentences(300, seed=1), trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = (MBartTokenizerFast if cc25 else MBart50TokenizerFast)(
                                     tokenizer_object=tok, src_lang="en_XX", tgt_lang=tgt_lang, bos_token="<s>",
                                     eos_token="</s>", pad_token="<pad>", unk_token="<unk>", sep_token="</s>",
                                     cls_token="<s>", mask_token="<unk>")
    torch.manual_seed(0)
    model = MBartForConditionalGeneration(MBartConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=600, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2))
    model.generation_config.forced_bos_token_id = tokenizer.convert_tokens_to_ids(forced) if forced else None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, tokenizer.convert_tokens_to_ids(tgt_lang or "en_XX")


def test_an_mbart_init_learns_targets_that_start_as_its_outputs_do(pairs, tmp_path, capsys):
    """Labels are encoded as targets (the target language's code first, which the bundle forces), not
    as sources; a checkpoint whose forced first token is another language's is refused."""
    from transformers import AutoTokenizer

    from lmcor.recipes.corrector import load_init
    from lmcor.recipes.noise import Example
    from lmcor.recipes.train import _encoded

    own = _with_candidates(pairs, tmp_path / "own.jsonl", 30)
    init, german = _mbart_checkpoint(tmp_path / "mbart", "de_DE", "de_DE")
    _, tokenizer = load_init(init)
    (ids, labels), = _encoded(tokenizer, [Example("teh cat", ["The cat."], "The cat.")], copy=False)
    assert labels[0] == german and ids[0] == tokenizer.convert_tokens_to_ids("en_XX")
    assert _train_own(own, tmp_path / "run", "--init", str(init)) == 0
    assert Corrector.load(tmp_path / "run" / "bundle").manifest.special_tokens.forced_bos == german

    mixed, _ = _mbart_checkpoint(tmp_path / "mixed", "de_DE", "fr_XX")
    assert _train_own(own, tmp_path / "run-mixed", "--init", str(mixed)) == 2
    assert "starts every output with token" in capsys.readouterr().err and not (tmp_path / "run-mixed").exists()
    assert AutoTokenizer.from_pretrained(mixed).tgt_lang == "de_DE"

    # mBART-cc25 targets end with their language code, which its shift wraps round to the front: the
    # bundle decodes from that code, as training fed it, not from the configured "</s>".
    cc25, english = _mbart_checkpoint(tmp_path / "cc25", None, None, cc25=True)
    model, tokenizer = load_init(cc25)
    (_, labels), = _encoded(tokenizer, [Example("teh cat", ["The cat."], "The cat.")], copy=False)
    assert labels[-2:] == [tokenizer.eos_token_id, english]
    assert model.generation_config.decoder_start_token_id == english
    assert _train_own(own, tmp_path / "run-cc25", "--init", str(cc25)) == 0
    assert Corrector.load(tmp_path / "run-cc25" / "bundle").manifest.special_tokens.decoder_start == english


def test_an_init_that_cannot_be_trained_is_refused_before_out_is_made(llm, pairs, tmp_path, checkpoints, capsys):
    """Its weights missing, unreadable or partial, no first output token, no pad token, or targets
    without EOS: said before OUT is made or the LLM writes candidates."""
    from safetensors.torch import load_file, save_file

    cases = {}
    cases["no weights"] = tmp_path / "none"
    shutil.copytree(checkpoints["t5"], cases["no weights"])
    (cases["no weights"] / "model.safetensors").unlink()
    cases["torn"] = tmp_path / "torn"
    shutil.copytree(checkpoints["t5"], cases["torn"])
    weights = (cases["torn"] / "model.safetensors").read_bytes()
    (cases["torn"] / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    cases["no decoder"] = tmp_path / "encoder-only"
    shutil.copytree(checkpoints["t5"], cases["no decoder"])
    tensors = load_file(cases["no decoder"] / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("decoder.")}, cases["no decoder"] / "model.safetensors",
              metadata={"format": "pt"})
    cases["no start"] = tmp_path / "no-start"
    shutil.copytree(checkpoints["t5"], cases["no start"])
    for name in ("config.json", "generation_config.json"):
        config = json.loads((cases["no start"] / name).read_text())
        config.pop("decoder_start_token_id")
        (cases["no start"] / name).write_text(json.dumps(config))
    cases["no pad"] = tmp_path / "no-pad"
    shutil.copytree(checkpoints["t5"], cases["no pad"])
    for name, key in (("config.json", "pad_token_id"), ("tokenizer_config.json", "pad_token"),
                      ("special_tokens_map.json", "pad_token")):
        if (cases["no pad"] / name).is_file():
            config = json.loads((cases["no pad"] / name).read_text())
            (cases["no pad"] / name).write_text(json.dumps({**config, key: None}))
    cases["no eos"] = tmp_path / "no-eos"  # a tokenizer that ends no target with EOS: a corrector never stopping
    shutil.copytree(checkpoints["t5"], cases["no eos"])
    tokenizer = json.loads((cases["no eos"] / "tokenizer.json").read_text())
    (cases["no eos"] / "tokenizer.json").write_text(json.dumps({**tokenizer, "post_processor": None}))
    for case, said in (("no weights", "loading the checkpoint failed"), ("torn", "model.safetensors: cannot be read"),
                       ("no decoder", "lacks weights of this model (decoder."),
                       ("no start", "set decoder_start_token_id in its config.json"),
                       ("no pad", "neither its tokenizer nor its config.json has a pad token"),
                       ("no eos", "its tokenizer ends no target with the model's EOS")):
        assert _train(pairs, tmp_path / "run", llm, "--init", str(cases[case])) == 2, case
        err = capsys.readouterr().err
        assert f"--init {cases[case]}" in err and said in err, (case, err)
        assert not (tmp_path / "run").exists()


def test_an_init_reads_inputs_whole_and_its_bundle_reads_what_it_trained_on(pairs, tmp_path, checkpoints, capfd):
    """A checkpoint's tokenizer that truncates (saved so, or left so by a call) does not cut training
    inputs or labels; a tokenizer with more tokens than the embeddings, or without the candidates'
    separator (which it gets), grows them; the bundle reads
    the 512 input tokens training used, not the 1024 its positions and tokenizer allow."""
    from conftest import build_checkpoint

    from lmcor.recipes.corrector import load_init
    from lmcor.recipes.noise import Example
    from lmcor.recipes.train import MAX_INPUT_TOKENS, _encoded

    init = build_checkpoint("bart", tmp_path / "bart", positions=1024)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(init)
    tokenizer.backend_tokenizer.enable_truncation(16)
    tokenizer.add_tokens(["<new-1>", "<new-2>"])
    tokenizer.model_max_length = 1024
    tokenizer.save_pretrained(init)
    model, tokenizer = load_init(init)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    ids = tokenizer("a <extra_id_0> b", add_special_tokens=False)["input_ids"]  # the separator: one token, as T5's
    assert len(ids) == 3 and ids[1] == tokenizer.convert_tokens_to_ids("<extra_id_0>")
    tokenizer(["word " * 50], truncation=True, max_length=8)  # as scoring on dev does
    long = Example("the cat " * 20, ["The cat " * 20], "The cat " * 20)
    tokenizer.model_max_length = 16  # a target past it is no indexing error here: transformers' warning stays out
    (ids, labels), = _encoded(tokenizer, [long], copy=False)
    assert len(labels) == len(tokenizer(text_target=long.target, verbose=False)["input_ids"]) > 40 and len(ids) > 80
    assert "Token indices sequence length" not in capfd.readouterr().err
    own = _with_candidates(pairs, tmp_path / "own.jsonl", 30)
    assert _train_own(own, tmp_path / "run", "--init", str(init)) == 0
    bundle = Corrector.load(tmp_path / "run" / "bundle")
    assert bundle.manifest.max_input_tokens == MAX_INPUT_TOKENS
    assert bundle.tokenizer.token_to_id("<extra_id_0>") is not None


def test_another_init_does_not_resume_a_run_and_dev_holds_what_the_bundle_reads(pairs, tmp_path, checkpoints, capsys,
                                                                               monkeypatch):
    from lmcor.recipes import train as recipe
    from lmcor.recipes.corrector import part_of

    rows = [json.loads(line) for line in _with_candidates(pairs, tmp_path / "own.jsonl", 30).read_text().splitlines()]
    rows = [{**r, "source": "word " * 600} if part_of(r["source"], 0.3) == "dev" and n % 2 else r
            for n, r in enumerate(rows)]
    own = tmp_path / "some-long.jsonl"
    own.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fit, seen = recipe.fit, []
    monkeypatch.setattr(recipe, "fit", lambda *args, dev, **kwargs: seen.append(dev) or fit(*args, dev=dev, **kwargs))
    out = tmp_path / "run"
    assert _train_own(own, out, "--init", str(checkpoints["t5"])) == 0
    assert seen[0] and all(len(e.source) < 600 for e in seen[0])  # the unreadable dev pairs choose no checkpoint
    other = tmp_path / "other-t5"  # the same shape, another tokenizer configuration
    shutil.copytree(checkpoints["t5"], other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 300}))
    assert _train_own(own, out, "--init", str(other)) == 2
    assert f"a run of another model (--init {checkpoints['t5'].resolve()})" in capsys.readouterr().err
    assert _train_own(own, out, "--init", str(other), "--restart") == 0


def test_pairs_the_corrector_cannot_write_whole_are_left_out_and_a_thin_split_counts_sources(pairs, tmp_path, capsys,
                                                                                            caplog):
    """A target longer than the 96 tokens the corrector writes would be trained cut, without its EOS;
    a split that keeps no dev pair says how many different sources the pairs have."""
    from lmcor.recipes.noise import Example
    from lmcor.recipes.train import MAX_TARGET_TOKENS, _encoded
    from lmcor.runtime.bundle import shipped_bundle

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(shipped_bundle("default") / "tokenizer.json"))
    items = [Example("a cat", ["A cat."], "A cat. " * 40), Example("a cat", ["A cat."], "A cat.")]
    assert len(tokenizer(text_target=items[0].target)["input_ids"]) > MAX_TARGET_TOKENS
    assert [e is None for e in _encoded(tokenizer, items, copy=False)] == [True, False]
    rows = [json.loads(line) for line in _with_candidates(pairs, tmp_path / "own.jsonl", 40).read_text().splitlines()]
    rows = [{**r, "target": (r["target"] + " ") * 12} if n % 4 == 0 else r for n, r in enumerate(rows)]
    crowded = [{**r, "candidates": [r["target"]] * 200} if n % 4 == 1 else r for n, r in enumerate(rows)]
    some_long = tmp_path / "some-long.jsonl"
    some_long.write_text("".join(json.dumps(r) + "\n" for r in crowded))
    assert _train_own(some_long, tmp_path / "run", "--size", "tiny") == 0
    assert "train pairs left out of training:" in caplog.text and "whose targets are longer than the 96 tokens" in caplog.text
    # too many candidates to fit beside the source: said so, and where (not blamed on a long source)
    assert re.search(rf"the corrector cannot read \(the first, {re.escape(str(some_long))}: line \d+: the source and "
                     r"template \(with the separators of 200 candidates\)", caplog.text)
    assert "sources alone" not in caplog.text

    repeated = tmp_path / "repeated.jsonl"
    repeated.write_text("".join(json.dumps(rows[n % 2]) + "\n" for n in range(60)))
    assert _train_own(repeated, tmp_path / "run-repeated") == 2
    assert "kept no dev pair of the 60, which make 2 groups" in capsys.readouterr().err
    repeated.write_text((json.dumps(rows[0]) + "\n") * 60)
    assert _train_own(repeated, tmp_path / "run-one") == 2
    assert "kept no dev pair of the 60, which make 1 group (" in capsys.readouterr().err


def test_a_folder_another_run_is_using_is_refused_and_left_as_it_is(pairs, tmp_path, capsys):
    """Two runs into one --out would clear, train over and export over each other's files: the second
    is refused while the first holds the folder, and runs once it has let go."""
    import fcntl
    import os

    own = _with_candidates(pairs, tmp_path / "with.jsonl")
    out = tmp_path / "run"
    out.mkdir()
    (out / "train-corrector.json").write_text('{"held_out": 0.3}\n')  # the first run's record and checkpoint
    (out / "checkpoint.pt").write_text("the first run's\n")
    held = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running train-corrector holds it
        assert _train_own(own, out, "--restart") == 2
        assert f"--out {out}: another train-corrector run is using this folder" in capsys.readouterr().err
        assert (out / "checkpoint.pt").read_text() == "the first run's\n"
    finally:
        os.close(held)
    assert _train_own(own, out, "--restart") == 0
