"""lmcor.recipes: how lmcor's own default corrector is built (data, noise model, training)."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

Main = Callable[[list[str] | None], int]


def command_line(main: Main) -> Main:
    """A recipe's `main`, answering as `lmcor` does: a bad bundle, data file or flag (an `LmcorError`),
    or a file that cannot be read or written, is one line on stderr and exit status 2."""
    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        from lmcor.cli import EXIT_ERROR
        from lmcor.runtime.errors import LmcorError

        try:
            return main(argv)
        except LmcorError as e:
            print(f"lmcor: error: {e}", file=sys.stderr)
            return EXIT_ERROR
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            print(f"lmcor: error: {where}{e.strerror or e}", file=sys.stderr)
            return EXIT_ERROR

    return run
