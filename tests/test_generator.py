"""Causal-LM bundles: greedy tokens equal `generate`'s, batched prompts, a shared prefix, sampling."""

import json

import pytest
import torch
from lmcor.export.causal_lm import export_causal_lm
from lmcor.runtime.errors import InputError
from lmcor.runtime.generator import Generator, Prefix, row_seed
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    FalconForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MptConfig,
    MptForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    PreTrainedTokenizerFast,
)

from lmcor.cli import main

PROMPTS = ["Correct: she go to school", "def add(a, b):", "The capital of France is", "a", "x y z " * 6]


def _tokenizer():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(PROMPTS * 20 + ["She goes to school every day."] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    if request.param == "llama":
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             bos_token_id=1, eos_token_id=2)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                            bos_token_id=1, eos_token_id=2)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bundle(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "lm"
    manifest = export_causal_lm(checkpoint, out, max_output_tokens=16)
    assert manifest.validation["greedy_tokens_identical"]
    return out


def _reference(checkpoint, generator, prompts, max_new_tokens):
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    eos = generator.manifest.special_tokens.eos
    out = []
    for prompt in prompts:
        ids = torch.tensor([generator.encode(prompt)])
        with torch.no_grad():
            tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, pad_token_id=eos)[0, ids.shape[1]:].tolist()
        out.append(tokens[: tokens.index(eos)] if eos in tokens else tokens)
    return out


@pytest.mark.parametrize("batch_size", [1, 5])
def test_greedy_matches_generate(checkpoint, bundle, batch_size):
    generator = Generator.load(bundle)
    got = generator.generate_batch(PROMPTS, max_new_tokens=10, batch_size=batch_size)
    assert [g.token_ids for g in got] == _reference(checkpoint, generator, PROMPTS, 10)


def test_shared_prefix_gives_the_tokens_of_the_whole_prompt(bundle):
    generator = Generator.load(bundle)
    head = "Correct the grammar of each sentence.\nSentence:"
    tails = [" she go to school", " a", " x y z x y z"]
    prefix = generator.prefix(head)
    shared = generator.generate_batch(tails, max_new_tokens=8, prefix=prefix)
    whole = generator.generate_batch([head + t for t in tails], max_new_tokens=8)
    # The same tokens where the tokenizer splits head + tail at the boundary, which it does here.
    assert [generator.encode(head) + generator.tokenizer.encode(t, add_special_tokens=False).ids for t in tails] == [
        generator.encode(head + t) for t in tails]
    assert [g.token_ids for g in shared] == [g.token_ids for g in whole]


def test_a_prefix_on_a_sentencepiece_tokenizer_gives_the_whole_texts_tokens(tmp_path):
    """Llama 2 / Mistral tokenizers (Metaspace, prepend_scheme "first") mark a text's start: a prompt
    tokenized alone after a prefix would begin with a "▁" the whole text does not have."""
    from tokenizers import processors

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator([p for p in PROMPTS * 20 + ["Rules: fix the grammar. Sentence: she go to school Fixed:"] * 20],
                            trainers.BpeTrainer(vocab_size=600, special_tokens=specials, max_token_length=6))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2))
    model.save_pretrained(tmp_path / "ck")
    tokenizer.save_pretrained(tmp_path / "ck")
    export_causal_lm(tmp_path / "ck", tmp_path / "lm", max_output_tokens=16)
    generator = Generator.load(tmp_path / "lm")
    head = "Rules: fix the grammar.\n"
    tails = ["Sentence: she go to school\nFixed:", "a", "x y z", "The capital of France is"]
    alone = tokenizer("\n" + tails[0], add_special_tokens=False)["input_ids"]
    assert tokenizer(head + tails[0])["input_ids"][len(generator.encode(head.rstrip())):] != alone  # the "▁"
    shared = generator.generate_batch(tails, prefix=generator.prefix(head), max_new_tokens=8)
    whole = generator.generate_batch([head + t for t in tails], max_new_tokens=8)
    assert [g.token_ids for g in shared] == [g.token_ids for g in whole]

    # A token across the boundary (":▁" after "Sentence:"): such a prompt runs whole, without the
    # prefix, and batched apart from the prompts that follow it.
    head = "Rules: fix the grammar.\nSentence:"
    tails = [" she go to school", "\nFixed: x", " .", " x y z"]
    merged = [not tokenizer(head + t)["input_ids"][: len(generator.encode(head))] == generator.encode(head) for t in tails]
    assert merged == [True, False, True, True]
    shared = generator.generate_batch(tails, prefix=generator.prefix(head), max_new_tokens=8, batch_size=4)
    whole = generator.generate_batch([head + t for t in tails], max_new_tokens=8)
    assert [g.token_ids for g in shared] == [g.token_ids for g in whole]
    # Too long, such a prompt's count holds the prefix's tokens, and says so.
    too_long = " she go to school" * 40
    count = len(tokenizer(head + too_long)["input_ids"])
    with pytest.raises(InputError, match=f"the prefix and prompt's {count} tokens and max_new_tokens=8 need"):
        generator.generate_batch([too_long], prefix=generator.prefix(head), max_new_tokens=8)


def test_a_row_whose_scores_are_not_finite_fails_alone_when_sampled(tmp_path):
    """Logits of +inf (an overflow, a broken checkpoint) leave sampling no distribution: that prompt
    fails with its error, the others are answered; greedy picks the infinite score as transformers does."""
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=False))
    with torch.no_grad():  # +inf for token 100 where the prompt holds "x" (its last hidden state's sign decides)
        model.lm_head.weight[100] = float("inf") * torch.sign(model.lm_head.weight[100])
    model.save_pretrained(tmp_path / "ck")
    tokenizer.save_pretrained(tmp_path / "ck")
    export_causal_lm(tmp_path / "ck", tmp_path / "lm", max_output_tokens=4)
    generator = Generator.load(tmp_path / "lm")
    sampled = generator.generate_batch(PROMPTS, temperature=1.0, seed=0, errors="return")
    failed = [isinstance(g, InputError) for g in sampled]
    assert any(failed), "the model was meant to give some prompt an infinite or NaN score"
    assert all("NaN or infinity" in str(g) for g, bad in zip(sampled, failed) if bad)
    alone = [generator.generate_batch([p], temperature=1.0, seed=[row_seed(0, n)], errors="return")[0]
             for n, p in enumerate(PROMPTS)]
    assert [isinstance(g, InputError) for g in alone] == failed
    assert [g.token_ids for g, bad in zip(sampled, failed) if not bad] == [
        g.token_ids for g, bad in zip(alone, failed) if not bad]
    assert all(not isinstance(g, InputError) for g in generator.generate_batch(PROMPTS, errors="return"))


