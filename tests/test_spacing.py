"""An output keeps its source's line breaks and tabs where it copies the source."""

import pytest
from lmcor.runtime.decode import Search
from lmcor.runtime.request import as_request
from lmcor.runtime.sequence import Sequence
from lmcor.runtime.spacing import folds_white_space, with_source_spacing

from lmcor import Corrector


@pytest.mark.parametrize("source, text, expected", [
    ("a b c", "a B c", "a B c"),  # no line break or tab: the text as it is
    ("a b\nc d", "a B c d", "a B\nc d"),  # beside a corrected word too
    ("a b\nc d", "a b C d", "a b\nC d"),
    ("a\n\nb\tc", "a b c", "a\n\nb\tc"),
    ("a  b\nc", "a b c", "a b\nc"),  # runs of plain spaces stay single: extra spaces are an error
    ("a\nb", "a x b", "a\nx b"),  # each of the source's gaps once
    ("a b\nc", "c a b", "c a b"),  # nothing copied in order across the break
    ("x\ny", "", ""),
    ("x\ny", "z", "z"),
    ("a b\u2028c d", "a B c d", "a B\u2028c d"),  # Unicode's line breaks too
    ("a\x85b\u2029c", "a b c", "a\x85b\u2029c"),
    ("I saw the the\ncat.", "I saw the cat.", "I saw the\ncat."),  # a word deleted beside a line break
    ("Best regards, John Smith\nCEO", "Best regards, John CEO", "Best regards, John\nCEO"),
    ("a b\nc\nd e", "a e", "a\ne"),  # several deleted: the first break between them
])
def test_line_breaks_and_tabs_come_back_where_the_output_copies_the_source(source, text, expected):
    assert with_source_spacing(source, text) == expected


def test_the_default_corrector_keeps_a_paragraphs_line_breaks():
    source = "She go to school.\nHe go home.\tThey was late."
    fixed = "She goes to school.\nHe goes home.\tThey were late."
    corrector = Corrector.load()
    assert corrector.correct(source, [fixed] * 5) == fixed


@pytest.mark.parametrize("arch, folds", [("t5", True), ("bart", False)])
def test_a_tokenizer_that_writes_line_breaks_keeps_its_models_own_spacing(bundles, arch, folds):
    """T5's tokenizer writes every run of white space as one space, so the source's tab comes back;
    BART's byte-level one writes tabs and line breaks itself, so its model's text is what it decoded."""
    engine = Corrector.load(bundles[arch]).engine
    assert folds_white_space(engine.tokenizer) is folds
    source, written = "the cat went to school.\tthe cat went to school", "the cat went to school. the cat went to school."
    s = Sequence(Search(max_new_tokens=64), 0, request=as_request({"source": source, "candidates": [written]}))
    s.tokens = engine.tokenizer.encode(written, add_special_tokens=False).ids
    s.done = True
    (correction,) = engine._finish([s])
    decoded = engine.tokenizer.decode(correction.token_ids, skip_special_tokens=True)
    assert correction.text == (with_source_spacing(source, decoded) if folds else decoded)
    assert ("\t" in correction.text) is folds


def test_a_byte_level_tokenizer_whose_decoder_adds_a_space_writes_line_breaks():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    for prefix_space in (False, True):
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.train_from_iterator(["a\nb\tc d"] * 5, trainers.BpeTrainer(
            vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        assert folds_white_space(tokenizer) is False


def test_a_tokenizer_saved_to_clean_up_spaces_decodes_as_transformers(tmp_path):
    """A checkpoint whose tokenizer says clean_up_tokenization_spaces (transformers' default before 4.45)
    has its outputs decoded as transformers decodes them: "do n't ." as "don't."."""
    import json

    from conftest import build_checkpoint
    from lmcor.export import export_corrector
    from transformers import AutoTokenizer

    checkpoint = build_checkpoint("t5", tmp_path / "ck")
    config = checkpoint / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "clean_up_tokenization_spaces": True}))
    assert export_corrector(checkpoint, tmp_path / "bundle").clean_up_spaces
    engine = Corrector.load(tmp_path / "bundle").engine
    written = "the cat do n't went to school , quietly ."
    s = Sequence(Search(max_new_tokens=64), 0, request=as_request({"source": "x", "candidates": [written]}))
    s.tokens = engine.tokenizer.encode(written, add_special_tokens=False).ids
    s.done = True
    (correction,) = engine._finish([s])
    assert correction.text == AutoTokenizer.from_pretrained(checkpoint).decode(s.tokens, skip_special_tokens=True)
    assert correction.text.endswith("school, quietly.")
