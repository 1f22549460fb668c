"""Train a corrector for your LLM, the LMCor way: (source, target) pairs -> the LLM's own candidates
-> a trained corrector -> a validated bundle with its fallback calibrated -> a report.

    lmcor train-corrector pairs.jsonl --llm my-llm-bundle/ --out build/my-corrector --minutes 60

A corrector improves the LLM whose candidates it was trained on, so the candidates come from that
LLM (`--llm`, `runtime.candidates`: 1 greedy + K-1 samples), or from the pairs themselves when
their lines carry `candidates`. Every stage keeps its work in OUT, so running the same command
again continues where it stopped:

1. read: `{"source", "target"}` lines (with `"candidates"` when there is no `--llm`); a bad line
   is reported with its number and skipped.
2. split: a held-out share, chosen by a hash of the source (stable when the file grows), halved
   into dev (checkpoint choice, fallback calibration) and test (the report).
3. candidates: `OUT/candidates.jsonl`, one line per input line, appended as they are written.
4. train (`recipes/train.fit`): from scratch, a T5 v1.1-style model of `--size` with the copy
   initialization and warm-up, or fine-tuning `--init` (a T5/BART checkpoint); `--synthetic`
   mixes in candidates from the synthetic candidate models over the training targets.
5. export and calibrate: `OUT/bundle`, validated against PyTorch, fallback calibrated on dev.
6. report: source, first, consensus, oracle candidate and the corrector (alone and with its
   fallback), exact match and chrF on test: `OUT/report.json` and a table.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from lmcor.cli import STDERR, say
from lmcor.cli.lines import split_lines
from lmcor.cli.options import DEFAULT_MAX_LINE_BYTES
from lmcor.runtime.bundle import Template, sha256_of
from lmcor.runtime.errors import BundleError, ExportError, InputError
from lmcor.runtime.jsonl import blank, dump_record, parse_line

from . import fallback, noise
from .noise import Example

log = logging.getLogger("lmcor.recipes")

SIZES = {  # from-scratch shapes; copy_init needs d_model 256 with 4 heads of 64
    "tiny": dict(encoder_layers=1, decoder_layers=1, d_ff=256, vocab_size=600),
    "small": dict(encoder_layers=3, decoder_layers=2, d_ff=640, vocab_size=4000),
    "base": dict(encoder_layers=6, decoder_layers=4, d_ff=1024, vocab_size=8000),
}


@dataclass(frozen=True)
class Pair:
    line: int
    source: str
    target: str
    candidates: tuple[str, ...] = ()


@dataclass(frozen=True)
class Job:
    pairs: Path
    out: Path
    llm: Path | None = None
    k: int = 5
    temperature: float = 0.6
    prompt: str | None = None
    size: str = "small"
    init: Path | None = None
    synthetic: float = 0.0  # share of training examples with synthetic candidates
    held_out: float = 0.1
    minutes: float = 60.0
    device: str = "cpu"
    resume: bool = True
    batch_size: int = 16  # the LLM's, for candidates
    max_new_tokens: int | None = None  # of each candidate (None: the LLM bundle's max output tokens, or fewer to fit)
    quiet: bool = False
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES  # a longer line of the pairs file is reported and skipped


SHOWN_BAD_LINES = 10  # said one by one; the rest are counted


def read_pairs(path: Path, need_candidates: bool, max_bytes: int = DEFAULT_MAX_LINE_BYTES) -> list[Pair]:
    """The usable pairs of a JSONL file; each bad line (or one over `max_bytes`) is reported on
    stderr (best effort: a closed one loses nothing else) and skipped."""
    pairs = []
    bad = 0
    with open(path, "rb") as f:
        for number, (raw, size) in enumerate(split_lines(f.read, max_bytes), start=1):
            if raw is None:
                why = f"{size} bytes, more than --max-line-bytes {max_bytes}: skipped"
            elif blank(raw, first=number == 1):
                continue
            else:
                try:
                    pairs.append(_pair(parse_line(raw, first=number == 1), number, need_candidates))
                    continue
                except InputError as e:
                    why = str(e)
            bad += 1
            if bad <= SHOWN_BAD_LINES:  # a file of bad lines (pairs without candidates, say) is not said line by line
                say(f"lmcor: {path}: line {number}: {why}")
    if bad > SHOWN_BAD_LINES:
        say(f"lmcor: {path}: {bad - SHOWN_BAD_LINES} more bad lines skipped ({bad} in all)")
    if not pairs:
        raise InputError(f"{path}: no usable pairs")
    return pairs


def _pair(value: object, line: int, need_candidates: bool) -> Pair:
    if not isinstance(value, dict):
        raise InputError("expected a JSON object with 'source' and 'target'")
    for name in ("source", "target"):
        if not isinstance(value.get(name), str) or not value[name].strip():
            raise InputError(f"field {name!r} must be a non-empty string")
    candidates = value.get("candidates", [])
    if need_candidates:
        if not isinstance(candidates, list) or not candidates or not all(isinstance(c, str) for c in candidates):
            raise InputError("field 'candidates' must be a non-empty list of strings (or pass --llm)")
    return Pair(line, value["source"], value["target"], tuple(candidates) if need_candidates else ())


# The smallest held-out share: dev and test each hold half of it, a pair or so of every two million.
LEAST_HELD_OUT = 1e-6


def part_of(source: str, held_out: float) -> str:
    """"train", "dev" or "test": by a hash of the source, stable however the file grows."""
    share = int.from_bytes(hashlib.sha256(source.encode("utf-8")).digest()[:8], "little") / 2**64
    return "train" if share >= held_out else "dev" if share < held_out / 2 else "test"


def groups(pairs: list[Pair]) -> list[int]:
    """Each pair's group: the index of the group's first pair in the file. Pairs that share a source or a
    target (white space and case aside) are in one group, and so, transitively, are their partners: data
    with several noisy sources per clean target, or several targets per source, has each target and each
    source in one group."""
    parent: dict[tuple[str, str], tuple[str, str]] = {}

    def root(key: tuple[str, str]) -> tuple[str, str]:
        parent.setdefault(key, key)
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    def keys(pair: Pair) -> tuple[tuple[str, str], tuple[str, str]]:
        return (("source", " ".join(pair.source.split()).casefold()),
                ("target", " ".join(pair.target.split()).casefold()))

    for pair in pairs:
        source, target = keys(pair)
        parent[root(source)] = root(target)
    first: dict[tuple[str, str], int] = {}
    return [first.setdefault(root(keys(pair)[0]), n) for n, pair in enumerate(pairs)]


def split(pairs: list[Pair], held_out: float) -> dict[str, list[Pair]]:
    """train / dev / test by groups (`groups`): each group goes where a hash of the least of its
    sources puts it, so that no source or target is in two parts, whatever order the file lists them
    in. A pair's part holds as the file grows, unless new pairs join its group."""
    if not LEAST_HELD_OUT <= held_out < 1:
        raise InputError(f"held_out must be a share from {LEAST_HELD_OUT:g} to below 1, got {held_out:g}")
    # dev and test each take about held_out/2 of the pairs: 4/held_out pairs give each two on average.
    enough = math.ceil(4 / held_out)
    if len(pairs) < 3:
        raise InputError(f"{len(pairs)} pair{' is' if len(pairs) == 1 else 's are'} too few: training, dev and test "
                         f"need at least 3 pairs, and with --held-out {held_out:g} about {enough} so that dev and test "
                         "are not empty")
    parts: dict[str, list[Pair]] = {"train": [], "dev": [], "test": []}
    firsts = groups(pairs)
    least: dict[int, str] = {}  # by group: not its first pair's source, which moves as lines are reordered
    for pair, first in zip(pairs, firsts):
        least[first] = min(least.get(first, pair.source), pair.source)
    for pair, first in zip(pairs, firsts):
        parts[part_of(least[first], held_out)].append(pair)
    if not parts["train"]:
        raise InputError(f"--held-out {held_out:g} leaves none of the {len(pairs)} pairs to train on; give a smaller one")
    if not parts["dev"] or not parts["test"]:
        held = f"{held_out / 2:.0%}" if held_out >= 0.02 else f"{held_out / 2:.2g}"
        raise InputError(f"--held-out {held_out:g} kept no {'dev' if not parts['dev'] else 'test'} pair of the "
                         f"{len(pairs)}, which make {_counted(len(set(firsts)), 'group')} (pairs that share a source or a target "
                         f"stay together; dev and test each take about {held} of the groups, by a hash of a source): "
                         f"give about {enough} different sources and targets or more, or a larger --held-out")
    return parts