def test_next_logits_refuses_what_it_cannot_run(bundle):
    generator = Generator.load(bundle)
    for ids, said in (([], "ids is empty"), ([1, 10**6], r"ids\[1\] must be an integer from 0 to \d+ \(the model's vocab"),
                      ("ab", "ids must be a list"),
                      ([1] * 10_000, "more than the model's")):
        with pytest.raises(InputError, match=said):
            generator.next_logits(ids)
    assert generator.next_logits(generator.encode("a")).shape == (generator.manifest.decoder.vocab_size,)
    for text, said in ((None, "text must be a string, got null"), ("a\ud800", "text holds a lone surrogate")):
        with pytest.raises(InputError, match=said):
            generator.encode(text)


def test_sampling_is_seeded(bundle):
    generator = Generator.load(bundle)
    options = dict(max_new_tokens=8, temperature=1.0, top_p=0.9)
    a = generator.generate_batch(PROMPTS, seed=1, **options)
    b = generator.generate_batch(PROMPTS, seed=1, **options)
    c = generator.generate_batch(PROMPTS, seed=2, **options)
    assert [g.token_ids for g in a] == [g.token_ids for g in b] != [g.token_ids for g in c]
    with pytest.raises(InputError, match="item 1"):
        generator.generate_batch(["ok", ""])


def test_a_refused_prompt_is_counted_and_raised_alone(bundle):
    generator = Generator.load(bundle)
    counted = []
    answers = generator.generate_batch(["the cat", "  ", "we"], max_new_tokens=4, errors="return",
                                       progress=counted.append)
    assert [isinstance(a, InputError) for a in answers] == [False, True, False]
    assert sum(counted) == 3  # a bar reaches its end
    with pytest.raises(InputError, match="white space"):
        generator.generate("  ", errors="return")


def test_sampling_draws_from_the_tempered_nucleus():
    """temperature and top_p shape the distribution drawn from: a token outside the nucleus is never
    drawn, and the frequencies are the renormalized probabilities (4,000 draws: within 0.03)."""
    import numpy as np
    from lmcor.runtime.generator import Sampling, _choose

    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.tile(np.log(probs), (4000, 1))
    rngs = [np.random.default_rng(n) for n in range(4000)]
    drawn = _choose(logits, Sampling(temperature=1.0, top_p=0.7), rngs)  # the nucleus: 0.5 + 0.3 reach 0.7
    assert set(drawn.tolist()) == {0, 1} and abs((drawn == 0).mean() - 0.5 / 0.8) < 0.03
    drawn = _choose(logits, Sampling(temperature=0.5, top_p=1.0), rngs)  # p^2, renormalized
    assert abs((drawn == 0).mean() - 0.25 / (probs**2).sum()) < 0.03 and (drawn == 3).mean() < 0.03
    drawn = _choose(logits, Sampling(temperature=1.0, top_p=1.0), rngs)
    assert abs((drawn == 3).mean() - 0.05) < 0.03


def test_a_nucleus_of_one_token_samples_the_greedy_answer(bundle):
    generator = Generator.load(bundle)
    greedy = generator.generate_batch(PROMPTS, max_new_tokens=8)
    narrow = generator.generate_batch(PROMPTS, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=3)
    assert [g.token_ids for g in narrow] == [g.token_ids for g in greedy]


def test_candidates_pipe_into_correct(bundle, bundles, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "source": "she go to school"}\n{"source": 3}\n{"id": 3, "source": "a b"}\n')
    out = tmp_path / "candidates.jsonl"
    assert main(["candidates", "--model", str(bundle), str(source), "-o", str(out), "-k", "3", "--max-new-tokens",
                 "6", "-q", "--prompt", "Correct: {source}\n"]) == 1
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(r.get("candidates", [])) for r in records] == [3, 0, 3] and "must be a non-empty string" in records[1]["error"]
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps(r) for r in records if "candidates" in r) + "\n")
    assert main(["correct", "--model", str(bundles["t5"]), str(good), "-q", "--max-new-tokens", "4"]) == 0
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == [1, 3]
    # Piped whole, the error record's line fails with its own reason, not as a request without a source.
    assert main(["correct", "--model", str(bundles["t5"]), str(out), "-q", "--max-new-tokens", "4"]) == 1
    answered = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert answered[1] == {"id": None, "line": 2, "error": "the line is an error record of an earlier step: "
                                                           + records[1]["error"]}
    assert "output" in answered[0] and "output" in answered[2]


