"""lmcor's tokens are Hugging Face `generate`'s tokens: greedy and beam search, batched or not."""

import pytest
import torch
from conftest import make_requests
from lmcor.runtime.template import render
from transformers import AutoModelForSeq2SeqLM

from lmcor import Corrector

INPUTS = make_requests(24, seed=7)


def _reference(checkpoint, corrector: Corrector, requests, **generate_options) -> list[list[int]]:
    """`generate` one request at a time on the exact text lmcor renders."""
    model = AutoModelForSeq2SeqLM.from_pretrained(checkpoint).eval()
    eos = corrector.manifest.special_tokens.eos
    out = []
    for request in requests:
        text = render(corrector.manifest.template, request["source"], request["candidates"]).text
        ids = torch.tensor([corrector.tokenizer.encode(text).ids])
        with torch.no_grad():
            tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    **generate_options)[0, 1:].tolist()
        out.append(tokens[: tokens.index(eos)] if eos in tokens else tokens)
    return out


@pytest.mark.parametrize("batch_size", [1, 8])
def test_greedy_matches_generate(arch, checkpoints, bundles, batch_size):
    corrector = Corrector.load(bundles[arch])
    expected = _reference(checkpoints[arch], corrector, INPUTS, max_new_tokens=20, num_beams=1)
    got = corrector.correct_batch(INPUTS, max_new_tokens=20, batch_size=batch_size)
    assert [c.token_ids for c in got] == expected
    assert [c.id for c in got] == [r["id"] for r in INPUTS]
    if arch != "bart":  # the tiny random BART ignores its input: all its outputs run to the forced EOS
        assert len({len(t) for t in expected}) > 1, "the fixture should give outputs of several lengths"


@pytest.mark.parametrize("length_penalty", [1.0, 2.0])
def test_beam_search_matches_generate(arch, checkpoints, bundles, length_penalty):
    corrector = Corrector.load(bundles[arch])
    options = dict(max_new_tokens=12, num_beams=4, length_penalty=length_penalty)
    expected = _reference(checkpoints[arch], corrector, INPUTS, early_stopping=False, **options)
    got = corrector.correct_batch(INPUTS, batch_size=6, **options)
    assert [c.token_ids for c in got] == expected


@pytest.mark.parametrize("num_beams", [1, 3])
def test_min_new_tokens_matches_generate(checkpoints, bundles, num_beams):
    corrector = Corrector.load(bundles["t5"])
    options = dict(max_new_tokens=14, min_new_tokens=9, num_beams=num_beams)
    expected = _reference(checkpoints["t5"], corrector, INPUTS[:10], **options)
    got = corrector.correct_batch(INPUTS[:10], batch_size=4, **options)
    assert [c.token_ids for c in got] == expected
    assert all(len(c.token_ids) >= 9 for c in got)


def test_correction_carries_text_and_stats(bundles):
    corrector = Corrector.load(bundles["t5v11"])
    request = INPUTS[3]
    [correction] = corrector.correct_batch([request], max_new_tokens=8)
    assert correction.text == corrector.tokenizer.decode(correction.token_ids, skip_special_tokens=True)
    assert corrector.correct(request["source"], request["candidates"], max_new_tokens=8) == correction.text
    assert correction.truncated is False
    assert correction.stats.output_tokens == len(correction.token_ids)
    assert 1 <= correction.stats.decoder_calls <= 8
    assert correction.stats.input_tokens > 0 and correction.stats.encoder_s > 0


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("size", [1, 2])  # 1: the decoder start token is banned too
def test_no_repeat_ngram_size_matches_generate(checkpoints, bundles, num_beams, size):
    corrector = Corrector.load(bundles["t5"])
    options = dict(max_new_tokens=16, num_beams=num_beams, no_repeat_ngram_size=size)
    expected = _reference(checkpoints["t5"], corrector, INPUTS[:12], **options)
    unbanned = _reference(checkpoints["t5"], corrector, INPUTS[:12], max_new_tokens=16, num_beams=num_beams)
    assert expected != unbanned, "the fixture should repeat itself, so that bans matter"
    for batch_size in (1, 5):
        got = corrector.correct_batch(INPUTS[:12], batch_size=batch_size, **options)
        assert [c.token_ids for c in got] == expected


def test_an_mt5_checkpoint_exports_and_matches_generate(tmp_path):
    """mT5 (T5 v1.1's layers under its own model type), exported and decoded greedily, batched."""
    from conftest import build_checkpoint
    from lmcor.export import export_corrector

    checkpoint = build_checkpoint("mt5", tmp_path / "mt5")
    export_corrector(checkpoint, tmp_path / "bundle")
    corrector = Corrector.load(tmp_path / "bundle")
    assert corrector.manifest.architecture == "mt5"
    requests = INPUTS[:12]
    expected = _reference(checkpoint, corrector, requests, max_new_tokens=20, num_beams=1)
    got = corrector.correct_batch(requests, max_new_tokens=20, batch_size=4)
    assert [c.token_ids for c in got] == expected
