"""The default corrector's data: corpus parsing, deterministic splits (the noise model: test_noise.py)."""

import pytest
from lmcor.recipes import corpus
from test_noise import SENTENCES



def test_wordnet_examples_are_restored(tmp_path):
    header = "  1 This software and database is being provided to you\n"
    entry = ('00002724 29 v 01 choke 0 002 @ 00001740 v 0000 01 + 02 00 | breathe with great difficulty; '
             '"she choked with emotion when she spoke"; "the baby choked"  \n')
    for part in ("noun", "verb", "adj", "adv"):
        (tmp_path / f"data.{part}").write_text(header + (entry if part == "verb" else ""))
    assert list(corpus.wordnet_sentences(tmp_path)) == ["She choked with emotion when she spoke.", "The baby choked."]


def test_fortunes_are_split_into_usable_sentences(tmp_path):
    (tmp_path / "wisdom").write_text(
        "A clash of doctrine is not a disaster -- it is an opportunity.  Is it not?\n\t\t-- Someone\n%\n"
        "ALL CAPS HEADING HERE NOW.\n%\nNo.\n"
    )
    found = [s for s in corpus.fortune_sentences(tmp_path, ["wisdom"]) if corpus.usable(s)]
    assert found == ["A clash of doctrine is not a disaster -- it is an opportunity."]


def test_license_texts_are_split_into_sentences_each_text_once(tmp_path):
    (tmp_path / "GPL-3").write_text("You may copy it.\n  You may not\nsublicense it.  END OF TERMS\n")
    (tmp_path / "GPL").symlink_to(tmp_path / "GPL-3")  # Debian's alias of the latest version
    found = [s for s in corpus.license_sentences(tmp_path) if corpus.usable(s)]
    assert found == ["You may copy it.", "You may not sublicense it."]


def test_package_docstrings_are_read_in_every_subfolder_and_a_missing_package_is_named(tmp_path):
    from lmcor.runtime.errors import LmcorError

    (tmp_path / "sub").mkdir()
    (tmp_path / "top.py").write_text('"""Top level sentence here."""\n')
    (tmp_path / "sub" / "inner.py").write_text('def f():\n    """Return the inner value.  Another one follows."""\n')
    assert list(corpus.docstring_sentences(tmp_path)) == ["Top level sentence here."]
    assert list(corpus.docstring_sentences(tmp_path, recursive=True)) == [
        "Return the inner value.", "Another one follows.", "Top level sentence here."]
    assert next(corpus.package_sentences(["tqdm"]))  # an installed package's
    with pytest.raises(LmcorError, match="the package no_such_package_here is not installed"):
        next(corpus.package_sentences(["no_such_package_here"]))


def test_split_is_a_pure_function_of_the_sentence():
    """The same in every process (the shipped splits were written by another): a salted hash would not be."""
    import json
    from pathlib import Path

    splits = Path(corpus.__file__).parent / "splits"
    for name in ("dev", "test"):
        with open(splits / f"{name}.jsonl", encoding="utf-8") as f:
            targets = [json.loads(next(f))["target"] for _ in range(3)]
        assert [corpus.split_of(t) for t in targets] == [name] * 3
    assert {corpus.split_of(s) for s in SENTENCES} <= {"train", "dev", "test"}


def test_copy_init_starts_from_a_working_copier():
    import torch
    from lmcor.recipes.train import Settings, build_model, copy_init

    model = build_model(Settings(), vocab_size=500)
    copy_init(model, seed=0)
    rng = torch.Generator().manual_seed(1)
    span = torch.randint(11, 500, (30,), generator=rng)
    candidates = torch.cat([span, torch.tensor([3]), span, torch.tensor([1])])  # two copies, a separator, EOS
    decoder = torch.cat([torch.tensor([0]), span])
    with torch.no_grad():
        logits = model(input_ids=candidates[None], decoder_input_ids=decoder[None]).logits[0]
    # From the third token on, the last two outputs locate the next token in the input.
    predicted = logits.argmax(-1)[2:-1]
    assert (predicted == span[2:]).float().mean() > 0.9


def test_the_default_mixture_draws_the_llm_share_and_every_candidate_model():
    from lmcor.recipes.noise import Example
    from lmcor.recipes.train import _mixture

    sentences = ["The cat sat on the mat.", "We went to the station at noon.", "She reads a book every evening."]
    llm = [Example(f"llm source {n}", ["a", "b"], f"LLM target {n}.") for n in range(7)]
    drawn = [e for e, _ in zip(_mixture(sentences, llm, 0.4, seed=3), range(2000))]
    from_llm = [e for e in drawn if e.source.startswith("llm source")]
    assert 0.35 < len(from_llm) / len(drawn) < 0.45
    assert {e.source for e in from_llm} == {e.source for e in llm}  # cycled through, every one used
    synthetic = [e for e in drawn if e not in from_llm]
    assert {e.target for e in synthetic} <= set(sentences) and len({tuple(e.candidates) for e in synthetic}) > 50