def test_candidates_with_a_prompt_too_long_for_the_model_say_so(bundle, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text('{"source": "she go to school"}\n')
    prompt = "Fix the sentence. " * 40 + "Sentence: {source}\nFixed:"
    assert main(["candidates", "--model", str(bundle), str(source), "-q", "--prompt", prompt]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the prompt's part before {source} takes" in err[0] and "write a shorter prompt" in err[0]


def test_candidates_resume_checks_the_last_record_whose_samples_differ(tmp_path):
    """A source whose K answers are all alike (common for a short sentence) comes out alike under
    another --seed or --temperature: the run is checked on one whose samples tell them apart."""
    from lmcor.cli.candidates import _check_resumed

    out = tmp_path / "candidates.jsonl"
    records = [{"id": 0, "line": 1, "source": "she go", "candidates": ["She goes.", "She went."]},
               {"id": 1, "line": 2, "source": "a b", "candidates": ["A b.", "A b."]}]
    out.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert _check_resumed(out, 2, ("\n",)) == records[0]
    out.write_text(json.dumps(records[1]) + "\n")
    assert _check_resumed(out, 2, ("\n",)) == records[1]  # none differ: the last


def test_generate_resume_continues_its_own_samples_and_refuses_another_seed(bundle, tmp_path, capsys):
    """A line samples with its own seed, whichever lines share its batch: --resume (its check answers the
    last line again, alone) continues a sampled run, and refuses one sampled with another --seed."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    whole, out = tmp_path / "whole.jsonl", tmp_path / "out.jsonl"
    args = ["generate", "--model", str(bundle), str(prompts), "--max-new-tokens", "6", "--temperature", "1.0", "-q"]
    assert main([*args, "-o", str(whole)]) == 0
    out.write_text("".join(whole.read_text().splitlines(keepends=True)[:3]))
    assert main([*args, "-o", str(out), "--resume", "--batch-size", "2"]) == 0
    assert out.read_text() == whole.read_text()
    out.write_text("".join(whole.read_text().splitlines(keepends=True)[:3]))
    assert main([*args, "-o", str(out), "--resume", "--seed", "5"]) == 2
    assert "it was written with another model or other options" in capsys.readouterr().err


def test_candidates_resume_refuses_another_runs_output(bundle, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text('{"source": "she go to school"}\n{"source": "a b"}\n')
    out = tmp_path / "candidates.jsonl"
    args = ["candidates", "--model", str(bundle), str(source), "-o", str(out), "--max-new-tokens", "4", "-q",
            "--prompt", "Correct: {source}\n", "-k", "2"]
    assert main(args) == 0
    whole = out.read_text()
    first = whole.splitlines(keepends=True)[0]
    out.write_text(first)
    assert main([*args[:-2], "-k", "3", "--resume"]) == 2
    assert "holds 2 candidates a source, and -k is 3" in capsys.readouterr().err
    folder = [*args[:5], str(out) + "/", *args[6:]]  # a folder's path: said as such, not as another run's file
    assert main([*folder[:-2], "-k", "3", "--resume"]) == 2
    assert f"-o {out}/: not a directory" in capsys.readouterr().err
    assert main([*args, "--resume", "--seed", "3"]) == 2  # its candidates are not this run's
    assert "holds other candidates than this run writes for its source" in capsys.readouterr().err
    assert out.read_text() == first
    # a stop string in a kept candidate: another --stop wrote it (this run cuts each answer before one)
    stop = next(c[len(c) // 2] for c in json.loads(first)["candidates"] if c.strip())
    assert main([*args, "--resume", "--stop", stop]) == 2
    assert f"input line 1 holds a candidate with {stop!r} in it" in capsys.readouterr().err
    assert main([*args, "--resume", "--stop", ""]) == 2  # said as the flag it is, not as a stop every text holds
    assert "--stop #1 must be a non-empty string" in capsys.readouterr().err
    # a --stop inside the kept source: this run cannot answer a source the file answers, so the file is not its
    assert main([*args, "--resume", "--stop", "go to"]) == 2
    assert "this run cannot answer the source of input line 1" in capsys.readouterr().err
    assert out.read_text() == first
    # another command's records: said as such, before any candidate is generated
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"source": "she go to school", "candidates": ["a", "b"], "target": "x"}\n')
    assert main([*args[:5], str(foreign), *args[6:], "--resume"]) == 2
    assert "line 1 is not a record of this command's" in capsys.readouterr().err
    foreign.write_text("[" * 100_000 + "]" * 100_000 + "\n")  # nested past Python's recursion limit
    assert main([*args[:5], str(foreign), *args[6:], "--resume"]) == 2
    assert "line 1 is not a record of this command's" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0 and out.read_text() == whole
    # this run's candidates, but the record's source is not its line's: another input's output, kept as it was
    elsewhere = tmp_path / "other.jsonl"
    elsewhere.write_text('{"source": "another sentence"}\n')
    assert main([*args[:3], str(elsewhere), *args[4:]]) == 0
    other = out.read_text()
    assert main([*args, "--resume"]) == 2
    assert ("answers line 1 with the source 'another sentence', but that line of "
            f"{source} has the source 'she go to school'") in capsys.readouterr().err
    assert out.read_text() == other
    # an error record (no source) last: the same input's output, resumed (its failed line still counts)
    source.write_text('{"source": "she go to school"}\n{"source": ""}\n{"source": "a b"}\n')
    assert main(args) == 1
    whole = out.read_text()
    out.write_text("".join(whole.splitlines(keepends=True)[:2]))
    assert main([*args, "--resume"]) == 1
    assert [json.loads(line)["line"] for line in out.read_text().splitlines()] == [1, 2, 3] and out.read_text() == whole


def test_an_options_message_names_its_flag(bundle, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text('{"source": "a b"}\n')
    for flags, said in ((["--max-new-tokens", "100000"], "--max-new-tokens must be an integer from 1 to "),
                        (["--stop", "x", "--stop", ""], "--stop #2 must be a non-empty string"),
                        (["--top-p", "2"], "--top-p must be"),
                        (["--max-new", "100000"], "--max-new-tokens must be an integer from 1 to "),  # argparse's prefix
                        (["--stop", "\udcff"], "--stop #1 holds a lone surrogate"),  # a byte not UTF-8 in argv
                        (["--prompt", "\udcff {source}"], "--prompt holds a lone surrogate")):
        assert main(["candidates", "--model", str(bundle), str(source), "-q", "--prompt", "C: {source}\n", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"lmcor: error: {said}"), err
    # the summary counts the sources answered, not one that failed
    source.write_text('{"source": "a b"}\n{"source": "' + "word " * 500 + '"}\n')
    assert main(["candidates", "--model", str(bundle), str(source), "--prompt", "C: {source}\n", "-o",
                 str(tmp_path / "out.jsonl")]) == 1
    assert "lmcor: 1 sources, " in capsys.readouterr().err


@pytest.mark.parametrize("command, field", [("candidates", "source"), ("generate", "prompt")])
def test_no_input_file_is_one_line(bundle, command, field, capsys):
    assert main([command, "--model", str(bundle), "-q"]) == 2
    assert "no input file given (a JSONL file's path, or - for standard input)" in capsys.readouterr().err
    assert main([command, "--model", str(bundle), "-q", ""]) == 2
    assert "lmcor: error: the input file's path is empty" in capsys.readouterr().err


def test_bench_shared_prefix(bundle, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "--shared-prefix", "--bundle", str(bundle), "--prefix-tokens", "40", "--requests", "3",
                 "--rounds", "1", "--batch-size", "2", "--out", str(out)]) == 0
    report = json.loads((out / "prefix.json").read_text())
    assert report["identical_outputs"] == 3 and report["prefix_tokens"] >= 40
    assert "speedup" in capsys.readouterr().out
    # a prefix longer than the model reads is refused by its flag, at once; one that leaves no room
    # for the prompts and their new tokens, before anything runs
    assert main(["bench", "--shared-prefix", "--bundle", str(bundle), "--prefix-tokens", "1000000"]) == 2
    assert "--prefix-tokens 1000000: this model reads at most" in capsys.readouterr().err
    assert main(["bench", "--shared-prefix", "--bundle", str(bundle), "--prefix-tokens", "250"]) == 2
    assert "--prefix-tokens 250: the prefix, a prompt and 16 new tokens need" in capsys.readouterr().err


def test_the_rules_prefix_is_the_fewest_lines_that_hold_the_tokens(bundle):
    from lmcor.bench.prefix import RULES, rules_prefix

    generator = Generator.load(bundle)
    for tokens in (1, 7, 40, 233):
        text = rules_prefix(generator, tokens)
        lines = text.splitlines(keepends=True)
        assert all(line == RULES[n % len(RULES)] + "\n" for n, line in enumerate(lines))
        assert len(generator.encode(text)) >= tokens > len(generator.encode("".join(lines[:-1])))


def test_stop_strings_end_a_row_at_the_first_token_that_completes_one(bundle):
    """Stop strings are looked for in the output's text only (transformers' `stop_strings` also
    match text that begins in the prompt)."""
    generator = Generator.load(bundle)
    full = generator.generate_batch(PROMPTS, max_new_tokens=16)
    stops = [g.text[3:5] for g in full if len(g.text) >= 5][:2]
    assert stops
    stopped = generator.generate_batch(PROMPTS, max_new_tokens=16, stop=stops, batch_size=3)
    for whole, cut in zip(full, stopped):
        hits = [whole.text.find(s) for s in stops if s in whole.text]
        assert cut.text == (whole.text[: min(hits)] if hits else whole.text)
        ends = [n for n in range(1, len(whole.token_ids) + 1)
                if any(s in generator.tokenizer.decode(whole.token_ids[:n]) for s in stops)]
        assert cut.token_ids == whole.token_ids[: ends[0] if ends else len(whole.token_ids)]


def test_a_stop_string_may_be_a_special_tokens_text(tmp_path):
    """A chat marker ("<|im_start|>") is a special token, which the answer's text leaves out: it stops
    the row as transformers' stop strings do, and the text is the tokens' before it. Stops are matched
    against the text with the marker in it."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(PROMPTS * 20, trainers.BpeTrainer(vocab_size=320, special_tokens=[
        "<unk>", "<s>", "</s>", "<|im_start|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        additional_special_tokens=["<|im_start|>"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=128, bos_token_id=1, eos_token_id=2)).eval()
    ids = tokenizer(PROMPTS[2], return_tensors="pt").input_ids
    with torch.no_grad():
        third = int(model.generate(ids, max_new_tokens=3, do_sample=False)[0, ids.shape[1] + 2])
        model.lm_head.weight[3] = model.lm_head.weight[third] * 1.01  # the marker comes third
        expected = model.generate(ids, max_new_tokens=8, do_sample=False, stop_strings=["<|im_start|>"],
                                  tokenizer=tokenizer)[0, ids.shape[1]:].tolist()
    assert expected[-1] == 3 and len(expected) < 8
    model.save_pretrained(tmp_path / "ck")
    tokenizer.save_pretrained(tmp_path / "ck")
    export_causal_lm(tmp_path / "ck", tmp_path / "lm", max_output_tokens=16)
    generator = Generator.load(tmp_path / "lm")
    got, = generator.generate_batch([PROMPTS[2]], max_new_tokens=8, stop=["<|im_start|>"])
    assert got.token_ids == expected
    assert got.text == tokenizer.decode(expected[:-1], skip_special_tokens=True)
    # Matched on the text with the marker in it: a stop across it is no stop, one into it is.
    written = tok.encode("ab<|im_start|>cd. x").ids
    assert 3 in written
    assert generator._before_stop(written, ("bc",)) is None
    assert generator._before_stop(written, ("b<|im",)) == "a"
    assert generator._before_stop(written, ("d.",)) == "abc"
    assert generator._before_stop(written, ("start|>",)) == "ab"


def test_a_sample_does_not_depend_on_its_batch(bundle):
    generator = Generator.load(bundle)
    options = dict(max_new_tokens=8, temperature=1.0, seed=[5, 6, 7, 8, 9])
    together = generator.generate_batch(PROMPTS, batch_size=5, **options)
    alone = generator.generate_batch(PROMPTS, batch_size=1, **options)
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    with pytest.raises(InputError, match="seed: 2 seeds for 5 prompts"):
        generator.generate_batch(PROMPTS, seed=[1, 2], temperature=1.0)


def test_a_bad_prompt_fails_alone(bundle):
    generator = Generator.load(bundle)
    results = generator.generate_batch(["ok", "", "x " * 300, "a"], max_new_tokens=4, errors="return")
    assert isinstance(results[1], InputError) and isinstance(results[2], InputError)
    assert [r.token_ids for r in (results[0], results[3])] == [g.token_ids for g in
                                                               generator.generate_batch(["ok", "a"], max_new_tokens=4)]


def test_the_default_prompt_rotates_examples_no_variant_shares():
    from lmcor.runtime.candidates import EXAMPLES, default_few_shot

    few_shot = default_few_shot()
    shown = [{wrong for wrong, _ in EXAMPLES if wrong in head} for head in few_shot.heads]
    assert len(shown) > 1 and all(shown) and sum(map(len, shown)) == len(set().union(*shown)) == len(EXAMPLES)
    sources = [f"sentence number {n}" for n in range(60)]
    assert {few_shot.variant(s) for s in sources} == set(range(len(few_shot.heads)))
    # the same in every process (resumed candidates rely on it): pinned, not compared with itself
    assert [few_shot.variant(s) for s in sources[:8]] == [1, 2, 2, 1, 0, 0, 2, 2]


def test_candidates_are_the_same_in_any_batch_and_after_resume(bundle, tmp_path, capsys):
    from lmcor.runtime.candidates import CandidateWriter, FewShot

    sources = ["she go to school", "a b", "x y z", "The capital of France is", "def add(a, b):", "two beekeeper"]
    generator = Generator.load(bundle)
    few_shot = FewShot(("Correct: ", "Fix: "), "\n=")  # the tiny model's 256 positions hold no real prompt
    writer = CandidateWriter(generator, few_shot, k=3, max_new_tokens=6, batch_size=4)
    together = writer(sources)
    alone = [CandidateWriter(generator, few_shot, k=3, max_new_tokens=6, batch_size=1)([s])[0] for s in sources]
    assert together == alone and all(len(c.texts) == 3 for c in together)
    assert writer.stats.tokens > 0 and "tokens/s" in writer.stats.summary()

    source = tmp_path / "sources.jsonl"
    source.write_text("".join(json.dumps({"id": n, "source": s}) + "\n" for n, s in enumerate(sources)))
    out = tmp_path / "candidates.jsonl"
    command = ["candidates", "--model", str(bundle), str(source), "-o", str(out), "-k", "3", "--max-new-tokens", "6",
               "-q", "--prompt", "Correct: {source}\n="]
    assert main(command) == 0
    whole = out.read_text()
    out.write_text("".join(whole.splitlines(keepends=True)[:2]))  # as an interrupted run leaves it
    capsys.readouterr()
    assert main([*command[:-3], *command[-2:], "--resume"]) == 0  # not quiet: the summary counts the 4 lines left
    assert out.read_text() == whole
    assert "lmcor: 4 sources, " in capsys.readouterr().err


def test_prompts_after_different_prefixes_share_a_batch(bundle):
    generator = Generator.load(bundle)
    heads = [generator.prefix("Correct: she go"), generator.prefix("x y z x y z x y z")]
    prefixes = [heads[n % 2] for n in range(len(PROMPTS))]
    together = generator.generate_batch(PROMPTS, prefix=prefixes, max_new_tokens=8, batch_size=5)
    alone = [generator.generate_batch([p], prefix=h, max_new_tokens=8)[0] for p, h in zip(PROMPTS, prefixes)]
    assert [g.token_ids for g in together] == [g.token_ids for g in alone]
    with pytest.raises(InputError, match="one per prompt"):
        generator.generate_batch(PROMPTS, prefix=heads)
    with pytest.raises(InputError, match="got a list holding a str"):  # None is a prompt without one; a str no prefix
        generator.generate_batch(PROMPTS[:2], prefix=[None, "Correct: "])


@pytest.mark.parametrize("heads", [("Correct: a b\n= ", "Fix this: "), ("", "Fix this: "), ("Fix this: ", "")])
def test_candidates_greedy_is_the_whole_prompt_run_at_once(bundle, heads):
    """The shared prefix ends before the white space that leads into the source, so the prompt's
    tokens are those of the whole text; a variant without a head runs without a prefix, and the
    others keep theirs."""
    from lmcor.runtime.candidates import CandidateWriter, FewShot

    few_shot = FewShot(heads, "\n=")
    sources = ["she go to school", "The capital of France is", "def add(a, b):", "a b", "x y z", "two beekeeper"]
    assert {few_shot.variant(s) for s in sources} == {0, 1}
    generator = Generator.load(bundle)
    got = CandidateWriter(generator, few_shot, k=1, max_new_tokens=8, stop=())(sources)
    whole = generator.generate_batch([few_shot.heads[few_shot.variant(s)] + s + few_shot.tail for s in sources],
                                     max_new_tokens=8)
    assert [c.texts[0] for c in got] == [g.text.strip() for g in whole]


def test_candidates_of_a_source_that_is_no_text_fail_alone(bundle):
    from lmcor.runtime.candidates import CandidateWriter, FewShot

    writer = CandidateWriter(Generator.load(bundle), FewShot(("Fix: ",), "\n="), k=2, max_new_tokens=4)
    got = writer(["she go", "a\ud800b", None, "", "  ", "x y z"])
    assert [type(c).__name__ for c in got] == ["Candidates", "InputError", "InputError", "InputError", "InputError",
                                               "Candidates"]
    assert "lone surrogate" in str(got[1]) and "sources[2] must be a non-empty string" in str(got[2])
    assert got[0] == writer(["she go"])[0] and writer([]) == [] and writer.stats.sources == 3
    with pytest.raises(InputError, match="sources must be a list"):
        writer("abc")
    # A source holding a stop string: its answers would end there, cut short (a line break, by default).
    lines = writer(["she go\nto school", "she go\n"])
    assert isinstance(lines[0], InputError) and "the source holds '\\n', where an answer ends" in str(lines[0])
    assert type(lines[1]).__name__ == "Candidates"  # a line break that ends it is no line of its own
    # ... nor part of the prompt: "Fix: she go\n\n=" would break the prompt's pattern
    assert lines[1].source == "she go\n" and lines[1].texts[0] == writer(["she go"])[0].texts[0]
    trace = []
    real = writer.generator.generate_batch
    writer.generator.generate_batch = lambda prompts, **options: trace.append(prompts) or real(prompts, **options)
    writer([" she go\n"])
    assert trace[0] == ["she go\n="]
    assert type(CandidateWriter(writer.generator, writer.few_shot, k=1, max_new_tokens=4, stop=("###",))(
        ["she go\nto school"])[0]).__name__ == "Candidates"
    for stop, said in (([1], "stop.0. must be a non-empty string"), (None, "stop must be a list"),
                       ([""], "stop.0. must be")):
        with pytest.raises(InputError, match=said):  # said when the writer is made, not as a TypeError of a source's
            CandidateWriter(writer.generator, writer.few_shot, k=1, stop=stop)


def test_bench_candidates_against_transformers(bundle, checkpoint, tmp_path, capsys):
    data = tmp_path / "sources.jsonl"
    data.write_text("".join(json.dumps({"source": p}) + "\n" for p in PROMPTS[:3]))
    out = tmp_path / "out"
    assert main(["bench", "--candidates", "--bundle", str(bundle), "--model", str(checkpoint), "--data", str(data),
                 "--prompt", "Fix: {source}\n=", "--requests", "3", "--rounds", "1", "--batch-size", "2",
                 "--out", str(out)]) == 0
    report = json.loads((out / "candidates.json").read_text())
    assert report["identical_outputs"] == 3 and report["speedup"] > 0
    assert "tokens/s" in capsys.readouterr().out


def test_generate_with_a_prefix_answers_as_the_whole_text(bundle, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:3]))
    assert main(["generate", "--model", str(bundle), str(prompts), "--prefix", "Correct: a b ", "--max-new-tokens", "6",
                 "-q"]) == 0
    got = [json.loads(line)["output"] for line in capsys.readouterr().out.splitlines()]
    generator = Generator.load(bundle)
    whole = generator.generate_batch(["Correct: a b " + p for p in PROMPTS[:3]], max_new_tokens=6)
    assert got == [g.text for g in whole]
    assert main(["generate", "--model", str(bundle), str(prompts), "--prefix", "", "-q"]) == 2  # not run without it
    assert "--prefix: text (the prefix) must be a non-empty string, got an empty one" in capsys.readouterr().err
    # The prefix's trailing space goes with the prompt, so the tokens are the whole text's (with a real
    # BPE, "b " + "Correct" and "b" + " Correct" differ; this tiny vocabulary keeps spaces apart anyway).
    tokens = generator.tokenizer.encode
    assert tokens("Correct: a b").ids + tokens(" " + PROMPTS[0], add_special_tokens=False).ids == tokens(
        "Correct: a b " + PROMPTS[0]).ids


