"""Classifier bundles (BERT and RoBERTa families): probabilities equal PyTorch's, for single texts and pairs,
batched or not."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from lmcor.export.classifier import export_classifier
from lmcor.runtime.bundle import shipped_bundle
from lmcor.runtime.classifier import Classifier
from lmcor.runtime.tokens import MAX_CHARS_PER_TOKEN, cut_to_read
from lmcor.runtime.errors import InputError
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    AutoModelForSequenceClassification,
    BartConfig,
    BartForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from lmcor.cli import main

TEXTS = ["def add(a, b):\n    return a - b", "She goes to school every day.", "for i in range(10): print(i)",
         "x", "The results was suprising, and nobody expected them at all, not even the people who ran it. " * 3]
PAIRS = [(t, TEXTS[(i + 1) % len(TEXTS)]) for i, t in enumerate(TEXTS)]


def _bert():
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(TEXTS * 20, trainers.WordPieceTrainer(vocab_size=300, special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=24)
    config = BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=64, **LABELS)
    return fast, BertForSequenceClassification(config)


def _roberta():
    """CodeBERT's family: byte-level BPE, `<s> A </s></s> B </s>`, no token types, positions offset by the pad id."""
    fast = _byte_bpe(pairs=True)
    config = RobertaConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=48, max_position_embeddings=64, type_vocab_size=1, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2, **LABELS)
    return fast, RobertaForSequenceClassification(config)


LABELS = {"num_labels": 3, "id2label": {0: "ok", 1: "fix", 2: "other"}, "label2id": {"ok": 0, "fix": 1, "other": 2}}