def test_joined_examples_hold_sentences_in_a_row_within_the_word_limit():
    import random

    from lmcor.recipes import data
    from lmcor.recipes.noise import make_example

    sentences = [f"Sentence number {n} has a few more words in it." for n in range(40)]
    sentences += ["word " * 45 + "end."] * 4  # too long to join with another
    drawn = [e for e, _ in zip(data.endless(sentences, seed=1, join=0.5), range(400))]
    held = [sum(s in e.target for s in set(sentences)) for e in drawn]
    assert 0.3 < sum(n > 1 for n in held) / len(drawn) < 0.6 and max(held) == 3
    assert all(len(e.target.split()) <= data.JOINED_WORDS or n == 1 for e, n in zip(drawn, held))
    seen: list[str] = []  # the first epoch's sentences: each once, none skipped
    for e in data.endless(sentences, seed=1, join=0.5):
        seen += [s for s in set(sentences) for _ in range(e.target.count(s))]
        if len(seen) >= len(sentences):
            break
    assert sorted(seen) == sorted(sentences)
    assert data.joined(["a b", "c d e", "f"]) == ("a b c d e f", 3)
    assert data.joined(["w " * 30, "x " * 30]) == ("w " * 30, 1)
    # the fixed long-input split: the sentences three at a time in their order, each once
    assert data.in_rows(["a.", "b.", "c.", "d.", "w " * 30, "x " * 30]) == ["a. b. c.", "d. " + "w " * 30, "x " * 30]
    # without joining, the stream is the one the recipe drew before joining existed
    rng, order = random.Random(1), list(sentences)
    rng.shuffle(order)
    before = [make_example(s, rng, "shared") for s in order[:20]]
    assert [e for e, _ in zip(data.endless(sentences, seed=1), range(20))] == before


def test_related_examples_pair_a_sentence_with_another_sharing_a_stem():
    import random

    from lmcor.recipes import data

    sentences = ["The module is loaded.", "Modules are cached here.", "A cat sat.", "Another cat slept.",
                 "Nothing shared by this one."]
    stems = data.stem_index(sentences)
    # words of more than five letters, by their first five; a stem of one sentence alone is left out
    assert stems == {"modul": ["The module is loaded.", "Modules are cached here."]}
    rng = random.Random(0)
    assert data.related_to("The module is loaded.", stems, rng) == "Modules are cached here."
    assert data.related_to("Nothing shared by this one.", stems, rng) is None
    drawn = [e.target for e, _ in zip(data.endless(sentences, seed=2, join=1.0, related=1.0), range(50))]
    assert "The module is loaded. Modules are cached here." in drawn
    assert "Modules are cached here. The module is loaded." in drawn
    # a sentence with a partner is joined to it alone; the others still join the sentences after them
    assert all(t in ("The module is loaded. Modules are cached here.", "Modules are cached here. The module is loaded.")
               for t in drawn if t.startswith(("The module", "Modules")))
    assert any(t.startswith(("A cat", "Another cat", "Nothing")) and t.count(".") > 1 for t in drawn)


def test_the_train_recipe_refuses_a_device_it_cannot_use_before_any_work(tmp_path, capsys):
    import pytest
    import torch

    from lmcor.recipes.train import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["--out", str(tmp_path / "run"), "--device", "cuda"]) == 2
    assert "--device cuda: this PyTorch sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_train_recipe_takes_sigterm_as_ctrl_c(tmp_path, monkeypatch):
    """SIGTERM stops the recipe as Ctrl-C does (`fit` saves the step reached on KeyboardInterrupt),
    exit status 143; before, it was killed with up to 5 minutes of training unsaved."""
    import os
    import signal
    import time

    from lmcor.recipes import train

    reached = []

    def training(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except KeyboardInterrupt:
            reached.append("saved")
            raise

    monkeypatch.setattr(train, "train", training)
    previous = signal.getsignal(signal.SIGTERM)
    assert train.main(["--out", str(tmp_path / "run"), "--minutes", "1"]) == 143
    assert reached == ["saved"] and signal.getsignal(signal.SIGTERM) is previous


def test_the_train_recipe_refuses_bad_arguments_before_any_work(tmp_path, capsys, checkpoints):
    """--minutes inf (a traceback after the data work), --llm-share past 1, an --init that is no local
    T5 folder: each one line, and nothing written."""
    import shutil

    import pytest
    from lmcor.recipes.train import main

    not_t5 = tmp_path / "bart"
    shutil.copytree(checkpoints["bart"], not_t5)
    for args, said in ((["--minutes", "inf"], "--minutes must be a number of minutes above 0, got inf"),
                       (["--init", str(tmp_path / "nowhere")], "not a Hugging Face checkpoint folder"),
                       (["--init", str(not_t5)], "a 'bart' checkpoint; this recipe continues T5 models")):
        assert main(["--out", str(tmp_path / "run"), *args]) == 2, args
        assert said in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "run"), "--llm-share", "5"])
    assert "a share from 0 to 1, got 5" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_an_interrupted_smollm2_conversion_is_done_again(tmp_path, monkeypatch):
    """The checkpoint is written beside its folder and renamed: one cut short (its config.json first,
    then half a gigabyte of weights) was taken for a whole one by every later run."""
    import pytest
    import transformers

    from lmcor.recipes import smollm2

    class Saved:
        def __init__(self, fail: bool):
            self.fail = fail

        def save_pretrained(self, folder):
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text("{}")
            if self.fail:
                raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "gguf_path", lambda: tmp_path / "model.gguf")  # the package is not needed here
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Saved(False))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: Saved(True))
    with pytest.raises(KeyboardInterrupt):
        smollm2.convert(tmp_path / "cache")
    assert not (tmp_path / "cache" / "hf").exists()
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: Saved(False))
    assert smollm2.convert(tmp_path / "cache") == tmp_path / "cache" / "hf"
    assert (tmp_path / "cache" / "hf" / "config.json").is_file() and not (tmp_path / "cache" / "hf.partial").exists()