@pytest.mark.parametrize("command", ["generate", "candidates"])
def test_a_slow_command_runs_one_batch_at_a_time(command, bundle, tmp_path, capsys, monkeypatch):
    """An LLM's batches take long: a signal stops generate and candidates after the batch in flight,
    and every finished batch is written, so each run of the model gets one batch of lines."""
    lines = tmp_path / "lines.jsonl"
    field = "prompt" if command == "generate" else "source"
    lines.write_text("".join(json.dumps({field: p}) + "\n" for p in PROMPTS * 2))
    sizes = []
    real = Generator.generate_batch

    def counted(self, prompts, **options):
        sizes.append(len(prompts))
        return real(self, prompts, **options)

    monkeypatch.setattr(Generator, "generate_batch", counted)
    extra = ["-k", "2", "--prompt", "Correct: {source}\n"] if command == "candidates" else []
    assert main([command, "--model", str(bundle), str(lines), "--batch-size", "3", "--max-new-tokens", "4", "-q",
                 *extra]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2 * len(PROMPTS)
    lines_per_run = sizes[::2] if command == "candidates" else sizes  # candidates: a greedy and a sampled round
    assert max(lines_per_run) == 3 and sum(lines_per_run) == 2 * len(PROMPTS)


@pytest.mark.parametrize("flags, said", [(["--max-new-tokens", "999"], "--max-new-tokens must be an integer from 1"),
                                         (["--temperature", "0.0001"], "--temperature must be 0"),
                                         (["--top-p", "0"], "--top-p must be a number above 0"),
                                         (["--stop", ""], "--stop #1 must be a non-empty string")])
def test_generate_checks_its_options_before_any_line(bundle, tmp_path, capsys, flags, said):
    """As candidates does: a run with nothing to answer (blank lines) still refuses a bad option."""
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    assert main(["generate", "--model", str(bundle), str(blank), "-q", *flags]) == 2
    assert said in capsys.readouterr().err


def test_generate_answers_around_a_prompt_too_long(bundle, tmp_path, capsys):
    """A prompt past the model's positions is its line's error record; the other lines are answered."""
    prompts = tmp_path / "prompts.jsonl"
    lines = [PROMPTS[0], " ".join(["a"] * 200), PROMPTS[1]]
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in lines))
    assert main(["generate", "--model", str(bundle), str(prompts), "--max-new-tokens", "6", "-q"]) == 1
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3]
    assert records[1]["error"].startswith("the prompt's ") and "positions" in records[1]["error"]
    want = Generator.load(bundle).generate_batch([PROMPTS[0], PROMPTS[1]], max_new_tokens=6)
    assert [records[0]["output"], records[2]["output"]] == [g.text for g in want]