@pytest.fixture(scope="module", params=["bert", "roberta"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    tokenizer, model = {"bert": _bert, "roberta": _roberta}[request.param]()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bundle(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundles") / "bert"
    export_classifier(checkpoint, out)
    return out


def _torch(checkpoint, items):
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint)
    out = []
    for text, pair in items:
        encoded = tokenizer(text, pair, return_tensors="pt", truncation=True, max_length=24)
        if model.config.model_type == "bart":  # BART takes no token types
            encoded.pop("token_type_ids", None)
        with torch.no_grad():
            out.append(torch.softmax(model(**encoded).logits[0], -1).numpy())
    return np.stack(out)


def _byte_bpe(pairs: bool):
    """RoBERTa's and BART's byte-level BPE (`<s> A </s></s> B </s>` with `pairs`), or a decoder-only model's."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok.train_from_iterator(TEXTS * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=special,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if pairs:
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   sep_token="</s>", cls_token="<s>", pad_token="<pad>", mask_token="<mask>",
                                   model_max_length=24)


def _llama():
    """A decoder-only classifier reads its last token that is not padding, whose id here is not 0."""
    fast = _byte_bpe(pairs=False)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=2,
                         bos_token_id=0, eos_token_id=2, initializer_range=0.5, **LABELS)
    return fast, LlamaForSequenceClassification(config)


def _bart():
    """BART's head reads each row's last EOS: a pair holds three, a text one."""
    fast = _byte_bpe(pairs=True)
    config = BartConfig(vocab_size=len(fast), d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2, init_std=0.5, **LABELS)
    return fast, BartForSequenceClassification(config)


@pytest.mark.parametrize("build", [_llama, _bart])
def test_classifiers_whose_heads_read_padding_or_eos_match_pytorch_in_any_batch(build, tmp_path):
    torch.manual_seed(0)
    tokenizer, model = build()
    model.save_pretrained(tmp_path / "ck")
    tokenizer.save_pretrained(tmp_path / "ck")
    export_classifier(tmp_path / "ck", tmp_path / "bundle")  # its validation compares batched and alone
    items = [(t, None) for t in TEXTS[:4]] + PAIRS[:3]
    got = Classifier.load(tmp_path / "bundle").classify_batch(items, batch_size=8)
    np.testing.assert_allclose(np.stack([r.probabilities for r in got]), _torch(tmp_path / "ck", items), atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_probabilities_match_pytorch(checkpoint, bundle, batch_size):
    classifier = Classifier.load(bundle)
    assert classifier.labels == ("ok", "fix", "other") and classifier.manifest.validation["fused"]
    items = [(t, None) for t in TEXTS] + PAIRS
    expected = _torch(checkpoint, items)
    got = classifier.classify_batch(items, batch_size=batch_size)
    np.testing.assert_allclose(np.stack([r.probabilities for r in got]), expected, atol=1e-5)
    assert [r.label for r in got] == [classifier.labels[i] for i in expected.argmax(1)]
    assert got[4].truncated and not got[1].truncated  # the long text exceeds 24 tokens


def test_bad_items_are_named_and_the_rest_classified(bundle):
    classifier = Classifier.load(bundle)
    got = classifier.classify_batch([{"text": "a"}, {"pair": "b"}, 3, {"text": "a", "pair": 5}], errors="return")
    assert got[0].label in classifier.labels
    assert [str(e) for e in got[1:]] == ["missing field 'text'", "expected a text, a (text, pair) pair or an object "
                                          "with 'text', got a number", "field 'pair' must be a string, got a number"]
    with pytest.raises(InputError, match="item 1: missing field 'text'"):
        classifier.classify_batch(["a", {"pair": "b"}])


def test_int8_export_records_its_agreement_and_scores_each_text_alike_in_any_batch(checkpoint, tmp_path):
    manifest = export_classifier(checkpoint, tmp_path / "int8", precision="int8")
    assert manifest.precision == "int8" and 0.0 <= manifest.validation["int8_label_agreement"] <= 1.0
    from lmcor.export.classifier import _FUSIONS

    # `fused` describes the fp32 graph whose log-probabilities were validated (it was overwritten)
    assert manifest.validation["fused"] is (manifest.architecture in _FUSIONS)
    classifier = Classifier.load(tmp_path / "int8")
    assert classifier.classify("hello").label in manifest.labels
    # A short text beside a long one: per-tensor quantization would let the long one set its scale.
    items = ["hello", ("def f(x):\n    return [y * 1000 for y in range(x)]" * 4, "for i in range(10): print(i)"), "a b"]
    together = classifier.classify_batch(items, batch_size=len(items))
    for item, got in zip(items, together):
        assert np.array_equal(classifier.classify_batch([item])[0].probabilities, got.probabilities)


def test_cli_export_and_classify_round_trip(checkpoint, tmp_path, capsys):
    out = tmp_path / "bundle"
    assert main(["export", "--kind", "classifier", str(checkpoint), str(out)]) == 0
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 1, "text": "hello"}\nnot json\n{"text": "a b", "pair": "c"}\n')
    assert main(["classify", "--model", str(out), str(source), "-o", str(tmp_path / "o.jsonl"), "-q"]) == 1
    records = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3] and "not valid JSON" in records[1]["error"]
    assert records[0]["id"] == 1 and len(records[2]["probabilities"]) == 3
    assert "1 line(s) could not be answered" in capsys.readouterr().err


def test_classify_resume_continues_its_own_records_at_another_batch_size(bundle, tmp_path, capsys):
    """--resume answers the last line again, alone: the probabilities a batch gave it agree (to the
    check's tolerance), and another model's do not."""
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("hello", "a b c d e f", "x", "some more words")))
    whole, out = tmp_path / "whole.jsonl", tmp_path / "out.jsonl"
    assert main(["classify", "--model", str(bundle), str(source), "-o", str(whole), "-q", "--batch-size", "4"]) == 0
    out.write_text("".join(whole.read_text().splitlines(keepends=True)[:2]))
    assert main(["classify", "--model", str(bundle), str(source), "-o", str(out), "-q", "--resume", "--batch-size", "1"]) == 0
    assert [json.loads(line)["label"] for line in out.read_text().splitlines()] == \
        [json.loads(line)["label"] for line in whole.read_text().splitlines()]
    first = json.loads(whole.read_text().splitlines()[0])
    first["probabilities"] = first["probabilities"][::-1] if first["probabilities"][0] != first["probabilities"][-1] \
        else [p + 0.1 for p in first["probabilities"]]
    out.write_text(json.dumps(first) + "\n")  # as another model would answer it
    assert main(["classify", "--model", str(bundle), str(source), "-o", str(out), "-q", "--resume"]) == 2
    assert "answers line 1 with the probabilities" in capsys.readouterr().err


def _gate(checkpoint, path, right_logit: float) -> Classifier:
    """A gate whose probability of "right" is sigmoid(right_logit) for every input."""
    # Positions for the whole of the tests' requests (a gate passes no candidate it reads only in part);
    # new ones are random, which the zeroed head ignores.
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint, num_labels=2, ignore_mismatched_sizes=True,
                                                               id2label={0: "needs correction", 1: "right"},
                                                               label2id={"needs correction": 0, "right": 1},
                                                               max_position_embeddings=258)
    head = getattr(model.classifier, "out_proj", model.classifier)  # RoBERTa's head ends in out_proj
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, right_logit]))
    model.save_pretrained(path / "hf")
    PreTrainedTokenizerFast.from_pretrained(checkpoint, model_max_length=int(1e30)).save_pretrained(path / "hf")
    export_classifier(path / "hf", path / "gate")
    return Classifier.load(path / "gate")


def _edited(count: int, seed: int) -> list[dict]:
    """Requests whose first candidate edits its source (a gate passes no other: `classifier.GATE_MIN_SHARED`)."""
    from conftest import make_requests

    return [{**r, "candidates": [r["source"].replace("e", "a", 1), *r["candidates"][1:]]}
            for r in make_requests(count, seed)]


@pytest.mark.parametrize("verdict", ["right", "needs correction"])
def test_a_gate_skips_the_corrector_for_right_candidates(checkpoint, bundles, tmp_path, verdict):

    from lmcor import Corrector

    gate = _gate(checkpoint, tmp_path, 20.0 if verdict == "right" else -20.0)
    corrector = Corrector.load(bundles["t5"])
    requests = _edited(4, seed=1)
    got = corrector.correct_batch(requests, gate=gate, max_new_tokens=5)
    plain = corrector.correct_batch(requests, max_new_tokens=5)
    if verdict == "right":
        assert all(c.gated for c in got) and [c.text for c in got] == [r["candidates"][0] for r in requests]
    else:
        assert not any(c.gated for c in got) and [c.text for c in got] == [c.text for c in plain]


def test_a_request_the_corrector_cannot_read_is_refused_whatever_the_gate(checkpoint, bundles, tmp_path):
    """More candidates than the corrector's input tokens (the gate reads the first and how many agree),
    or a source too long for it, is refused behind a gate that passes every request as without one (in
    every path): whether a request is refused is not the gate's verdict. The others are gated as ever."""
    from lmcor import Corrector, InputError

    gate = _gate(checkpoint, tmp_path, 20.0)  # "right" for every text it reads
    corrector = Corrector.load(bundles["t5"])
    most = corrector.manifest.max_input_tokens
    requests = _edited(3, seed=2)
    requests[1] = {**requests[1], "candidates": requests[1]["candidates"][:1] * most}  # the gate reads them
    requests.append({**requests[0], "source": "word " * (4 * most * 10)})  # nor it this: cut, it passes none
    plain = corrector.correct_batch(requests, max_new_tokens=4, errors="return")
    got = corrector.correct_batch(requests, gate=gate, max_new_tokens=4, errors="return")
    futures = [corrector.engine.submit(r, gate=gate) for r in requests]
    online = [f.exception(timeout=120) or f.result() for f in futures]
    for answers in (got, online):
        assert [type(a) for a in answers] == [type(a) for a in plain]
        assert [str(a) for a in answers if isinstance(a, InputError)] == [str(a) for a in plain if isinstance(a, InputError)]
        assert [a.gated for a in answers if not isinstance(a, InputError)] == [True, True]
    assert "candidates cannot fit" in str(got[1]) and "the source is never cut" in str(got[3])
    with pytest.raises(InputError, match="item 1: .* candidates cannot fit"):
        corrector.correct_batch(requests, gate=gate, max_new_tokens=4)


def test_a_text_the_gate_cannot_read_is_corrected_and_fails_no_other(checkpoint, bundles, tmp_path):
    """A first candidate holding a token the gate's embeddings lack (its export warns) is not gated: the
    corrector answers it, and the requests gated with it are gated as ever, in every path (the
    engine's submissions too)."""
    from lmcor import Corrector
    from lmcor.runtime.classifier import right_probabilities

    _gate(checkpoint, tmp_path, 20.0)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / "hf")
    vocabulary = json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"]
    tokenizer.add_tokens([f"<unused{n}>" for n in range(vocabulary - len(tokenizer))] + ["zzznew"])  # not resized
    tokenizer.save_pretrained(tmp_path / "hf")
    export_classifier(tmp_path / "hf", tmp_path / "unread", overwrite=True)
    gate = Classifier.load(tmp_path / "unread")
    corrector = Corrector.load(bundles["t5"])
    requests = _edited(3, seed=4)
    requests[1] = {**requests[1], "candidates": ["zzznew " + requests[1]["candidates"][0]]}  # read: before the cut
    probabilities = right_probabilities(gate, [(r["source"], r["candidates"]) for r in requests])
    assert probabilities[1] is None and probabilities[0] > 0.99 and probabilities[2] > 0.99
    got = corrector.correct_batch(requests, gate=gate, max_new_tokens=4, errors="return")
    assert [c.gated for c in got] == [True, False, True]
    assert got[1].text == corrector.correct_batch([requests[1]], max_new_tokens=4)[0].text
    futures = [corrector.engine.submit(r, gate=gate) for r in requests]
    assert [f.result(timeout=120).gated for f in futures] == [True, False, True]


def test_the_gate_recipe_and_bench_pass_what_the_runtime_passes(checkpoint, bundles, tmp_path):
    """A refusal ("Sure!") or a blank first candidate is never gated at run time: calibration and the
    bench count it as not passed, and a blank one fails neither."""
    from lmcor.bench.gate import compare
    from lmcor.bench.quality import Item
    from lmcor.recipes.gate import calibrate

    from lmcor import Corrector

    gate = _gate(checkpoint, tmp_path, 20.0)  # "right" for every text it reads
    corrector = Corrector.load(bundles["t5"])
    items = [Item(0, "it rains today", ("Sure!", "Sure!"), "It rains today."),
             Item(1, "she go home", (" ", "She goes home."), "She goes home."),
             Item(2, "she go home", ("She goes home.", "She goes home."), "She goes home."),
             # a source without words: a candidate that writes some holds none of it; one without, all
             Item(3, "— !!", ("I cannot help with that.", "I cannot help with that."), "— !"),
             Item(4, "— !!", ("— !", "— !"), "— !")]
    _, tried = calibrate(gate, corrector, items, tolerance=0.5)
    assert tried[0]["passed"] == 2 / 5
    report = compare(gate, corrector, items, 0.5, rounds=1)
    assert report["gate"]["passed"] == 2 / 5
    gated = corrector.correct_batch([(i.source, i.candidates) for i in items], gate=gate, max_new_tokens=4)
    assert [c.gated for c in gated] == [False, False, True, False, True]
    for c in gated:  # every answer's time runs from the call, a gated one's as a decoded one's
        assert 0 < c.stats.latency_s and (not c.gated or c.stats.queued_s == c.stats.latency_s)


def test_the_gate_threshold_comes_from_the_bundle_unless_given(checkpoint, bundles, tmp_path):
    import dataclasses


    from lmcor import Corrector
    from lmcor.runtime.bundle import load_manifest, write_manifest

    gate = _gate(checkpoint, tmp_path, 1.0)  # P(right) = 0.73
    corrector = Corrector.load(bundles["t5"])
    requests = _edited(3, seed=2)
    assert all(c.gated for c in corrector.correct_batch(requests, gate=gate, max_new_tokens=3))  # 0.5 by default
    write_manifest(tmp_path / "gate", dataclasses.replace(gate.manifest, gate_threshold=0.8))
    calibrated = Classifier.load(tmp_path / "gate")
    assert load_manifest(tmp_path / "gate").gate_threshold == 0.8
    assert not any(c.gated for c in corrector.correct_batch(requests, gate=calibrated, max_new_tokens=3))
    assert all(c.gated for c in corrector.correct_batch(requests, gate=calibrated, gate_threshold=0.7, max_new_tokens=3))


def test_the_gate_recipe_calibrates_the_lowest_threshold_that_keeps_exact_match(checkpoint, bundles, tmp_path):
    from lmcor.bench.quality import Item
    from lmcor.recipes.gate import THRESHOLDS, calibrate

    from lmcor import Corrector

    corrector = Corrector.load(bundles["t5"])  # random weights: never exactly right
    items = [Item(n, f"a {n} b", (f"a {n} c", f"a {n} d"), f"a {n} c") for n in range(4)]  # first candidates are right
    threshold, tried = calibrate(_gate(checkpoint, tmp_path, 1.0), corrector, items, tolerance=0.5)
    assert threshold == 0.5 and [t["threshold"] for t in tried] == list(THRESHOLDS)
    assert tried[0]["exact_match"] == 100.0 and tried[0]["passed"] == 1.0 and tried[-1]["passed"] == 0.0


def test_the_gate_recipe_says_what_it_leaves_out_and_keeps_its_bundle_loadable(checkpoint, bundles, tmp_path, caplog,
                                                                              capsys):
    """Lines the corrector cannot read and bad lines are named and left out; a report written into the
    bundle's folder is no part of the bundle (a second run changed it, and the bundle failed its
    checksums); the data and flags are checked before any training."""
    from lmcor.recipes.gate import main as recipe

    _gate(checkpoint, tmp_path, 1.0)
    gate = tmp_path / "gate"
    rows = [dict(r, target=r["candidates"][0]) for r in _edited(4, seed=6)]
    dev, test = tmp_path / "dev.jsonl", tmp_path / "test.jsonl"
    dev.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]) + "garbage\n"
                   + json.dumps({"source": "word " * 3000, "candidates": ["a"], "target": "a"}) + "\n")
    test.write_text("".join(json.dumps(r) + "\n" for r in rows[2:]))
    flags = ["--recalibrate", str(gate), "--out", str(gate), "--corrector", str(bundles["t5"]), "--dev", str(dev),
             "--test", str(test)]
    with caplog.at_level("WARNING", logger="lmcor.recipes"):
        assert recipe(flags) == 0
    assert f"{dev}: 2 lines left out (line 3: " in caplog.text
    assert recipe(flags + ["--tolerance", "1"]) == 0  # report.json rewritten inside the bundle's folder
    assert Classifier.load(gate).manifest.gate_threshold is not None
    capsys.readouterr()
    assert recipe(["--out", str(tmp_path / "new"), "--dev", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err and not (tmp_path / "new").exists()
    for bad in (["--steps", "0"], ["--layers", "9"]):
        with pytest.raises(SystemExit):
            recipe(["--out", str(tmp_path / "new"), *bad])


def test_cli_eval_behind_a_gate(checkpoint, bundles, tmp_path, capsys):

    _gate(checkpoint, tmp_path, 20.0)  # always "right"
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(dict(r, target=r["candidates"][0])) + "\n" for r in _edited(3, seed=4)))
    out = tmp_path / "scores.json"
    assert main(["eval", "--model", str(bundles["t5"]), "--gate", str(tmp_path / "gate"), str(data), "--json", str(out),
                 "--max-new-tokens", "4"]) == 0
    assert "the gate passed 3 of 3 first candidates" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["gated"] == 3 and report["systems"]["corrector"]["exact_match"] == 100.0