# The candidate options' flags, for the messages of `CandidateWriter`'s checks.
_LLM_FLAGS = {"k": "-k", "temperature": "--temperature", "batch_size": "--llm-batch-size",
              "max_new_tokens": "--max-new-tokens"}


def candidate_writer(job: Job):
    """The LLM and its candidate options, checked: before OUT is cleared or made."""
    from lmcor.runtime.candidates import CandidateWriter, FewShot, default_few_shot
    from lmcor.runtime.generator import Generator

    few_shot = FewShot.from_template(job.prompt) if job.prompt is not None else default_few_shot()
    try:
        return CandidateWriter(Generator.load(job.llm), few_shot, k=job.k, temperature=job.temperature,
                               batch_size=job.batch_size, max_new_tokens=job.max_new_tokens)
    except InputError as e:
        raise InputError(re.sub(r"^\w+", lambda m: _LLM_FLAGS.get(m.group(0), m.group(0)), str(e))) from None


def llm_candidates(job: Job, pairs: list[Pair], writer, made_by: str) -> list[Pair]:
    """The pairs with `writer`'s candidates (`candidate_writer`), from `OUT/candidates.jsonl`, written
    there first for the sources it lacks (appended every 4 LLM batches, so an interrupted run loses at
    most those). `made_by`: `_made_by(job)`, which checksums the LLM's files: computed once by the caller."""
    path = job.out / "candidates.jsonl"
    # A source's candidates depend on it and on what made them alone (each sample's seed is the
    # source's): they are reused wherever the source is, after the pairs file grew or changed, or
    # the options changed and changed back; a source the file holds twice is generated once.
    done = {source: texts for (source, maker), texts in _cached_candidates(path).items() if maker == made_by}
    lines: dict[str, list[int]] = {}
    for p in pairs:
        if p.source not in done:
            lines.setdefault(p.source, []).append(p.line)
    todo = list(lines)
    if todo:
        chunk = job.batch_size * 4
        job.out.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as f, tqdm(total=len(todo), unit=" sources", desc="candidates",
                                                          file=STDERR, disable=job.quiet) as bar:
            try:
                for start in range(0, len(todo), chunk):
                    part = todo[start : start + chunk]
                    for source, result in zip(part, writer(part)):
                        if isinstance(result, InputError):
                            for line in lines[source]:
                                say(f"lmcor: {job.pairs}: line {line}: {result}")
                            continue
                        f.write(dump_record({"line": lines[source][0], "source": source, "made_by": made_by,
                                             "candidates": result.texts}))
                        done[source] = tuple(result.texts)
                    f.flush()
                    bar.update(len(part))
            except KeyboardInterrupt:
                bar.close()
                log.warning("interrupted while writing candidates: %d sources' candidates are kept in %s; run the same command "
                            "to continue", len(done), path)
                raise
        log.info("candidates: %s", writer.stats.summary())
    return [replace(p, candidates=done[p.source]) for p in pairs if p.source in done]