def test_a_prompt_the_model_fails_on_fails_alone(bundle, tmp_path, capsys):
    """A batch ONNX Runtime fails on runs again prompt by prompt: only the prompt it fails on gets an
    error (here, a manifest that claims more positions than GPT-2's learned ones), and the CLI answers
    the other lines."""
    import shutil

    from lmcor.runtime.bundle import MANIFEST_NAME

    if Generator.load(bundle).manifest.architecture != "gpt2":
        pytest.skip("a position past the model's fails only where positions are learned (GPT-2's)")
    claimed = tmp_path / "claimed"
    shutil.copytree(bundle, claimed)
    manifest = json.loads((claimed / MANIFEST_NAME).read_text())
    (claimed / MANIFEST_NAME).write_text(json.dumps({**manifest, "max_input_tokens": 1024}))
    long = " ".join(["a"] * 300)
    generator = Generator.load(claimed)
    got = generator.generate_batch([PROMPTS[0], long, PROMPTS[1]], max_new_tokens=4, errors="return")
    assert isinstance(got[1], InputError) and "the model cannot read this prompt" in str(got[1])
    want = Generator.load(bundle).generate_batch([PROMPTS[0], PROMPTS[1]], max_new_tokens=4)
    assert [got[0].token_ids, got[2].token_ids] == [w.token_ids for w in want]
    with pytest.raises(InputError, match="item 1: the model cannot read this prompt"):
        generator.generate_batch([PROMPTS[0], long], max_new_tokens=4)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (PROMPTS[0], long, PROMPTS[1])))
    assert main(["generate", "--model", str(claimed), str(prompts), "--max-new-tokens", "4", "-q"]) == 1
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert ["output" in r for r in records] == [True, False, True]