def test_cli_bench_behind_a_gate(checkpoint, bundles, tmp_path, capsys):

    _gate(checkpoint, tmp_path, 20.0)  # always "right"
    requests = _edited(4, seed=5)
    data = tmp_path / "data.jsonl"  # the first candidate is the target in every other line
    data.write_text("".join(json.dumps(dict(r, target=r["candidates"][0] if n % 2 else "-")) + "\n"
                            for n, r in enumerate(requests)))
    assert main(["bench", "--gate", str(tmp_path / "gate"), "--bundle", str(bundles["t5"]), "--data", str(data),
                 "--rounds", "1", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "gate.json").read_text())
    assert report["items"] == 4 and report["threshold"] == 0.5
    assert report["gate"]["passed"] == 1.0 and report["gate"]["accuracy"] == report["gate"]["passed_right"] == 0.5
    assert report["systems"]["gate + corrector"]["exact_match"] == 50.0
    assert "time saved by the gate" in capsys.readouterr().out


def test_a_gate_needs_a_right_label(bundle, bundles):
    from conftest import make_requests

    from lmcor import BundleError, Corrector

    with pytest.raises(BundleError, match="must have a 'right' label"):
        Corrector.load(bundles["t5"]).correct_batch(make_requests(2, seed=1), gate=Classifier.load(bundle))


