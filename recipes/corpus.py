"""Clean English sentences from corpora that install offline from Debian's packages.

- WordNet's example sentences (`wordnet-base`): the quoted parts of the glosses, stored
  lower-case and without a final period; both are restored.
- Sayings and prose from `fortunes` (the non-offensive collections): ordinary English with
  capitals, digits, commas, apostrophes, quotes, question and exclamation marks, and longer
  sentences than WordNet's.

The split into train/dev/test is a pure function of the sentence (a hash), so it never changes
when the corpus grows or is read in another order.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")
FORTUNES = Path("/usr/share/games/fortunes")
# Collections of ordinary prose; art, riddles, code and verse-heavy ones are left out.
FORTUNE_FILES = ("fortunes", "wisdom", "literature", "people", "work", "education", "science", "food",
                 "pets", "love", "humorists", "men-women", "politics", "songs-poems", "miscellaneous",
                 "platitudes", "law", "medicine", "sports", "kids", "goedel", "magic", "news", "paradoxum",
                 "definitions", "computers", "cookie", "linux", "zippy")

_QUOTED = re.compile(r'"([^"]{8,})"')
_SENTENCE_END = re.compile(r'(?<=[.!?])["\')]?\s+(?=["\'(]?[A-Z0-9])')
_ALLOWED = re.compile(r"^[A-Za-z0-9 ,.;:!?'\"()\-$%&/]+$")


def restore(sentence: str) -> str:
    """Capitalize the first letter and end with a period unless it already ends a sentence."""
    sentence = " ".join(sentence.split())
    if not sentence:
        return sentence
    sentence = sentence[0].upper() + sentence[1:]
    return sentence if sentence[-1] in ".!?" or sentence.endswith(('."', '!"', '?"')) else sentence + "."


def wordnet_sentences(root: Path = WORDNET) -> Iterator[str]:
    for part in ("noun", "verb", "adj", "adv"):
        with open(root / f"data.{part}", encoding="latin-1") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:  # the license header
                    continue
                for quoted in _QUOTED.findall(line.split("|", 1)[1]):
                    yield restore(quoted)


def fortune_sentences(root: Path = FORTUNES, names: Iterable[str] = FORTUNE_FILES) -> Iterator[str]:
    for name in names:
        path = root / name
        if not path.is_file():
            continue
        for entry in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            lines = [l for l in entry.splitlines() if not l.strip().startswith("--") and not l.startswith(("\t", "    "))]
            text = " ".join(" ".join(lines).split())
            for sentence in _SENTENCE_END.split(text):
                yield sentence.strip()


LICENSES = Path("/usr/share/common-licenses")


def license_sentences(root: Path = LICENSES) -> Iterator[str]:
    """Sentences of the license texts Debian installs (GPL, Apache, MPL...): legal English, long
    sentences, from outside the training corpora and the docstrings."""
    for path in sorted(root.iterdir()):
        if path.is_file() and not path.is_symlink():  # GPL -> GPL-3: each text once
            text = " ".join(path.read_text(encoding="utf-8", errors="replace").split())
            yield from (sentence.strip() for sentence in _SENTENCE_END.split(text))


def docstring_sentences(root: Path, recursive: bool = False) -> Iterator[str]:
    """Sentences of the docstrings of the Python modules under `root` (its subfolders' too with
    `recursive`): for the standard library's, technical English from outside the training corpora,
    for checking how the model transfers."""
    import ast

    for path in sorted(root.rglob("*.py") if recursive else root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    for paragraph in doc.split("\n\n"):
                        yield from (s.strip() for s in _SENTENCE_END.split(" ".join(paragraph.split())))


# Installed with lmcor's extras: their docstrings are technical English of another hand than the
# standard library's, for a third set outside the corpora.
PACKAGES = ("transformers", "torch", "numpy", "starlette", "pydantic", "tokenizers", "tqdm")


def package_sentences(names: Iterable[str] = PACKAGES) -> Iterator[str]:
    """Sentences of the docstrings of the installed packages `names` (a missing one is an error)."""
    import importlib.util

    from lmcor.runtime.errors import LmcorError

    for name in names:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise LmcorError(f"the package {name} is not installed: pip install -e '.[test,serve]'")
        yield from docstring_sentences(Path(spec.origin).parent, recursive=True)


def usable(sentence: str) -> bool:
    words = sentence.split()
    return (
        4 <= len(words) <= 40
        and bool(_ALLOWED.match(sentence))
        and sentence[0].isupper()
        and sentence[-1] in ".!?\""
        and sentence.count('"') % 2 == 0
        and sentence.count("(") == sentence.count(")")
        and not any(w.isupper() and len(w) > 3 for w in words)  # headings and shouting
    )


def sentences() -> list[str]:
    """Every usable sentence of both corpora, deduplicated, in a fixed order."""
    from lmcor.runtime.errors import LmcorError

    if not (WORDNET / "data.noun").is_file() or not (FORTUNES / "fortunes").is_file():
        raise LmcorError(f"the corpora are missing ({WORDNET}, {FORTUNES}): apt-get install wordnet-base fortunes")
    seen: dict[str, None] = {}
    for sentence in (*wordnet_sentences(), *fortune_sentences()):
        if usable(sentence):
            seen.setdefault(sentence, None)
    return list(seen)


def split_of(sentence: str, dev: float = 0.02, test: float = 0.02) -> str:
    bucket = int.from_bytes(hashlib.sha256(sentence.encode()).digest()[:8], "big") / 2**64
    return "test" if bucket < test else "dev" if bucket < test + dev else "train"
