"""An output keeps its source's line breaks and tabs where it copies the source."""

import pytest
from lmcor.runtime.spacing import with_source_spacing

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
])
def test_line_breaks_and_tabs_come_back_where_the_output_copies_the_source(source, text, expected):
    assert with_source_spacing(source, text) == expected


def test_the_default_corrector_keeps_a_paragraphs_line_breaks():
    source = "She go to school.\nHe go home.\tThey was late."
    fixed = "She goes to school.\nHe goes home.\tThey were late."
    corrector = Corrector.load()
    assert corrector.correct(source, [fixed] * 5) == fixed
