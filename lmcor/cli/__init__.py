"""The `lmcor` command line: one module per command, each imported only when it runs.

Exit codes: 0 every line answered; 1 some lines got error records (every other line was still
answered); 2 an error (one `lmcor: error:` line): bad arguments, bundle or input file before any line,
or a failure during the run, which keeps the records finished; 130/143 stopped by SIGINT/SIGTERM after
keeping everything finished (see `lines`); 141 the reader of stdout went away.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys

from lmcor import __version__

EXIT_ERROR = 2


class Stderr:
    """sys.stderr, best effort, for every message and progress bar of the commands: a closed, full or
    broken stderr (`2>&-`, `2>/dev/full`, a pipe whose reader left) costs no record and changes no
    exit code. After the first write that fails, the rest are dropped (sys.stderr becomes /dev/null,
    so that the interpreter's own flush at exit does not fail too)."""

    def write(self, text: str) -> int:
        stream = sys.stderr
        if stream is not None:
            try:
                try:
                    stream.write(text)
                except UnicodeEncodeError:  # a strict stream, and a path's bytes that are not UTF-8 in the text
                    encoding = getattr(stream, "encoding", None) or "utf-8"
                    stream.write(text.encode(encoding, "backslashreplace").decode(encoding))
                stream.flush()
            except (OSError, ValueError, LookupError):  # (LookupError: a stream naming no codec)
                sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115 - held for the process
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        try:
            return sys.stderr.isatty()
        except (AttributeError, OSError, ValueError):
            return False


STDERR = Stderr()


def say(text: str) -> None:
    """One message line on stderr, best effort (`Stderr`), above any progress bar there."""
    from tqdm import tqdm  # here: a command that says nothing does not import it

    tqdm.write(text, file=STDERR)

# name -> (module, one-line help). A command's module is imported only to run it (or to show
# its own --help), so `lmcor correct` loads neither the exporter nor the benchmarks.
COMMANDS = {
    "correct": ("correct", "correct JSONL requests with a corrector bundle"),
    "classify": ("classify", "classify JSONL texts or text pairs with a classifier bundle"),
    "generate": ("generate", "continue JSONL prompts with a causal-LM bundle"),
    "candidates": ("candidates", "write K candidates per source with a causal-LM bundle, in the corrector's input "
                   "format (pipe into `lmcor correct -`)"),
    "eval": ("evaluate", "score a corrector against its candidates on labelled data"),
    "export": ("export", "export a Hugging Face checkpoint to a validated bundle"),
    "train-corrector": ("train_corrector", "train a corrector on your LLM's own candidates, export and evaluate it"),
    "serve": ("serve", "serve a corrector (and gate, classifiers, generators) over HTTP"),
    "bench": ("bench", "latency and throughput of lmcor and its peers, side by side"),
}


def _chosen(argv: list[str]) -> str | None:
    return next((arg for arg in argv if arg in COMMANDS), None)


def _parser(chosen: str | None) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]:
    """The command line's parser, and the chosen command's."""
    parser = argparse.ArgumentParser(prog="lmcor", description="Serve small models that improve big ones.",
                                     epilog="exit codes: 0 all answered; 1 some lines failed (error records); "
                                     "2 an error (records finished are kept: --resume); 130/143 interrupted (use --resume); "
                                     "141 stdout's reader went away")
    parser.add_argument("--version", action="version", version=f"lmcor {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what lmcor does")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen_parser = None
    for name, (module, text) in COMMANDS.items():
        command = commands.add_parser(name, help=text, description=text)
        if name == chosen:
            importlib.import_module(f"lmcor.cli.{module}").add_arguments(command)
            chosen_parser = command
    return parser, chosen_parser


_FIELD = re.compile(r"^([a-z][a-z0-9_]*)(\[\d+\])? (?=must |holds )")


def _said_as_flags(message: str, command: argparse.ArgumentParser | None, argv: list[str]) -> str:
    """A message of the options shared with Python and the server names a field ("max_new_tokens must
    be ...", "stop[1] must ..."): on the command line, the flag that set it, where one did (a value
    from a config file keeps its field's name)."""
    match = _FIELD.match(message)
    given = {action.dest: action.option_strings[-1] for action in (command._actions if command else ())
             if any(_names(arg, flag) for flag in action.option_strings for arg in argv)}
    if not match or match.group(1) not in given:
        return message
    which = f" #{int(match.group(2)[1:-1]) + 1}" if match.group(2) else ""
    rest = message[match.end(2) if match.group(2) else match.end(1):]
    for field, flag in given.items():  # a bound that another flag set: "from 0 to 10 (max_new_tokens)"
        rest = rest.replace(f"({field})", f"({flag})")
    return given[match.group(1)] + which + rest


def _names(arg: str, flag: str) -> bool:
    """Whether a command-line word gives `flag`: itself, with `=value`, or as the prefix argparse
    took for it (`--max-new` for `--max-new-tokens`)."""
    name = arg.split("=", 1)[0]
    return name == flag or (flag.startswith("--") and len(name) > 2 and name.startswith("--") and flag.startswith(name))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    chosen = _chosen(argv)
    parser, command = _parser(chosen)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="lmcor: %(message)s", stream=sys.stderr)
    # -v: everything lmcor logs, down to the tracebacks behind one-line export errors.
    logging.getLogger("lmcor").setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    from lmcor.runtime.errors import LmcorError

    try:
        return importlib.import_module(f"lmcor.cli.{COMMANDS[args.command][0]}").run(args)
    except LmcorError as e:
        say(f"lmcor: error: {_said_as_flags(str(e), command, argv)}")
        return EXIT_ERROR
    except BrokenPipeError:  # the reader of stdout went away (`| head`): nothing more to say to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        say(f"lmcor: error: {e.filename or 'writing or reading'}: {e.strerror or e}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # what lmcor did not foresee (an ONNX Runtime failure): one line; -v logs the traceback
        logging.getLogger("lmcor").debug("the traceback behind the error below", exc_info=True)
        first = (str(e).strip().splitlines() or [""])[0]
        say(f"lmcor: error: {type(e).__name__}: {first} (lmcor -v shows the traceback)")
        return EXIT_ERROR