def test_a_tokenizer_saved_to_clean_up_spaces_decodes_as_transformers(tmp_path):
    """A causal LM whose tokenizer says clean_up_tokenization_spaces writes "a ," as transformers does: "a,"."""
    from transformers import AutoTokenizer

    tokenizer = _tokenizer()
    tokenizer.clean_up_tokenization_spaces = True
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=False))
    comma = tokenizer.encode(" ,", add_special_tokens=False)[-1]
    with torch.no_grad():  # every state the same vector, whose best token is " ,": the model writes " , , ,"
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.normal_()
        model.lm_head.weight[comma] = 10 * model.transformer.ln_f.bias
    model.save_pretrained(tmp_path / "ck")
    tokenizer.save_pretrained(tmp_path / "ck")
    assert export_causal_lm(tmp_path / "ck", tmp_path / "lm", max_output_tokens=8).clean_up_spaces
    (got,) = Generator.load(tmp_path / "lm").generate_batch([PROMPTS[0]], max_new_tokens=6)
    assert got.text == AutoTokenizer.from_pretrained(tmp_path / "ck").decode(got.token_ids, skip_special_tokens=True)
    assert got.text == "," * 6
    generator = Generator.load(tmp_path / "lm")  # a stop string is found in the text as it is written
    (stopped,) = generator.generate_batch([PROMPTS[0]], max_new_tokens=6, stop=[",,,"])
    assert stopped.text == "" and len(stopped.token_ids) == 3