def _made_by(job: Job) -> str:
    """What a line's candidates depend on besides its source: the LLM (its files' checksums and its
    manifest's settings: a bundle exported again from the same checkpoint with other limits or end
    tokens has the same files), the prompt, k, the temperature and the length limit."""
    from lmcor.runtime.bundle import MANIFEST_NAME, load_manifest
    from lmcor.runtime.candidates import default_few_shot

    llm = {}
    if job.llm is not None:
        try:
            load_manifest(job.llm, kind="causal-lm")  # checked: the files are the ones it lists
        except (BundleError, InputError) as e:
            raise type(e)(f"--llm {e}") from None
        manifest = json.loads((job.llm / MANIFEST_NAME).read_text(encoding="utf-8"))
        llm = {key: value for key, value in manifest.items() if key not in ("validation", "exporter")}
    # The default prompt by its text: another lmcor's default is another prompt.
    default = default_few_shot()
    prompt = job.prompt if job.prompt is not None else [*default.heads, default.tail]
    what = {"llm": llm, "prompt": prompt, "k": job.k, "temperature": job.temperature,
            "max_new_tokens": job.max_new_tokens}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode("utf-8")).hexdigest()[:16]


def _cached_candidates(path: Path) -> dict[tuple[str, str], tuple[str, ...]]:
    """The candidates already written, by source and what made them (a later record of both replaces
    an earlier one). A record that is not well-formed is stale: its source is written again. A torn
    last line is cut off the file, so that appending starts on a new line."""
    done: dict[tuple[str, str], tuple[str, ...]] = {}
    if not path.is_file():
        return done
    with open(path, "rb") as f:
        lines = f.readlines()
    for raw in lines:
        try:
            record = json.loads(raw) if raw.endswith(b"\n") else None
        except (ValueError, RecursionError):  # not JSON; nested past Python's recursion limit
            continue
        if not isinstance(record, dict) or not isinstance(record.get("source"), str) or \
                not isinstance(record.get("made_by"), str):
            continue
        key, texts = (record["source"], record["made_by"]), record.get("candidates")
        if isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts):
            done[key] = tuple(texts)
        else:
            done.pop(key, None)
    if lines and not lines[-1].endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(sum(map(len, lines[:-1])))
    return done