def test_cli_correct_with_a_gate(bundle, bundles, tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text('{"source": "a b", "candidates": ["a b"]}\n')
    assert main(["correct", "--model", str(bundles["t5"]), "--gate", str(bundle), str(source), "-q"]) == 2
    assert "must have a 'right' label" in capsys.readouterr().err


def test_vocabulary_pruning_keeps_what_the_data_uses(tmp_path):
    from lmcor.recipes.gate import prune_vocabulary
    from transformers import BertTokenizerFast

    fast, model = _bert()
    model.eval()
    (tmp_path / "vocab.txt").write_text("".join(p + "\n" for p in sorted(fast.get_vocab(), key=fast.get_vocab().get)))
    tokenizer = BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    texts = TEXTS[1:3]
    before = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    pruned = prune_vocabulary(model, tokenizer, texts, tmp_path / "pruned", min_count=1)
    assert len(pruned) < len(tokenizer) and model.get_input_embeddings().num_embeddings == len(pruned)
    assert [pruned.tokenize(t) for t in texts] == [tokenizer.tokenize(t) for t in texts]
    torch.testing.assert_close(model(**pruned(texts, padding=True, return_tensors="pt")).logits, before)
    # A word made of pieces the data never used still splits, into single characters, not [UNK].
    assert pruned.tokenize("def") == ["d", "##e", "##f"] and tokenizer.tokenize("def") == ["def"]


def test_cli_a_bare_gate_before_the_input_is_a_clear_error(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_text('{"source": "a b", "candidates": ["a b"]}\n')
    assert main(["correct", "--gate", str(source)]) == 2
    assert f"--gate took '{source}' as its bundle: put --gate after the input file" in capsys.readouterr().err
    assert main(["eval"]) == 2 and "no input file given" in capsys.readouterr().err


def test_a_text_the_tokenizer_drops_whole_is_refused_not_classified_as_nothing():
    """BERT's tokenizer deletes control characters and zero-width spaces: such a text (or pair) would
    be read as an empty one, and get a confident label for nothing."""
    gate = Classifier.load(shipped_bundle("gate"))
    got = gate.classify_batch(["\u0000", "She goes home.", ("She goes home.", "\u200b\u0007"), ("\ufeff", "x")],
                              errors="return")
    dropped = "holds no token the model reads: its tokenizer drops every character of it"
    assert [str(e) for e in got[::2]] + [str(got[3])] == [f"field 'text' {dropped}", f"field 'pair' {dropped}",
                                                          f"field 'text' {dropped}"]
    assert got[1].label in gate.labels
    # a text cut to nothing by the model's positions (a bundle made by hand) is no text the tokenizer dropped
    gate.manifest = dataclasses.replace(gate.manifest, max_input_tokens=2)
    assert gate.classify("She goes home.").truncated


def test_validation_cuts_the_reference_as_the_bundle_cuts_and_an_empty_pair_is_none(checkpoint, bundle, tmp_path):
    """Below the tokenizer's own limit (or where it has none), `--max-input-tokens` cuts PyTorch's
    reference too; an empty pair is no pair, as transformers' tokenizers take it."""
    manifest = export_classifier(checkpoint, tmp_path / "short", max_input_tokens=8)
    assert manifest.max_input_tokens == 8 and manifest.validation["max_abs_logprob_diff"] < 1e-3
    classifier = Classifier.load(bundle)
    [alone] = classifier.classify_batch([TEXTS[1]])
    [empty] = classifier.classify_batch([(TEXTS[1], "")])
    assert np.array_equal(alone.probabilities, empty.probabilities)
    assert np.allclose(empty.probabilities, _torch(checkpoint, [(TEXTS[1], "")])[0], atol=1e-5)


def test_a_long_run_of_white_space_does_not_hide_the_words_after_it(bundle, monkeypatch):
    """Texts are cut to what the model can read before tokenizing, but white space, which some
    tokenizers fold away, does not count: a text is read as its whole text would be."""
    classifier = Classifier.load(bundle)
    most = classifier.manifest.max_input_tokens * MAX_CHARS_PER_TOKEN
    texts = ["good" + " " * (2 * most) + "bad", "word " * most]
    got = classifier.classify_batch(texts)
    monkeypatch.setattr("lmcor.runtime.classifier.MAX_CHARS_PER_TOKEN", 10**9)  # no cut: the whole texts
    whole = classifier.classify_batch(texts)
    for ours, theirs in zip(got, whole):
        np.testing.assert_allclose(ours.probabilities, theirs.probabilities, atol=1e-6)
    assert got[1].truncated and [g.truncated for g in got] == [w.truncated for w in whole]


def test_a_text_whose_characters_are_few_tokens_is_read_as_pytorch_reads_it(checkpoint, bundle):
    """The cut before tokenizing never decides what is read: characters the tokenizer deletes (zero-width
    spaces, soft hyphens, combining accents) and words longer than any token (one unknown token) hold
    many characters and few tokens; such a text, cut or paired, gets PyTorch's probabilities and says
    truncated only where PyTorch's tokenizer cuts it."""
    classifier = Classifier.load(bundle)
    most = classifier.manifest.max_input_tokens * MAX_CHARS_PER_TOKEN
    sentence = "She goes to school every day."
    items = [("\u200b" * (most + 10) + " " + sentence, None), ("\u00ad" * (most + 10) + sentence, None),
             ("e" + "\u0301" * (most + 10) + " " + sentence, None), (("x" * 130 + " ") * 12 + sentence, None),
             (("y" * 130 + " ") * 30, None), (sentence, "\u200b" * (most + 10) + " " + sentence),
             ("word " * most, None), (sentence, "word " * most)]
    # Of a pair, the longer text keeps the odd token: a cut text as long as the other, or two cut texts.
    kept = len(classifier.tokenizer.encode(cut_to_read("word " * most, most), add_special_tokens=False).ids)
    items += [(text, other) for n in range(kept - 2, kept + 3) for text, other in
              (("word " * most, "a " * n), ("a " * n, "word " * most))] + [("word " * most, "an " * most)]
    got = classifier.classify_batch(items)
    np.testing.assert_allclose(np.stack([g.probabilities for g in got]), _torch(checkpoint, items), atol=1e-5)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(checkpoint)
    cut = [len(tokenizer(text, pair)["input_ids"]) > classifier.manifest.max_input_tokens for text, pair in items]
    assert [g.truncated for g in got] == cut and cut[-1]
    assert [classifier._read(text, pair).ids for text, pair in items] == [
        tokenizer(text, pair, truncation=True, max_length=classifier.manifest.max_input_tokens)["input_ids"]
        for text, pair in items]
    # A text without white space whose pieces are tokens each ("a,a,...", as CJK text or code) is still
    # cut before tokenizing: the word the cut split is the tokenizer's, not the text's white space.
    class Recording:  # the lengths of the texts a tokenizer is given
        def __init__(self, tokenizer):
            self.tokenizer, self.lengths = tokenizer, []

        def encode(self, text, pair=None):
            self.lengths.append(len(text))
            return self.tokenizer.encode(text, pair)

    classifier.tokenizer = seen = Recording(classifier.tokenizer)
    classifier.classify_batch(["a," * (10 * most)])
    assert seen.lengths and max(seen.lengths) <= most


def test_a_gate_does_not_pass_what_it_read_in_part():
    """The agreement count ends the gate's input, so truncation cuts it first (and the candidate's own
    end): a request the gate cannot read whole goes to the corrector."""
    from lmcor.runtime.classifier import gate_input, right_probabilities

    gate = Classifier.load(shipped_bundle("gate"))
    short, long = "She go to school every day. ", "She go to school every day. " * 12
    requests = [(text, [text.replace("go", "goes")] * 5) for text in (short, long)]
    assert [gate.classify(*gate_input(*r)).truncated for r in requests] == [False, True]
    got = right_probabilities(gate, requests)
    assert got[0] is not None and got[1] is None


def test_pairs_are_cut_as_the_tokenizers_own_truncation_cuts_them_in_linear_time():
    """lmcor cuts a pair itself (`longest_first`): the tokenizer's own truncation keeps every
    combination of both texts' cut-off pieces, so two texts of 40 KB took gigabytes. Checked against
    that truncation on the shipped gate's tokenizer: none, one or both texts cut, odd and even room."""
    import copy
    import dataclasses
    import itertools

    from lmcor.runtime.bundle import shipped_bundle

    gate = Classifier.load(shipped_bundle("gate"))
    assert gate.tokenizer.truncation is None
    limit = gate.manifest.max_input_tokens
    for room in (limit, limit - 1):
        gate.manifest = dataclasses.replace(gate.manifest, max_input_tokens=room)
        truncating = copy.deepcopy(gate.tokenizer)
        truncating.enable_truncation(room, strategy="longest_first")
        lengths = (0, 1, room // 2 - 2, room // 2, room // 2 + 1, room - 4, room, 2 * room)
        for a, b in itertools.product(lengths, repeat=2):
            text, pair = "word " * a + "end", ("she go " * b)[: 4 * b] or None
            expected = truncating.encode(text, pair)
            got = gate._read(text, pair)
            assert (got.ids, got.type_ids, got.truncated) == (expected.ids, expected.type_ids, bool(expected.overflowing))
    long = gate._read("a " * 20000, "b " * 20000)  # 40 KB each: one pass over each text
    assert len(long.ids) == room and long.truncated


def test_a_label_given_no_chance_validates_and_a_regression_head_is_refused(tmp_path):
    """A label whose probability is 0 on both sides differs by nothing (log(0) - log(0) was NaN, which
    passed any tolerance and made the manifest's JSON invalid); scores of a regression head are no
    probabilities."""
    from lmcor.runtime.errors import ExportError

    torch.manual_seed(0)
    tokenizer, model = _bert()
    with torch.no_grad():
        model.classifier.bias[0] = -1000.0
    model.save_pretrained(tmp_path / "never")
    tokenizer.save_pretrained(tmp_path / "never")
    manifest = export_classifier(tmp_path / "never", tmp_path / "b1")
    assert 0 <= manifest.validation["max_abs_logprob_diff"] < 1e-3
    json.loads((tmp_path / "b1" / "lmcor.json").read_text(), parse_constant=pytest.fail)  # strict JSON
    tokenizer, model = _bert()
    model.config.problem_type = "regression"
    model.save_pretrained(tmp_path / "regression")
    tokenizer.save_pretrained(tmp_path / "regression")
    with pytest.raises(ExportError, match="a regression head"):
        export_classifier(tmp_path / "regression", tmp_path / "b2")
    assert not (tmp_path / "b2").exists()


def test_checkpoints_a_bundle_would_read_otherwise_are_refused_by_name(tmp_path):
    """A gap in id2label, a tokenizer that keeps a long text's end, and a decoder-only head with no pad."""
    from lmcor.runtime.errors import ExportError

    torch.manual_seed(0)
    tokenizer, model = _bert()
    model.config.id2label = {0: "ok", 2: "other", 3: "more"}
    model.save_pretrained(tmp_path / "gap")
    tokenizer.save_pretrained(tmp_path / "gap")
    with pytest.raises(ExportError, match=r"id2label names no label for output 1 of its 3 \(it has \[0, 2, 3\]\)"):
        export_classifier(tmp_path / "gap", tmp_path / "b1")
    tokenizer, model = _bert()
    model.save_pretrained(tmp_path / "left")
    tokenizer.save_pretrained(tmp_path / "left")
    settings = tmp_path / "left" / "tokenizer_config.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "truncation_side": "left"}))
    with pytest.raises(ExportError, match="truncation_side 'left'"):
        export_classifier(tmp_path / "left", tmp_path / "b2")
    tokenizer, model = _llama()
    model.config.pad_token_id, tokenizer.pad_token = None, None
    model.save_pretrained(tmp_path / "nopad")
    tokenizer.save_pretrained(tmp_path / "nopad")
    with pytest.raises(ExportError, match="set pad_token_id in config.json .* with their EOS, 2"):
        export_classifier(tmp_path / "nopad", tmp_path / "b3")
    tokenizer, model = _bert()
    model.config.type_vocab_size = 1  # one token type: optimum's sample token types go past it
    type(model)(model.config).save_pretrained(tmp_path / "one-type")
    tokenizer.save_pretrained(tmp_path / "one-type")
    with pytest.raises(ExportError, match=r"one token type \(type_vocab_size 1\).*cannot export this model"):
        export_classifier(tmp_path / "one-type", tmp_path / "b4")
    assert not any((tmp_path / name).exists() for name in ("b1", "b2", "b3", "b4"))


def test_checkpoints_whose_graph_or_tokenizer_the_bundle_cannot_follow_are_refused_by_name(tmp_path):
    """A tokenizer that splits special tokens' text (tokenizer.json cannot record it: the bundle would
    read "[SEP]" in a text as the token), a graph that needs an input a classifier bundle does not give
    (LayoutLM's boxes), token types the tokenizer gives and the model adds in but its graph does not take
    (GPT-2's: validation fails, saying why), and an id2label shorter than the head (said with the size mismatch, not a bare
    "Error(s) in loading state_dict")."""
    from lmcor.runtime.errors import ExportError
    from transformers import GPT2Config, GPT2ForSequenceClassification, LayoutLMConfig, LayoutLMForSequenceClassification

    def saved(name, model, tokenizer):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        return tmp_path / name

    torch.manual_seed(0)
    tokenizer, model = _bert()
    saved("split", model, tokenizer)
    settings = tmp_path / "split" / "tokenizer_config.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "split_special_tokens": True}))
    with pytest.raises(ExportError, match="splits special tokens' text .*split_special_tokens"):
        export_classifier(tmp_path / "split", tmp_path / "b1")
    layout = LayoutLMForSequenceClassification(LayoutLMConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=64, max_2d_position_embeddings=64, **LABELS))
    with pytest.raises(ExportError, match="a layoutlm classifier's graph needs 'bbox', which a classifier bundle does "
                                          "not give"):
        export_classifier(saved("layout", layout, tokenizer), tmp_path / "b2")
    fast = _byte_bpe(pairs=False)
    assert "token_type_ids" in fast.model_input_names
    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=len(fast), n_embd=32, n_layer=1, n_head=4,
                                                    n_positions=64, pad_token_id=1, **LABELS))
    with pytest.raises(ExportError, match="validation failed: .* gives token_type_ids, which gpt2's model adds in, "
                                          "and its exported graph takes none"):
        export_classifier(saved("gpt2", gpt2, fast), tmp_path / "b3")
    shutil.copytree(tmp_path / "split", tmp_path / "short")
    (tmp_path / "short" / "tokenizer_config.json").write_text(json.dumps(
        {**json.loads(settings.read_text()), "split_special_tokens": False}))
    config = json.loads((tmp_path / "short" / "config.json").read_text())
    (tmp_path / "short" / "config.json").write_text(json.dumps({**config, "id2label": {"0": "ok", "1": "fix"},
                                                                 "label2id": {"ok": 0, "fix": 1}}))
    with pytest.raises(ExportError, match="Error.s. in loading state_dict for .*: size mismatch"):
        export_classifier(tmp_path / "short", tmp_path / "b4")
    assert not any((tmp_path / name).exists() for name in ("b1", "b2", "b3", "b4"))