def test_a_failure_of_lmcors_own_is_not_blamed_on_the_prompts(bundle, monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("a bug of lmcor's")

    generator = Generator.load(bundle)
    monkeypatch.setattr(generator, "_take", broken)
    with pytest.raises(TypeError, match="a bug of lmcor's"):
        generator.generate_batch(PROMPTS[:2], max_new_tokens=4, errors="return")


def _count_calls(generator: Generator) -> dict:
    """{"n": the generator's model calls from now on} (reset it by assigning 0)."""
    calls = {"n": 0}
    run = generator.session.run

    def counted(*args, **kwargs):
        calls["n"] += 1
        return run(*args, **kwargs)

    generator.session.run = counted
    return calls


def test_drafts_give_the_same_tokens_in_fewer_calls(bundle):
    """Greedy drafts copied from the prompt are verified by the model: the same tokens with them
    as without, and fewer decoder calls where the answer repeats the prompt (here each prompt
    ends with the random model's own looping answer, so it goes on copying it)."""
    generator = Generator.load(bundle)
    first = generator.generate_batch(PROMPTS, max_new_tokens=16, drafts=False)
    prompts = [p + g.text for p, g in zip(PROMPTS, first) if g.text.strip()]
    calls = _count_calls(generator)
    results = {}
    for drafts in (False, True):
        calls["n"] = 0
        results[drafts] = ([g.token_ids for g in generator.generate_batch(prompts, max_new_tokens=16, batch_size=2,
                                                                           drafts=drafts)], calls["n"])
    assert results[True][0] == results[False][0]
    assert results[True][1] < results[False][1]


def test_causal_lm_fp16_export_runs_on_cpu_within_its_tolerance(checkpoint, bundle, tmp_path, capsys):
    """fp16 through the CLI: half-precision matrix products, fp32 inputs and outputs, validated against
    PyTorch fp32 (logits and greedy tokens) and recorded in the manifest; it generates as the fp32 bundle
    does on prompts it was not validated on, within the recorded agreement."""
    import onnx
    from lmcor.runtime.bundle import load_manifest
    from onnx import TensorProto

    out = tmp_path / "fp16"
    assert main(["export", str(checkpoint), str(out), "--kind", "causal-lm", "--precision", "fp16",
                 "--max-output-tokens", "16"]) == 0
    said = capsys.readouterr().err
    manifest = load_manifest(out, kind="causal-lm")
    v = manifest.validation
    assert "causal LM fp16" in said and f"max |next-token logit diff| {v['max_abs_logit_diff']:.2g} from" in said
    assert manifest.precision == "fp16" and v["validated_on"] == "cpu" and v["half_matmuls"] > 0
    assert v["max_abs_logit_diff"] <= v["tolerance"] and v["greedy_token_agreement"] >= v["min_greedy_token_agreement"]
    graph = onnx.load(str(out / manifest.files["model"])).graph
    assert all(value.type.tensor_type.elem_type == TensorProto.FLOAT for value in (*graph.input, *graph.output)
               if value.name != "input_ids" and "mask" not in value.name and "position" not in value.name)
    assert any(t.data_type == TensorProto.FLOAT16 for t in graph.initializer)
    # A rotary embedding's angles stay fp32: in fp16, positions past 2048 are not whole numbers
    typed = onnx.shape_inference.infer_shapes(onnx.load(str(out / manifest.files["model"])))
    types = {v.name: v.type.tensor_type.elem_type for v in (*typed.graph.value_info, *typed.graph.input)}
    angles = [n for n in graph.node if n.op_type == "MatMul" and "rotary" in n.name]
    assert len(angles) == (checkpoint.name.startswith("llama"))
    assert all(types[name] == TensorProto.FLOAT for n in angles for name in n.input)
    half, full = Generator.load(out), Generator.load(bundle)
    same = [a.token_ids == b.token_ids for a, b in zip(half.generate_batch(PROMPTS, max_new_tokens=8),
                                                       full.generate_batch(PROMPTS, max_new_tokens=8))]
    assert sum(same) >= v["min_greedy_token_agreement"] * len(PROMPTS)


def test_causal_lm_export_refuses_int8(checkpoint, tmp_path, capsys):
    assert main(["export", str(checkpoint), str(tmp_path / "q"), "--kind", "causal-lm", "--precision", "int8"]) == 2
    assert "precision must be one of fp32, fp16, bf16" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_a_sliding_window_and_several_end_tokens_answer_as_generate(tmp_path):
    """A Mistral with a sliding window shorter than its answers, whose generation config ends answers on
    two tokens: with drafts asked for (they are off for such a model: rejected drafts would take slots
    of the window), batched answers equal `generate`'s, and each ends at whichever end token comes first."""
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, sliding_window=6))
    ends = [2, *tokenizer.encode(" school", add_special_tokens=False)[:1]]
    model.generation_config.eos_token_id = ends
    model.save_pretrained(tmp_path / "ck")
    tokenizer.save_pretrained(tmp_path / "ck")
    manifest = export_causal_lm(tmp_path / "ck", tmp_path / "lm", max_output_tokens=24)
    assert manifest.sliding_window == 6 and manifest.end_tokens == tuple(ends[1:])
    generator = Generator.load(tmp_path / "lm")
    calls = _count_calls(generator)
    answers = generator.generate_batch(PROMPTS, max_new_tokens=20, drafts=True)
    drafted, calls["n"] = calls["n"], 0
    assert [a.token_ids for a in generator.generate_batch(PROMPTS, max_new_tokens=20, drafts=False)] == [
        a.token_ids for a in answers] and calls["n"] == drafted > 0  # one token per call either way: no drafts
    model.generation_config.pad_token_id = manifest.special_tokens.pad
    for prompt, ours in zip(PROMPTS, answers):
        ids = torch.tensor([generator.encode(prompt)])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                                 do_sample=False)[0, ids.shape[1]:].tolist()
        assert ours.token_ids == next((out[:i] for i, t in enumerate(out) if t in ends), out), prompt
    # After a prefix, prompts of different lengths share no batch: padding between the prefix and a
    # shorter prompt would take slots of its window.
    prefix = generator.prefix("Rules: be brief.\nExample: foo -> bar\n")
    alone = [generator.generate_batch([p], prefix=prefix, max_new_tokens=12)[0].token_ids for p in PROMPTS]
    assert [a.token_ids for a in generator.generate_batch(PROMPTS, prefix=prefix, max_new_tokens=12)] == alone


def test_after_a_prefix_a_model_that_counts_positions_in_cache_slots_answers_as_the_whole_text(tmp_path):
    """MPT's graph takes no positions: its ALiBi distances count cache slots, and the padding between a
    prefix and a shorter prompt would lengthen them. Prompts of different lengths share no batch."""
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    model = MptForCausalLM(MptConfig(vocab_size=len(tokenizer), d_model=32, n_heads=4, n_layers=2, max_seq_len=256,
                                     expansion_ratio=2, bos_token_id=1, eos_token_id=2, pad_token_id=2))
    with torch.no_grad():  # larger weights: the attention, and so the distances, decide the tokens
        for parameter in model.parameters():
            parameter.mul_(5)
    model.save_pretrained(tmp_path / "ck")
    tokenizer.save_pretrained(tmp_path / "ck")
    export_causal_lm(tmp_path / "ck", tmp_path / "lm", max_output_tokens=16)
    generator = Generator.load(tmp_path / "lm")
    head, tails = "Correct the grammar.\nSentence:", [" she go to school every day and night", " a", " x y z x y z"]
    shared = generator.generate_batch(tails, prefix=generator.prefix(head), max_new_tokens=10, batch_size=3)
    for tail, ours in zip(tails, shared):
        ids = torch.tensor([generator.encode(head + tail)])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                 pad_token_id=2)[0, ids.shape[1]:].tolist()
        assert ours.token_ids == (out[: out.index(2)] if 2 in out else out), tail