def examples(pairs: list[Pair], synthetic: float, seed: int) -> Iterator[Example]:
    """Endless training examples: the pairs with their candidates, in a new order each epoch; a
    `synthetic` share instead carries as many candidates from the synthetic candidate models, drawn
    over the pair's target, so that the corrector also meets candidates unlike its LLM's. The noise
    writes words apart by single spaces: a target with other white space (lines, tabs, two spaces) keeps its own
    candidates, so that no example teaches the corrector to drop it."""
    rng = random.Random(seed)
    order = list(pairs)
    pool = [p.target for p in pairs]  # what an echoing candidate repeats
    while True:
        rng.shuffle(order)
        for pair in order:
            if rng.random() < synthetic and " ".join(pair.target.split()) == pair.target:
                yield noise.make_example(pair.target, rng, noise.draw_model(rng), pool=pool, k=len(pair.candidates))
            else:
                yield Example(pair.source, list(pair.candidates), pair.target)


# What a training run leaves in OUT besides the candidates, cleared by --restart.
RUN_STATE = ("checkpoint.pt", "best.pt", "train_log.jsonl", "tokenizer", "hf", "bundle", "report.json")
# Written before any of RUN_STATE, with the --held-out that made the split: it marks OUT as a
# train-corrector folder (`python -m lmcor.recipes.train` writes some of the same names), which
# --restart may clear, and a resumed run must keep that split or test on pairs it trained on.
MARK = "train-corrector.json"
SPLIT_RULE = "least-source"  # how `split` places a group: a run split by another rule would test on trained pairs


def _check_out(job: Job, model: dict, candidates: str | None) -> dict:
    """Refuse an OUT that this job must not use, before anything is written; the record of the run
    it resumes (`MARK`), or an empty one. `model`: what the job trains (`_model_said`); `candidates`:
    what makes its candidates (`_made_by`; None: the pairs file's own)."""
    out = job.out
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: not a folder (a file of that name exists)")
    mark = out / MARK
    if not mark.is_file():
        # Another tool's folder, or the user's own (".", a model's): a run would write beside their
        # files, over some of them, and --restart would remove them.
        found = sorted(entry.name for entry in out.iterdir()) if out.is_dir() else []
        if found:
            shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
            raise InputError(f"--out {out} is not a train-corrector folder (no {MARK}) and is not empty, so its "
                             f"{shown} stay: give a new or empty folder")
        return {}
    if not job.resume:
        return {}
    try:
        record = json.loads(mark.read_text(encoding="utf-8"))
        held_out = record["held_out"]
    except (ValueError, KeyError, TypeError):
        held_out = None
    if type(held_out) is not float:
        raise InputError(f"{mark}: not a train-corrector record (no number 'held_out'); restart it (--restart) "
                         "or train into another folder")
    trained = any((out / name).exists() for name in ("checkpoint.pt", "hf", "bundle"))
    if held_out != job.held_out and trained:  # a run that never trained may split anew
        raise InputError(f"{out}: a run split with --held-out {held_out:g}, and another split would test on pairs "
                         f"it trained on; give --held-out {held_out:g}, restart it (--restart) or train into "
                         "another folder")
    if record.get("split") != SPLIT_RULE and trained:  # an earlier lmcor's: each group by its first line
        raise InputError(f"{out}: a run split by an earlier lmcor's rule, and this one's split would test on pairs "
                         "it trained on; restart it (--restart) or train into another folder")
    before = record.get("model")
    # Another --init of the same shape would load the old weights without complaint, to be read with
    # its own tokenizer.
    if isinstance(before, dict) and _same_model(before) != _same_model(model) and trained:
        raise InputError(f"{out}: a run of another model ({_model_shown(before)}); restart it (--restart) or train "
                         "into another folder")
    # A corrector learns its LLM's mistakes: one trained on another LLM's candidates, or on candidates
    # made otherwise, would go on as if it were this one's (and with its minutes spent, be reported as it).
    if "candidates" in record and record["candidates"] != candidates and trained:
        raise InputError(f"{out}: a run trained on {_candidates_changed(record['candidates'], candidates)}; restart it "
                         "(--restart: the candidates made stay cached) or train into another folder")
    return record


def _candidates_changed(before: str | None, now: str | None) -> str:
    if before is None:
        return "the pairs file's own candidates, and this one on an LLM's (--llm)"
    if now is None:
        return "an LLM's candidates (--llm), and this one on the pairs file's own"
    return ("an LLM's candidates made otherwise than this run asks (another --llm bundle, or --prompt, -k, "
            "--temperature or --max-new-tokens changed)")


