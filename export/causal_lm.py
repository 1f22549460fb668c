"""Hugging Face decoder-only LM (LLaMA family, GPT-2 family) -> validated lmcor generator bundle.

optimum's exporter writes one graph with past keys/values (an empty past for the prompt). The
runtime feeds explicit position ids and an attention mask, so prompts of different lengths share
a batch and a shared prefix's cache can be reused; validation requires greedy tokens identical to
transformers' `generate`, alone and in a batch of different lengths.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from lmcor.runtime.bundle import DecoderShape, Manifest, SpecialTokens, write_manifest
from lmcor.runtime.errors import ExportError

from .checkpoint import (
    TOKENIZER_FILE,
    default_max_input_tokens,
    load_checkpoint,
    opset_of,
    stage,
    staged_export,
    versions,
)

MODEL_FILE = "model.onnx"
SAMPLE_PROMPTS = ("Correct the sentence: she go to school", "def add(a, b):", "The capital of France is", "a")


def _shape(config) -> DecoderShape:
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return DecoderShape(layers, kv_heads, head_dim, config.vocab_size)


def export_causal_lm(model_dir: str | Path, out_dir: str | Path, *, max_input_tokens: int | None = None,
                     max_output_tokens: int = 256, opset: int | None = None, overwrite: bool = False) -> Manifest:
    """Export a Hugging Face `AutoModelForCausalLM` checkpoint folder to `out_dir`."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model, tokenizer = load_checkpoint(model_dir, out_dir, "AutoModelForCausalLM", overwrite=overwrite)
    config = model.config
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is None:
        raise ExportError(f"{model_dir}: the config has no eos_token_id")
    pad = config.pad_token_id if config.pad_token_id is not None else eos
    bos = config.bos_token_id if config.bos_token_id is not None else eos
    with staged_export(model_dir, out_dir, "text-generation-with-past", opset) as (raw, staged):
        for file in raw.glob(f"{MODEL_FILE}*"):
            shutil.copy(file, staged / file.name)
        tokenizer.backend_tokenizer.save(str(staged / TOKENIZER_FILE))
        manifest = Manifest(
            kind="causal-lm", architecture=config.model_type,
            max_input_tokens=max_input_tokens or default_max_input_tokens(config, tokenizer), precision="fp32",
            opset=opset_of(raw / MODEL_FILE), files={"model": MODEL_FILE, "tokenizer": TOKENIZER_FILE},
            special_tokens=SpecialTokens(pad=int(pad), eos=int(eos), decoder_start=int(bos)), decoder=_shape(config),
            max_output_tokens=max_output_tokens, exporter=versions(),
        )
        write_manifest(staged, manifest)
        with stage(model_dir, "validation"):
            validation = _validate(model, staged)
        manifest = dataclasses.replace(manifest, validation=validation)
        write_manifest(staged, manifest)
    return manifest


def _validate(model, bundle: Path, max_new_tokens: int = 12) -> dict:
    import torch
    from lmcor.runtime.generator import Generator

    generator = Generator.load(bundle, providers=["CPUExecutionProvider"])
    special = generator.manifest.special_tokens
    batched = generator.generate_batch(list(SAMPLE_PROMPTS), max_new_tokens=max_new_tokens, batch_size=len(SAMPLE_PROMPTS))
    for n, (prompt, ours) in enumerate(zip(SAMPLE_PROMPTS, batched)):
        ids = torch.tensor([generator.encode(prompt)])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, eos_token_id=special.eos, pad_token_id=special.pad)
        reference = out[0, ids.shape[1] :].tolist()
        reference = reference[: reference.index(special.eos)] if special.eos in reference else reference
        if reference != ours.token_ids:
            raise ExportError(f"validation failed: greedy tokens differ from PyTorch on sample {n} "
                              f"(PyTorch {reference[:12]}, ONNX {ours.token_ids[:12]})")
    return {"samples": len(SAMPLE_PROMPTS), "greedy_tokens_identical": True, "batched": True}