def test_a_batch_stays_within_the_positions_its_graph_masks(tmp_path):
    """GPT-Neo sizes its causal mask by the model's positions: a long prompt and a short one that may
    write many tokens go to different batches, whose caches then fit; each answers as alone."""
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    GPTNeoForCausalLM(GPTNeoConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]],
        window_size=8, max_position_embeddings=48, bos_token_id=1, eos_token_id=2)).save_pretrained(tmp_path / "ck")
    tokenizer.save_pretrained(tmp_path / "ck")
    export_causal_lm(tmp_path / "ck", tmp_path / "lm", max_output_tokens=24)
    generator = Generator.load(tmp_path / "lm")
    long = " ".join(PROMPTS[:3] * 2)
    assert 30 < len(generator.encode(long)) < 48
    prompts = [long, "a", PROMPTS[0], long]
    alone = [generator.generate_batch([p])[0].token_ids for p in prompts]
    assert [g.token_ids for g in generator.generate_batch(prompts, batch_size=4)] == alone
    made = generator.prefix("Rules:")
    with pytest.raises(InputError, match="another model's Generator.prefix"):
        generator.generate_batch(["a"], prefix=Prefix(made.ids, made.past, made.gap, model="another model"))
    encoded, limits, _ = zip(*(generator._encode_prompt(p, None, 24, fit=True) for p in prompts))
    assert [len(batch) for batch in generator._batches([0, 1, 2, 3], dict(enumerate(encoded)), dict(enumerate(limits)),
                                                       [None] * 4, 4)] == [1, 2, 1]


def test_a_causal_lms_answers_fit_the_positions_its_bundle_reads(gpt2_checkpoint, tmp_path):
    """Prompt and answer share the bundle's max input tokens: a smaller --max-input-tokens lowers the
    default answer limit with it, and an answer limit that could never fit is refused."""
    from lmcor.runtime.errors import ExportError

    manifest = export_causal_lm(gpt2_checkpoint, tmp_path / "lm", max_input_tokens=16)
    assert (manifest.max_input_tokens, manifest.max_output_tokens) == (16, 15)
    assert len(Generator.load(tmp_path / "lm").generate_batch(["a"], max_new_tokens=15)[0].token_ids) <= 15
    for limits, said in (({"max_input_tokens": 16, "max_output_tokens": 16}, "--max-output-tokens 16: a causal LM's "
                          "answer shares the bundle's 16 positions"),
                         ({"max_input_tokens": 1}, "--max-input-tokens 1: a causal LM's positions hold")):
        with pytest.raises(ExportError, match=said):
            export_causal_lm(gpt2_checkpoint, tmp_path / "refused", **limits)
        assert not (tmp_path / "refused").exists()


def test_export_checks_each_prompt_alone_too(checkpoint, tmp_path, monkeypatch):
    """The manifest says the tokens were checked alone and batched: a bundle whose prompts decode
    differently alone is refused."""
    import dataclasses

    from lmcor.runtime.errors import ExportError
    from lmcor.runtime.generator import Generator

    real = Generator.generate_batch

    def wrong_alone(self, prompts, **options):
        out = real(self, prompts, **options)
        if options.get("batch_size") == 1:
            out[0] = dataclasses.replace(out[0], token_ids=[*out[0].token_ids, 3])
        return out

    monkeypatch.setattr(Generator, "generate_batch", wrong_alone)
    with pytest.raises(ExportError, match="differ from PyTorch on sample 0 alone"):
        export_causal_lm(checkpoint, tmp_path / "lm", max_output_tokens=16)


def test_checkpoints_of_few_positions_a_far_bos_and_generation_settings_export_as_said(tmp_path, caplog):
    """An MPT and a GPT-Neo of 24 positions export (traced on a sample past and prompt that fit them,
    where 16 + 16 did not) and answer as `generate`; GPT-2's default BOS past a small vocabulary (only
    recorded) takes EOS's place; a generation setting that changes `generate`'s tokens is named (a
    repetition penalty); a Falcon of grouped key/value heads is refused by name."""
    from lmcor.runtime.errors import ExportError

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    tiny = dict(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2)
    for name, model in (
            ("mpt", MptForCausalLM(MptConfig(**tiny, d_model=32, n_heads=4, n_layers=2, max_seq_len=24, expansion_ratio=2))),
            ("neo", GPTNeoForCausalLM(GPTNeoConfig(**tiny, hidden_size=32, num_layers=2, num_heads=4, window_size=6,
                                                   attention_types=[[["global", "local"], 1]],
                                                   max_position_embeddings=24)))):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        assert export_causal_lm(tmp_path / name, tmp_path / f"{name}-lm").max_input_tokens == 24  # validated
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=4, n_positions=64,
                                       eos_token_id=2))
    assert model.config.bos_token_id == 50256 > len(tokenizer)
    model.generation_config.repetition_penalty = 1.3
    model.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    caplog.set_level("WARNING", "lmcor")
    assert export_causal_lm(tmp_path / "gpt2", tmp_path / "gpt2-lm").special_tokens.decoder_start == 2
    assert "generation_config.repetition_penalty=1.3 is not applied by lmcor" in caplog.text
    falcon = FalconForCausalLM(FalconConfig(**tiny, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                            num_kv_heads=2, new_decoder_architecture=True))
    falcon.save_pretrained(tmp_path / "falcon")
    tokenizer.save_pretrained(tmp_path / "falcon")
    with pytest.raises(ExportError, match="a Falcon of grouped key/value heads .2 for 4 query heads"):
        export_causal_lm(tmp_path / "falcon", tmp_path / "falcon-lm")
    assert not (tmp_path / "falcon-lm").exists()
    phi = PhiForCausalLM(PhiConfig(**tiny, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2))
    phi.save_pretrained(tmp_path / "phi")
    tokenizer.save_pretrained(tmp_path / "phi")
    with pytest.raises(ExportError, match="a Phi of grouped key/value heads .2 for 4 query heads"):
        export_causal_lm(tmp_path / "phi", tmp_path / "phi-lm")