def _model_said(job: Job) -> dict:
    """What a run trains, as its record keeps it: the --size from scratch, or the --init checkpoint
    by a digest of its configuration and tokenizer files (its weights matter only before the first
    checkpoint)."""
    if job.init is None:
        return {"size": job.size}
    from lmcor.export.checkpoint import TOKENIZER_FILES

    digest = hashlib.sha256()
    for name in ("config.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 *TOKENIZER_FILES):
        if (job.init / name).is_file():
            digest.update(f"{name}:{sha256_of(job.init / name)}\n".encode())
    return {"init": str(job.init.resolve()), "files": digest.hexdigest()[:16]}


def _same_model(said: dict) -> tuple:
    return ("size", said.get("size")) if "size" in said else ("init", said.get("files"))


def _model_shown(said: dict) -> str:
    return f"--size {said['size']}" if "size" in said else f"--init {said.get('init')}"


def _clear(out: Path) -> None:
    """What an earlier run of train-corrector wrote, except its candidates: each record says what made it."""
    for name in (*RUN_STATE, MARK):
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)


@contextmanager
def _only_run(out: Path) -> Iterator[None]:
    """OUT, made and held by this run: a second run into the same folder would clear, train over and
    export over this one's files. The lock goes with the process, however it ends."""
    out.mkdir(parents=True, exist_ok=True)
    held = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"--out {out}: another train-corrector run is using this folder; wait for it to end, "
                             "or train into another folder") from None
        yield
    finally:
        os.close(held)


def _check_device(device: str) -> None:
    """A device PyTorch can train on here: refused before any work, not after it."""
    import torch

    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise InputError(f"--device {device}: not a PyTorch device (cpu, cuda, cuda:1...)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device}: this PyTorch sees no CUDA device (torch.cuda.is_available() is False)")


def _check_init(init: Path) -> str:
    """A local Hugging Face checkpoint folder with a tokenizer: never a Hub id, which would be fetched.
    Returns its model type."""
    from lmcor.export.checkpoint import TOKENIZER_FILES

    if not (init / "config.json").is_file():
        raise InputError(f"--init {init}: not a Hugging Face checkpoint folder (no config.json)")
    if not any((init / name).is_file() for name in TOKENIZER_FILES):
        raise InputError(f"--init {init}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    try:
        config = json.loads((init / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"--init {init}/config.json: not JSON ({e})") from None
    from lmcor.export.checkpoint import SEQ2SEQ_TYPES

    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind not in SEQ2SEQ_TYPES:
        what = "a seq2seq type lmcor does not export" if isinstance(config, dict) and config.get("is_encoder_decoder") \
            else "not a seq2seq one"
        raise InputError(f"--init {init}: a {kind or 'model'} checkpoint, {what}: give a {', '.join(SEQ2SEQ_TYPES)} "
                         "checkpoint")
    # Learned positions (BART's) must hold the longest input and target training makes.
    from .train import MAX_INPUT_TOKENS, MAX_TARGET_TOKENS

    positions = config.get("max_position_embeddings")
    needed = max(MAX_INPUT_TOKENS, MAX_TARGET_TOKENS)
    if kind in ("bart", "mbart") and isinstance(positions, int) and positions < needed:
        raise InputError(f"--init {init}: its {positions} positions hold no training input of up to {needed} tokens")
    return kind


def load_init(init: Path):
    """(model, tokenizer) of the --init checkpoint, whole and ready to fine-tune: loaded before OUT is
    touched or candidates are written, so that a checkpoint with unreadable files or missing weights
    is said at once."""
    from lmcor.export.checkpoint import load_model
    from lmcor.export.seq2seq import eos_token

    try:
        model, tokenizer = load_model(init, "AutoModelForSeq2SeqLM")
    except ExportError as e:
        raise InputError(f"--init {e}") from None
    # The candidates' separator is one token, as in T5's vocabulary; a tokenizer without it (BART's)
    # gets it (the white space around it taken in), else each separator would be a dozen pieces of
    # text, read as candidates' words.
    separator = Template().separator.strip()
    if separator not in tokenizer.get_vocab():
        from tokenizers import AddedToken

        tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken(separator, lstrip=True, rstrip=True)]},
                                     replace_additional_special_tokens=False)
    size = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > size:  # its tokens past the embeddings would fail the first step that reads one
        log.info("--init %s: its tokenizer has %d tokens and its embeddings %d: the embeddings are grown to hold "
                 "them", init, len(tokenizer), size)
        model.resize_token_embeddings(len(tokenizer))
    # Labels are the tokenizer's targets; mBART's start with the target language's code, which is the
    # source language's for a corrector unless the tokenizer says otherwise.
    if getattr(tokenizer, "tgt_lang", "") is None and getattr(tokenizer, "src_lang", None) is not None:
        tokenizer.tgt_lang = tokenizer.src_lang
    if tokenizer.pad_token_id is None:  # batches are padded with it, as the bundle pads with the config's
        pad = model.config.pad_token_id
        if pad is None:
            raise InputError(f"--init {init}: neither its tokenizer nor its config.json has a pad token: set "
                             "pad_token_id in its config.json (and pad_token in its tokenizer_config.json)")
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    labels = tokenizer(text_target="a")["input_ids"]
    try:  # as the export reads it, which would refuse it after the whole training
        eos = eos_token(model)
    except ExportError as e:
        raise InputError(f"--init {init}: {e}") from None
    if eos is not None and eos not in labels:
        # Targets without it would teach the corrector never to stop.
        raise InputError(f"--init {init}: its tokenizer ends no target with the model's EOS ({eos}): give its "
                         "tokenizer.json a post-processor that appends it (as T5's and BART's do)")
    _start_as_trained(init, model, tokenizer, labels)
    forced = model.generation_config.forced_bos_token_id
    first = labels[0]
    if forced is not None and first != forced:
        raise InputError(f"--init {init}: its generation config starts every output with token {forced} "
                         f"({tokenizer.convert_ids_to_tokens(forced)!r}), but its tokenizer starts a target with "
                         f"{first} ({tokenizer.convert_ids_to_tokens(first)!r}): set tgt_lang in its "
                         "tokenizer_config.json, or forced_bos_token_id in its generation_config.json, to the "
                         "outputs' language")
    return model.train(), tokenizer


