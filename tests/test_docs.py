"""The docs cannot drift from the code: every runnable command in README.md and docs/*.md is checked.

Convention: a fenced code block tagged ```bash, ```sh or ```shell is *runnable*: each of its lines is a
command a user can paste as it is (no placeholders like `[--model DIR]`; a `# comment` at the end of a
line and `\\` continuations are fine). Blocks tagged ```text, ```console, ```json or left untagged are
shown, not checked. ```python blocks must compile, and the names they import from lmcor must exist.

In a runnable line, commands are split at `&&`, `||`, `|` and `;` and leading `NAME=value` settings
are dropped; then:
- `lmcor COMMAND ...` (and `python -m lmcor.cli ...`) is parsed by the real CLI parser, without
  running the job: an unknown command, an unknown flag or a bad value fails. `lmcor COMMAND --help`
  is shown once per command, so its module imports and its help renders.
- `python -m MODULE ...` needs MODULE to exist (`importlib.util.find_spec`).
- `pip install -e ".[EXTRA,...]"` needs each EXTRA in setup.py's `extras_require`.
- `pytest PATH ...` needs PATH to exist.
- anything else (`curl`, `apt-get`, `cd`, ...) is not checked.

Also: relative links between the pages resolve, README.md stays within 200 lines, and its test command
is exactly the one `.ci/run` runs. Nothing runs a job; the whole file takes a few seconds.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib.util
import io
import re
import shlex
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = {"bash", "sh", "shell"}
README_MAX_LINES = 200
SEPARATORS = {"&&", "||", "|", ";"}
FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the block's first content line, 1-based
    lang: str
    text: str

    def where(self, offset: int = 0) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line + offset}"


def blocks(page: Path) -> list[Block]:
    found, lines, i = [], page.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, lang, start = match.group(2), match.group(3).lower(), i + 1
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            i += 1
        found.append(Block(page, start + 1, lang, "\n".join(lines[start:i])))
        i += 1
    return found


def commands(block: Block) -> list[tuple[str, list[str]]]:
    """(where, argv) for every simple command of a runnable block."""
    out, logical, first = [], "", 0
    for n, raw in enumerate(block.text.splitlines()):
        if not logical:
            first = n
        if raw.rstrip().endswith("\\"):
            logical += raw.rstrip()[:-1] + " "
            continue
        logical += raw
        lexer = shlex.shlex(logical, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        argv: list[str] = []
        for token in [*lexer, ";"]:
            if token in SEPARATORS:
                while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
                    argv.pop(0)
                if argv:
                    out.append((block.where(first), argv))
                argv = []
            else:
                argv.append(token)
        logical = ""
    return out


def runnable() -> list[tuple[str, list[str]]]:
    return [c for page in PAGES for b in blocks(page) if b.lang in RUNNABLE for c in commands(b)]


@cache
def help_text(command: str) -> str:
    from lmcor.cli import main

    shown = io.StringIO()
    with contextlib.redirect_stdout(shown), pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0, f"lmcor {command} --help exited {exit_.value.code}"
    return shown.getvalue()


def parse_lmcor(args: list[str]) -> str | None:
    """None if the CLI's own parser accepts `lmcor ARGS`, else what it said."""
    from lmcor import cli

    chosen = cli._chosen(args)
    if chosen is not None:
        help_text(chosen)
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(io.StringIO()):
            cli._parser(chosen)[0].parse_args(args)
    except SystemExit as e:
        return None if e.code == 0 else said.getvalue().strip().splitlines()[-1]
    return None


@cache
def extras() -> frozenset[str]:
    """The keys of setup.py's `extras_require`, read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require" and isinstance(node.value, ast.Dict):
            return frozenset(k.value for k in node.value.keys if isinstance(k, ast.Constant))
    return frozenset()


def problem(argv: list[str]) -> str | None:
    """What is wrong with one documented command, or None."""
    program, args = Path(argv[0]).name, argv[1:]
    if program.startswith("python") and args[:1] == ["-m"] and len(args) > 1:
        module, args = args[1], args[2:]
        if module in ("lmcor", "lmcor.cli"):
            return parse_lmcor(args)
        if importlib.util.find_spec(module) is None:
            return f"no module {module}"
        return None
    if program == "lmcor":
        return parse_lmcor(args)
    if program in ("pip", "pip3") and args[:1] == ["install"]:
        for arg in args[1:]:
            wanted = re.fullmatch(r"\.\[([\w,-]+)\]", arg)
            unknown = sorted(set(wanted.group(1).split(",")) - extras()) if wanted else []
            if unknown:
                return f"setup.py has no extra {', '.join(unknown)}"
        return None
    if program == "pytest":
        for arg in args:
            if not arg.startswith("-") and not (ROOT / arg.split("::")[0]).exists():
                return f"no test path {arg}"
    return None


COMMANDS = runnable()


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[f"{w} {a[0]}" for w, a in COMMANDS])
def test_documented_command(where: str, argv: list[str]):
    said = problem(argv)
    assert said is None, f"{where}: `{shlex.join(argv)}`: {said}"


def test_docs_show_commands():
    assert any(argv[0] == "lmcor" for _, argv in COMMANDS), "no runnable lmcor command found in the docs"


def test_checker_rejects_an_unknown_flag():
    assert problem(["lmcor", "correct", "in.jsonl", "--model", "m/"]) is None
    assert "unrecognized arguments: --no-such-flag" in problem(["lmcor", "correct", "in.jsonl", "--no-such-flag"])
    assert "invalid choice" in problem(["lmcor", "no-such-command"])
    assert "must be an integer from 1 to 1024" in problem(["lmcor", "correct", "--batch-size", "0"])
    assert problem(["python", "-m", "lmcor.no_such_module"]) == "no module lmcor.no_such_module"
    assert problem(["pip", "install", "-e", ".[no-such-extra]"]) == "setup.py has no extra no-such-extra"
    block = Block(ROOT / "README.md", 1, "bash", 'X=1 lmcor correct a.jsonl | lmcor correct - \\\n  -q  # note\n')
    assert commands(block) == [("README.md:1", ["lmcor", "correct", "a.jsonl"]), ("README.md:1", ["lmcor", "correct", "-", "-q"])]


PYTHON_BLOCKS = [b for page in PAGES for b in blocks(page) if b.lang in ("python", "py")]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[b.where() for b in PYTHON_BLOCKS])
def test_python_block(block: Block):
    tree = ast.parse(block.text, filename=block.where())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lmcor":
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), (
                    f"{block.where()}: {node.module} has no {alias.name}")


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_resolve(page: Path):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    broken = [target for target in LINK.findall(text)
              if "://" not in target and not target.startswith("mailto:") and not (page.parent / target).exists()]
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_readme_test_command_is_what_ci_runs():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
          if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    shown = {b.text.strip() for b in blocks(ROOT / "README.md") if b.lang in RUNNABLE}
    assert ci and ci[-1] in shown, f"README.md shows no runnable block that is exactly .ci/run's `{ci[-1]}`"


def test_parser_builds_per_command():
    """The docs check parses with `lmcor.cli._parser`; if that changes, this says so first."""
    from lmcor import cli

    for command in cli.COMMANDS:
        parser, chosen = cli._parser(command)
        assert isinstance(parser, argparse.ArgumentParser) and isinstance(chosen, argparse.ArgumentParser)