def test_a_text_holding_a_token_past_the_embeddings_fails_alone_by_name(tmp_path):
    torch.manual_seed(0)
    tokenizer, model = _bert()
    tokenizer.add_tokens(["zzznew"])  # the model is not resized: a common slip
    model.save_pretrained(tmp_path / "ck")
    tokenizer.save_pretrained(tmp_path / "ck")
    manifest = export_classifier(tmp_path / "ck", tmp_path / "bundle")
    assert manifest.vocab_size == model.config.vocab_size
    classifier = Classifier.load(tmp_path / "bundle")
    seen = []
    got = classifier.classify_batch(["she goes zzznew home", "x", ("a", "zzznew b"), "", {"x": 1}], errors="return",
                                    progress=seen.append)
    assert [isinstance(g, InputError) for g in got] == [True, False, True, True, True] and sum(seen) == 5
    assert "the token 'zzznew'" in str(got[0]) and f"vocabulary of {model.config.vocab_size}" in str(got[0])
    with pytest.raises(InputError, match="item 2: the text holds the token 'zzznew'"):
        classifier.classify_batch(["x", "y", "zzznew"])


def test_only_onnx_runtimes_errors_are_the_texts_and_lmcors_own_are_raised(bundle, monkeypatch):
    """What ONNX Runtime cannot compute fails the texts alone; a failure of lmcor or the machine is no
    text's (every line an error record, and a gate that failed so was skipped without a word)."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    from lmcor.runtime import classifier as module

    classifier = Classifier.load(bundle)

    def failing(error):
        def run(*args):
            raise error
        return run

    monkeypatch.setattr(module, "run", failing(Fail("a kernel failed")))
    got = classifier.classify_batch(["a", "b"], errors="return")
    assert [str(g) for g in got] == ["the model cannot read this text (a kernel failed)"] * 2
    monkeypatch.setattr(module, "run", failing(MemoryError()))
    with pytest.raises(MemoryError):
        classifier.classify_batch(["a", "b"], errors="return")


def test_a_tokenizer_that_returns_no_token_types_has_the_model_read_zeros(tmp_path):
    """transformers feeds no token type ids where the tokenizer's model_input_names lacks them (the model
    reads zeros); the bundle records that and feeds zeros too, not the tokenizer.json's pair types."""
    torch.manual_seed(0)
    tokenizer, model = _bert()
    with torch.no_grad():  # a trained model's types matter; random small ones would hide the difference
        model.bert.embeddings.token_type_embeddings.weight.mul_(50)
    model.save_pretrained(tmp_path / "ck")
    tokenizer.save_pretrained(tmp_path / "ck")
    config = tmp_path / "ck" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_input_names": ["input_ids", "attention_mask"]}))
    manifest = export_classifier(tmp_path / "ck", tmp_path / "bundle")  # validation holds it to PyTorch's
    assert manifest.token_types is False
    got = Classifier.load(tmp_path / "bundle").classify_batch(PAIRS)
    np.testing.assert_allclose([g.probabilities for g in got], _torch(tmp_path / "ck", PAIRS), atol=1e-4)
    assert "token_type_ids" not in PreTrainedTokenizerFast.from_pretrained(tmp_path / "ck")("a", "b")