def _start_as_trained(init: Path, model, tokenizer, labels: list[int]) -> None:
    """Make the token the model's outputs start from the one training feeds first. mBART (cc25) shifts
    its targets ("text </s> en_XX") by wrapping the language code round to the front, where its
    config's decoder start is "</s>": a bundle decoding from that would start as it never trained."""
    import torch

    shift = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    if shift is None:
        return
    try:
        start = int(shift(labels=torch.tensor([labels]))[0, 0])
    except (ValueError, TypeError) as e:  # transformers' shift needs a decoder start token
        raise InputError(f"--init {init}: its outputs have no first token ({e}): set decoder_start_token_id in its "
                         "config.json") from None
    said = model.generation_config.decoder_start_token_id
    said = model.config.decoder_start_token_id if said is None else said
    if start != said:
        log.info("--init %s: training starts each output from token %d (%r), not its configured %s: the bundle "
                 "decodes from %d", init, start, tokenizer.convert_ids_to_tokens(start), said, start)
        model.config.decoder_start_token_id = model.generation_config.decoder_start_token_id = start


def _model(job: Job, train: list[Pair], init):
    """(model, tokenizer, copy warm-up) for the job: from scratch, or `init` (`load_init`'s)."""
    from . import train as recipe

    if init is not None:
        return *init, False
    settings = recipe.Settings(**SIZES[job.size])
    tokenizer_dir = job.out / "tokenizer"
    # Made again until training has started with it: one left by a run that stopped before its first
    # checkpoint may be of another --size or pairs file.
    if not (tokenizer_dir / "tokenizer.json").is_file() or not (job.out / "checkpoint.pt").is_file():
        texts = [t for p in train for t in (p.source, p.target, *p.candidates)]
        with _progress_off_stdout(job.quiet):
            recipe.train_tokenizer(texts, settings.vocab_size).save_pretrained(tokenizer_dir)
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    model = recipe.build_model(settings, len(tokenizer))
    recipe.copy_init(model, settings.seed)
    return model, tokenizer, True


@contextmanager
def _progress_off_stdout(quiet: bool) -> Iterator[None]:
    """The tokenizers trainer's progress (Rust) writes to file descriptor 1 itself: send it to stderr
    (nowhere when quiet), so that stdout holds only the report."""
    from lmcor.export.checkpoint import redirected_output

    with open(os.devnull, "wb") as nowhere, redirected_output((1,), nowhere.fileno() if quiet else 2):
        yield


def _fitting(tokenizer, pairs: list[Pair], path: Path) -> tuple[list[Pair], list[str]]:
    """The pairs the corrector reads and writes whole (as `recipes.train._encoded` takes them), and why
    the others are left out, counted: the runtime's refusal of the first (a source alone longer than
    the input, too many candidates to fit it beside the source), or a target too long to write."""
    from .train import MAX_TARGET_TOKENS, _read

    read = _read(tokenizer, [Example(p.source, list(p.candidates), p.target) for p in pairs])
    targets = tokenizer(text_target=[p.target for p in pairs], truncation=False, verbose=False)["input_ids"]
    kept, unread, long_targets = [], [], 0
    for p, x, t in zip(pairs, read, targets):
        if isinstance(x, InputError):
            unread.append((p, x))
        elif len(t) > MAX_TARGET_TOKENS:
            long_targets += 1
        else:
            kept.append(p)
    why = ([f"{len(unread)} the corrector cannot read (the first, {path}: line {unread[0][0].line}: {unread[0][1]})"]
           if unread else [])
    why += [f"{long_targets} whose targets are longer than the {MAX_TARGET_TOKENS} tokens it writes"] if long_targets else []
    return kept, why


