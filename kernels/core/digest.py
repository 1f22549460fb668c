"""The compiled core's source digest: `setup.py` compiles it into `lmcor._core` (its `SOURCES`), and
`lmcor.runtime.core` compares it with the sources of a checkout, so that a core left from older
sources is noticed. Standard library only: `setup.py` loads this file before lmcor is installed."""

import hashlib
from pathlib import Path


def sources_digest(folder: Path) -> str:
    """sha256 of the C++ sources (*.cpp, *.hpp) in `folder`, by name and content."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.[ch]pp")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()
