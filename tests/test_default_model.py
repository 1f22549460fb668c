"""The corrector shipped inside the package: loads with no path and really corrects."""

import json
import subprocess
import sys
from pathlib import Path

from lmcor import Corrector
from lmcor.runtime.corrector import default_bundle

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "requests.jsonl"


def test_default_bundle_is_package_data_and_small():
    bundle = default_bundle()
    assert (bundle / "lmcor.json").is_file()
    assert sum(p.stat().st_size for p in bundle.iterdir()) <= 25 * 2**20


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
