"""An output keeps its source's line breaks and tabs where it copies the source.

A T5 corrector's tokenizer writes all white space as single spaces (SentencePiece normalizes it),
and the fallback joins words with single spaces, so a paragraph's line breaks and a table's tabs
would be lost. Where two consecutive words of such a text are consecutive words of its source, the
white space between them is the source's if it holds a line break (any of Unicode's) or a tab. Runs
of plain spaces stay single: extra spaces are an error a corrector may fix. A tokenizer that writes
line breaks and tabs itself (BART's byte-level one) leaves its model's own outputs as they are.
"""

from __future__ import annotations

import difflib
import re

from tokenizers import Tokenizer

_WHITE = re.compile(r"(\s+)")
# What ends a line (str.splitlines' boundaries: U+2028 too) or aligns a column.
_STRUCTURAL = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029\t")


def with_source_spacing(source: str, text: str) -> str:
    """`text` with the source's line breaks and tabs between the words it copies from the source."""
    if _STRUCTURAL.isdisjoint(source):
        return text
    parts = _WHITE.split(source.strip())
    words, gaps = parts[0::2], parts[1::2]
    theirs = text.split()
    source_word: dict[int, int] = {}  # output word -> the source word it copies
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, words, theirs, autojunk=False).get_opcodes():
        if tag == "equal":
            source_word.update((j1 + k, i1 + k) for k in range(i2 - i1))
    out, used = theirs[:1], set()
    for j in range(1, len(theirs)):
        # The source's gap after the word the one before copies, else before the word this one copies
        # (a line break stays beside a corrected word too); where the two copy words apart (the text
        # deletes the ones between), any gap between them; each gap once.
        before, after = source_word.get(j - 1), source_word.get(j)
        if before is not None and after is not None and after > before + 1:
            places = range(before, after)
        else:
            places = [before if before is not None and before < len(gaps) else after - 1 if after else None]
        i = next((g for g in places if g is not None and g < len(gaps) and g not in used
                  and not _STRUCTURAL.isdisjoint(gaps[g])), None)
        used.add(i if i is not None else places[0])
        out += [gaps[i] if i is not None else " ", theirs[j]]
    return "".join(out) if len(out) > 1 else text


def folds_white_space(tokenizer: Tokenizer) -> bool:
    """Whether `tokenizer` cannot write a line break or a tab (it folds them into spaces, or drops
    them): then the white space of its model's outputs is the source's to give back."""
    written = tokenizer.decode(tokenizer.encode("a\nb\tc", add_special_tokens=False).ids, skip_special_tokens=True)
    return "\n" not in written or "\t" not in written  # (a decoder may add a space before the text)


# transformers' `clean_up_tokenization`, which its decode applies where the tokenizer was saved with
# `clean_up_tokenization_spaces` (the default before transformers 4.45): the same replacements, in order.
_CLEAN_UP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def cleaned_up(text: str) -> str:
    """`text` as transformers' decode writes it with `clean_up_tokenization_spaces`."""
    for old, new in _CLEAN_UP:
        text = text.replace(old, new)
    return text