def test_labels_that_are_no_names_and_a_limit_below_a_pairs_special_tokens_are_refused_first(checkpoint, tmp_path):
    """Said before any export work, naming config.json's id2label; a --max-input-tokens below what a
    pair's special tokens take would leave texts uncut (the tokenizer skips such a truncation)."""
    import shutil

    from lmcor.runtime.errors import ExportError

    outputs = len(json.loads((checkpoint / "config.json").read_text())["id2label"])
    for id2label, said in (({str(i): "same" for i in range(outputs)}, "has a label twice: 'same', 'same'"),
                           ({str(i): i for i in range(outputs)}, "has the label 0, not a name"),
                           ({str(i): " " if i else "yes" for i in range(outputs)}, "has the label ' ', not a name"),
                           ({str(i): None if i else "yes" for i in range(outputs)}, "has the label None, not a name")):
        odd = tmp_path / "odd"
        shutil.rmtree(odd, ignore_errors=True)
        shutil.copytree(checkpoint, odd)
        config = json.loads((odd / "config.json").read_text())
        (odd / "config.json").write_text(json.dumps({**config, "id2label": id2label,
                                                     "label2id": {str(v): int(k) for k, v in id2label.items()}}))
        with pytest.raises(ExportError, match=f"config.json's id2label {said}"):
            export_classifier(odd, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="--max-input-tokens 2: a text pair needs"):
        export_classifier(checkpoint, tmp_path / "out", max_input_tokens=2)
    short = tmp_path / "short"  # the same limit, from its tokenizer: said as such
    shutil.copytree(checkpoint, short)
    settings = short / "tokenizer_config.json"
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "model_max_length": 2}))
    with pytest.raises(ExportError, match=r"the bundle's 2 input tokens \(the tokenizer's model_max_length, .*set "
                                          "--max-input-tokens\): a text pair needs"):
        export_classifier(short, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_text_that_is_no_text_says_what_it_got(bundle):
    got = Classifier.load(bundle).classify_batch([" \n", {"text": 5}, "", "fine"], errors="return")
    assert [str(g) for g in got[:3]] == ["field 'text' must be a non-empty string, got only white space",
                                         "field 'text' must be a non-empty string, got a number",
                                         "field 'text' must be a non-empty string, got an empty one"]
    assert not isinstance(got[3], Exception)
