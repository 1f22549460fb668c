"""The corrector shipped inside the package: loads with no path and really corrects."""

import json
import subprocess
import sys
from pathlib import Path

from lmcor.runtime.corrector import default_bundle

from lmcor import Corrector

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "requests.jsonl"
SPLITS = ROOT / "recipes" / "splits"


def test_default_bundle_is_package_data_and_small():
    bundle = default_bundle()
    assert (bundle / "lmcor.json").is_file()
    assert sum(p.stat().st_size for p in bundle.iterdir()) <= 25_000_000


def test_default_corrector_fixes_an_easy_case():
    corrector = Corrector.load()
    assert corrector.manifest.kind == "corrector" and corrector.manifest.architecture == "t5"
    candidates = ["She goes to school every day."] * 3 + ["She go to school every day.", "She goes to school every days."]
    assert corrector.correct("She go to school every days.", candidates) == "She goes to school every day."


def test_main_command_corrects_the_shipped_examples():
    run = subprocess.run([sys.executable, "-m", "lmcor.cli", "correct", str(EXAMPLES), "-q"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    records = [json.loads(line) for line in run.stdout.splitlines()]
    requests = [json.loads(line) for line in EXAMPLES.read_text().splitlines()]
    assert [r["id"] for r in records] == [r["id"] for r in requests]
    assert all(r["output"].strip() and not r["truncated"] for r in records)


def test_drafts_on_the_default_corrector_change_nothing_and_save_calls():
    from lmcor.bench.drafts import read_requests

    corrector = Corrector.load()
    assert corrector.drafts_supported
    requests = read_requests(SPLITS / "test.jsonl", 160)
    plain = corrector.correct_batch(requests, batch_size=8, drafts=False)
    drafted = corrector.correct_batch(requests, batch_size=8)
    assert [c.token_ids for c in drafted] == [c.token_ids for c in plain]
    single = corrector.correct_batch(requests[:16], batch_size=1)
    assert [c.token_ids for c in single] == [c.token_ids for c in plain[:16]]
    generated = sum(len(c.token_ids) + 1 for c in single)
    assert sum(c.stats.decoder_calls for c in single) < generated / 3  # most calls accept several tokens