def _counted(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _write_items(path: Path, pairs: list[Pair]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(dump_record({"id": p.line, "source": p.source, "candidates": list(p.candidates), "target": p.target}))


def report(bundle: Path, test: Path, quiet: bool = False) -> dict:
    """Every baseline and the corrector on `test`, exact match and chrF (`quiet`: no progress bar)."""
    from lmcor.bench.quality import consensus, oracle, read_items, score
    from lmcor.runtime.corrector import Corrector

    items = read_items(test)[0]
    corrector = Corrector.load(bundle)
    with tqdm(total=2 * len(items), unit=" outputs", desc="the report", file=STDERR, disable=quiet) as bar:
        every = len(items)
        items, with_fallback = fallback.readable(corrector, items, str(test), "the report", progress=bar.update)
        bar.total = every + len(items)  # those too long for the corrector are not decoded again
        alone = corrector.correct_batch([(i.source, i.candidates) for i in items], fallback_below=0,
                                        progress=bar.update)
    targets = [i.target for i in items]
    outputs = {
        "source": [i.source for i in items],
        "first candidate": [i.candidates[0] for i in items],
        "consensus candidate": [consensus(i.candidates) for i in items],
        "oracle candidate": [oracle(i.candidates, i.target) for i in items],
        "corrector alone": [c.text for c in alone],
        "corrector": [c.text for c in with_fallback],
    }
    return {"items": len(items), "fallbacks": sum(c.fallback for c in with_fallback),
            "systems": {name: score(texts, targets) for name, texts in outputs.items()}}


def table(result: dict) -> str:
    rows = [f"{'system':<22} {'exact match':>11} {'chrF':>7}"]
    rows += [f"{name:<22} {s['exact_match']:>11.2f} {s['chrf']:>7.2f}" for name, s in result["systems"].items()]
    rows.append(f"({_counted(result['items'], 'held-out test line')}; {_counted(result['fallbacks'], 'output')} fell back)")
    return "\n".join(rows)


def _stamp(path: Path) -> str:
    """A file as this run left it (only lmcor rewrites a checkpoint, whole)."""
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _made_from(job: Job, pairs_digest: str, made_by: str | None) -> dict:
    """What a training run reads besides its model: the pairs as read, their candidates, the synthetic share."""
    return {"pairs": pairs_digest, "max_line_bytes": job.max_line_bytes, "candidates": made_by,
            "synthetic": job.synthetic}


def _changed(before: dict, now: dict, pairs: Path) -> str:
    """How a run's `_made_from` differs from the one its checkpoint was trained from (other candidates
    are refused before: `_check_out`)."""
    said = [f"another pairs file (or {pairs} before it changed)"] if before.get("pairs") != now["pairs"] else []
    for key, flag in (("max_line_bytes", "--max-line-bytes"), ("synthetic", "--synthetic")):
        if before.get(key) != now[key]:
            said.append(f"{flag} {before.get(key)!r}")
    return ", ".join(said)


def _reported(job: Job, made_from: dict) -> dict | None:
    """The report of a run with nothing left to do: trained from `made_from` for --minutes or more,
    then exported, calibrated and reported from the checkpoint that is there now; None otherwise."""
    from lmcor.runtime.bundle import MANIFEST_NAME

    try:
        result = json.loads((job.out / "report.json").read_text(encoding="utf-8"))
        trained = result["trained"]
        done = (trained["checkpoint"] == _stamp(job.out / "checkpoint.pt") and job.minutes <= trained["minutes"]
                and trained["made_from"] == made_from)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return result if done and (job.out / "bundle" / MANIFEST_NAME).is_file() else None


def run(job: Job) -> dict:
    """Every stage of the job; returns the report."""
    from lmcor.export import export_corrector

    from . import train as recipe

    if job.size not in SIZES:
        raise InputError(f"--size must be one of {', '.join(SIZES)}, got {job.size!r}")
    _check_device(job.device)
    if job.init is not None:
        _check_init(job.init)
    model_said = _model_said(job)
    made_by = _made_by(job) if job.llm is not None else None
    resumed = _check_out(job, model_said, made_by)
    # Every input is checked before OUT is cleared or made.
    pairs = read_pairs(job.pairs, need_candidates=job.llm is None, max_bytes=job.max_line_bytes)
    split(pairs, job.held_out)
    made_from = _made_from(job, sha256_of(job.pairs), made_by)
    trained_on = resumed.get("trained_on")  # what the checkpoint there was trained from
    if isinstance(trained_on, dict) and trained_on != made_from and (job.out / "checkpoint.pt").is_file():
        log.warning("%s: its checkpoint was trained with %s: training goes on from it, with its tokenizer, for "
                    "what is left of --minutes; --restart trains afresh", job.out,
                    _changed(trained_on, made_from, job.pairs))
    init = load_init(job.init) if job.init is not None else None
    writer = candidate_writer(job) if job.llm is not None else None
    # The folder is this command's from now on (no other run's): candidates cut short by a signal are
    # continued.
    with _only_run(job.out):
        if not job.resume:
            _clear(job.out)
        record = {"held_out": job.held_out, "split": SPLIT_RULE, "model": model_said, "candidates": made_by,
                  "trained_on": trained_on}
        (job.out / MARK).write_text(json.dumps(record) + "\n", encoding="utf-8")
        if writer is not None:
            pairs = llm_candidates(job, pairs, writer, made_by)
        done = _reported(job, made_from)
        if done is not None:
            log.warning("%s: trained for --minutes %g already, exported and reported: its report follows (more "
                        "--minutes trains on, --restart starts over)", job.out, done["trained"]["minutes"])
            return done
        parts = split(pairs, job.held_out)
        _write_items(job.out / "dev.jsonl", parts["dev"])
        _write_items(job.out / "test.jsonl", parts["test"])
        log.info("pairs: %d train, %d dev, %d test", *(len(parts[n]) for n in ("train", "dev", "test")))
        model, tokenizer, warmup = _model(job, parts["train"], init)
        fitting, left_out = {}, {}
        for name in ("train", "dev", "test"):
            fitting[name], left_out[name] = _fitting(tokenizer, parts[name], job.pairs)
            if not fitting[name]:  # said now, not after the training budget
                raise InputError(f"no {name} pair fits the corrector's {recipe.MAX_INPUT_TOKENS} input tokens and "
                                 f"{recipe.MAX_TARGET_TOKENS} output tokens ({'; '.join(left_out[name])}): shorten "
                                 "them, or split them into sentences")
        for name in ("train", "dev"):
            if left_out[name]:
                log.warning("%d %s pairs left out of %s: %s", len(parts[name]) - len(fitting[name]), name,
                            "training" if name == "train" else "checkpoint choice", "; ".join(left_out[name]))
        settings = recipe.Settings(**SIZES[job.size]) if job.init is None else recipe.Settings(lr=1e-4, warmup_steps=50)
        dev = [Example(p.source, list(p.candidates), p.target) for p in fitting["dev"]]  # as the bundle reads them
        # From here the checkpoint is this run's (a run that failed before would have left it as it was).
        (job.out / MARK).write_text(json.dumps({**record, "trained_on": made_from}) + "\n", encoding="utf-8")
        hf = recipe.fit(job.out, job.minutes, settings, model=model, tokenizer=tokenizer,
                        examples=lambda step: examples(fitting["train"], job.synthetic, settings.seed + step), dev=dev,
                        copy_warmup=warmup, resume=job.resume, device=job.device,
                        eval_minutes=max(1.0, job.minutes / 10), show_progress=not job.quiet)
        bundle = job.out / "bundle"
        stage = "export"
        (job.out / "report.json").unlink(missing_ok=True)  # an earlier run's: it does not describe what is made now
        try:
            export_corrector(hf, bundle, max_input_tokens=recipe.MAX_INPUT_TOKENS,
                             max_output_tokens=recipe.MAX_TARGET_TOKENS, overwrite=True)
            stage = "fallback calibration"
            fallback.calibrate_bundle(bundle, job.out / "dev.jsonl", quiet=job.quiet)
            stage = "report"
            result = report(bundle, job.out / "test.jsonl", quiet=job.quiet)
            # What it describes: a run again with no more minutes to train returns it (`_reported`).
            result["trained"] = {"minutes": job.minutes, "checkpoint": _stamp(job.out / "checkpoint.pt"),
                                 "made_from": made_from}
            (job.out / "report.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        except KeyboardInterrupt:  # training is saved: a run again goes straight back to this stage
            log.warning("interrupted during the %s of %s (training is done and saved); run the same command again to "
                        "continue", stage, bundle)
            raise
        return result
