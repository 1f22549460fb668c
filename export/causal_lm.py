"""Hugging Face decoder-only LM (LLaMA family, GPT-2 family) -> validated lmcor generator bundle.

optimum's exporter writes one graph with past keys/values (an empty past for the prompt). The
runtime feeds explicit position ids and an attention mask, so prompts of different lengths share
a batch and a shared prefix's cache can be reused; validation requires greedy tokens identical to
transformers' `generate`, alone and in a batch of different lengths.

`precision="fp16"` or `"bf16"` runs the matrix products in half precision (`half.py`; norms,
softmax, residuals and the graph's inputs and outputs stay fp32), validated against PyTorch fp32
within the precision's tolerances: each prompt's next-token logits, and greedy tokens identical on
enough of the prompts. bf16 runs on CUDA only; without a GPU its graph is checked structurally.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lmcor.runtime.bundle import DecoderShape, Manifest, SpecialTokens, write_manifest
from lmcor.runtime.errors import ExportError, InputError

from .checkpoint import (
    TOKENIZER_FILE,
    input_limit,
    input_limit_named,
    load_checkpoint,
    opset_of,
    output_limit,
    stage,
    staged_export,
    versions,
    warn_unapplied_generation,
)
from .half import ROTARY_MATMULS, to_half
from .reshapes import rewrite_file

MODEL_FILE = "model.onnx"
SAMPLE_PROMPTS = ("Correct the sentence: she go to school", "def add(a, b):", "The capital of France is", "a")
# Half precision is judged on more prompts: a near tie may flip one of them.
HALF_PROMPTS = SAMPLE_PROMPTS + ("Translate to French: good morning", "1, 2, 3, 4,", "Once upon a time",
                                 "Q: What is the boiling point of water?\nA:", "import numpy as np\n", "Dear Sir,")
PRECISIONS = ("fp32", "fp16", "bf16")
NEW_TOKENS = 12  # greedy tokens compared per prompt (fewer where the bundle allows fewer)


def _shape(config) -> DecoderShape:
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None) or heads  # Falcon's
    if config.model_type == "falcon" and config.multi_query and not config.new_decoder_architecture:
        kv_heads = 1  # Falcon-7B's multi-query attention: one key/value head, whatever num_kv_heads says
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return DecoderShape(layers, kv_heads, head_dim, config.vocab_size)


def _limits(config, tokenizer, max_input_tokens: int | None, max_output_tokens: int | None) -> tuple[int, int]:
    """(max input tokens, max output tokens) of a causal LM's bundle. Its prompt and answer share the
    input limit's positions, so an answer takes at most all but one of them."""
    inputs = input_limit(config, tokenizer, max_input_tokens)
    if inputs < 2:
        raise ExportError(f"{input_limit_named(max_input_tokens, inputs)}: a causal LM's positions hold its prompt "
                          "and its answer, at least 2")
    outputs = output_limit(config, max_output_tokens, after_prompt=True)
    if outputs >= inputs:
        if max_output_tokens is not None:
            raise ExportError(f"--max-output-tokens {outputs}: a causal LM's answer shares the bundle's {inputs} "
                              "positions (--max-input-tokens) with its prompt (at least 1 token); at most "
                              f"{inputs - 1}")
        outputs = inputs - 1
    return inputs, outputs


def export_causal_lm(model_dir: str | Path, out_dir: str | Path, *, max_input_tokens: int | None = None,
                     max_output_tokens: int | None = None, opset: int | None = None, precision: str = "fp32",
                     atol: float | None = None, overwrite: bool = False) -> Manifest:
    """Export a Hugging Face `AutoModelForCausalLM` checkpoint folder to `out_dir`, its matrix products
    in `precision` (see the module's docstring). `atol` (fp16/bf16 only) replaces the precision's
    absolute logit tolerance (`validate.HALF_TOLERANCES`); fp32 is held to identical greedy tokens."""
    if precision not in PRECISIONS:
        raise ExportError(f"a causal LM's precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if atol is not None and precision == "fp32":
        raise ExportError("--atol: a causal LM's fp32 validation requires identical greedy tokens, not a logit "
                          "tolerance (atol applies to fp16/bf16)")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model, tokenizer = load_checkpoint(model_dir, out_dir, "AutoModelForCausalLM", overwrite=overwrite)
    config = model.config
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else config.eos_token_id
    ends = [int(t) for t in eos] if isinstance(eos, list) else [] if eos is None else [int(eos)]
    if not ends:
        raise ExportError(f"{model_dir}: the config has no eos_token_id")
    eos = ends[0]  # the others (a chat model's end of turn) end answers too: the manifest's end_tokens
    # None, -1 (early LLaMA conversions) or past the embeddings: padding is lmcor's own, and EOS serves.
    pad = config.pad_token_id
    embeddings = model.get_input_embeddings().num_embeddings
    pad = pad if pad is not None and 0 <= pad < embeddings else eos
    # Recorded only (generation starts from the prompt's own tokens): a default past the embeddings
    # (GPT-2's 50256 in a small vocabulary) takes EOS's place as pad's does.
    bos = config.bos_token_id
    bos = bos if bos is not None and 0 <= bos < embeddings else eos
    if config.model_type == "falcon" and getattr(config, "new_decoder_architecture", False) and \
            getattr(config, "num_kv_heads", None) not in (None, config.num_attention_heads):
        raise ExportError(f"{model_dir}: a Falcon of grouped key/value heads ({config.num_kv_heads} for "
                          f"{config.num_attention_heads} query heads, new_decoder_architecture), whose cache optimum's "
                          "exporter cannot shape; multi-query Falcons (new_decoder_architecture false), and new ones "
                          "with as many key/value heads as query heads, export")
    if config.model_type == "phi" and getattr(config, "num_key_value_heads", None) not in (None, config.num_attention_heads):
        raise ExportError(f"{model_dir}: a Phi of grouped key/value heads ({config.num_key_value_heads} for "
                          f"{config.num_attention_heads} query heads), whose cache optimum's exporter cannot shape; "
                          "Phi with as many key/value heads as query heads, and Phi-3, export")
    warn_unapplied_generation(model.generation_config, frozenset(),
                              "greedy search, or sampling at a request's temperature and top_p")
    inputs, outputs = _limits(config, tokenizer, max_input_tokens, max_output_tokens)
    with staged_export(model_dir, out_dir, "text-generation-with-past", opset, model.config,
                       overwrite=overwrite) as (raw, staged):
        with stage(model_dir, "constant reshape targets"):
            rewrite_file(raw / MODEL_FILE)
        if precision == "fp32":
            for file in raw.glob(f"{MODEL_FILE}*"):
                shutil.copy(file, staged / file.name)
        else:
            with stage(model_dir, f"conversion to {precision}"):
                converted = to_half(raw / MODEL_FILE, staged / MODEL_FILE, precision, keep=ROTARY_MATMULS)
        tokenizer.backend_tokenizer.save(str(staged / TOKENIZER_FILE))
        manifest = Manifest(
            kind="causal-lm", architecture=config.model_type,
            max_input_tokens=inputs, precision=precision,
            opset=opset_of(raw / MODEL_FILE), files={"model": MODEL_FILE, "tokenizer": TOKENIZER_FILE},
            special_tokens=SpecialTokens(pad=int(pad), eos=int(eos), decoder_start=int(bos)), decoder=_shape(config),
            max_output_tokens=outputs, exporter=versions(),
            end_tokens=tuple(dict.fromkeys(t for t in ends[1:] if t != eos)), sliding_window=_sliding_window(config),
            clean_up_spaces=bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)),
        )
        write_manifest(staged, manifest)
        with stage(model_dir, "validation"):
            if precision == "fp32":
                validation = _validate(model, staged)
            else:
                validation = {**_validate_half(model, staged, precision, atol), "half_matmuls": converted.half_nodes}
        manifest = dataclasses.replace(manifest, validation=validation)
        write_manifest(staged, manifest)
    return manifest


def _fitting(generator, prompts: tuple[str, ...]) -> tuple[list[str], int]:
    """The sample `prompts` cut (by words) to half the bundle's positions at most, and the greedy
    tokens to compare after each: NEW_TOKENS, fewer where the bundle's limits allow fewer."""
    positions = generator.manifest.max_input_tokens
    fitted = []
    for prompt in prompts:
        while " " in prompt.strip() and len(generator.encode(prompt)) > positions // 2:
            prompt = prompt.strip().rsplit(" ", 1)[0]
        if len(generator.encode(prompt)) <= positions // 2:
            fitted.append(prompt)
    if not fitted:
        raise ExportError(f"--max-input-tokens {positions} leaves no room to validate the bundle on a one-word prompt "
                          "and its answer: give it more")
    longest = max(len(generator.encode(prompt)) for prompt in fitted)
    return fitted, min(NEW_TOKENS, generator.manifest.max_output_tokens, positions - longest + 1)


def _validate(model, bundle: Path) -> dict:
    import torch
    from lmcor.runtime.generator import Generator

    generator = Generator.load(bundle, providers=["CPUExecutionProvider"])
    special = generator.manifest.special_tokens
    prompts, max_new_tokens = _fitting(generator, SAMPLE_PROMPTS)
    try:
        batched = generator.generate_batch(prompts, max_new_tokens=max_new_tokens, batch_size=len(prompts))
        alone = generator.generate_batch(prompts, max_new_tokens=max_new_tokens, batch_size=1)
    except InputError as e:  # the graph failed on a sample: the export's fault, not a prompt's
        raise ExportError(f"validation failed: the exported graph cannot run the sample prompts ({e})") from None
    model.generation_config = greedy_config(special, max_new_tokens, generator.manifest.end_tokens)
    ends = {special.eos, *generator.manifest.end_tokens}
    for n, (prompt, ours, single) in enumerate(zip(prompts, batched, alone)):
        ids = torch.tensor([generator.encode(prompt)])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids))
        reference = out[0, ids.shape[1] :].tolist()
        reference = _answer(reference, ends)
        for how, got in (("in a batch", ours), ("alone", single)):
            if reference != got.token_ids:
                raise ExportError(f"validation failed: greedy tokens differ from PyTorch on sample {n} {how} "
                                  f"(PyTorch {reference[:12]}, ONNX {got.token_ids[:12]})")
    return {"samples": len(prompts), "greedy_tokens_identical": True, "batched": True}


def _validate_half(model, bundle: Path, precision: str, atol: float | None = None) -> dict:
    """A half-precision bundle against the PyTorch fp32 `model`: each prompt's next-token logits within
    the precision's tolerance (`atol`, if given, replacing its absolute part), and greedy tokens
    identical on at least its share of the prompts. A bf16 graph without CUDA gets the structural
    checks only."""
    import onnxruntime as ort
    import torch
    from lmcor.runtime.generator import Generator
    from lmcor.runtime.sessions import cuda_device_count

    from .validate import HALF_MIN_AGREEMENT, HALF_TOLERANCES, check_half_graphs, half_overflow, logit_difference

    if precision == "bf16" and not (cuda_device_count() and "CUDAExecutionProvider" in ort.get_available_providers()):
        return {"validated_on": "not run: no CUDA",  # as a corrector's: bf16 runs on CUDA only
                **check_half_graphs(bundle, [MODEL_FILE], precision, atol)}
    providers = ["CUDAExecutionProvider"] if precision == "bf16" else ["CPUExecutionProvider"]
    generator = Generator.load(bundle, providers=providers)
    special = generator.manifest.special_tokens
    worst = largest = 0.0
    identical = 0
    prompts, new_tokens = _fitting(generator, HALF_PROMPTS)
    model.generation_config = greedy_config(special, new_tokens, generator.manifest.end_tokens)
    ends = {special.eos, *generator.manifest.end_tokens}
    for prompt in prompts:
        ids = generator.encode(prompt)
        with torch.no_grad():
            theirs = model(input_ids=torch.tensor([ids])).logits[0, -1].float().numpy()
        ours = generator.next_logits(ids)
        worst, largest = max(worst, logit_difference(theirs, ours)), max(largest, float(np.abs(theirs).max()))
        with torch.no_grad():
            out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
        reference = out[0, len(ids):].tolist()
        reference = _answer(reference, ends)
        identical += generator.generate_batch([prompt], max_new_tokens=new_tokens)[0].token_ids == reference
    default_atol, rtol = HALF_TOLERANCES[precision]
    atol = default_atol if atol is None else atol
    tolerance = atol + rtol * largest
    agreement, least = identical / len(prompts), HALF_MIN_AGREEMENT[precision]
    if not np.isfinite(worst):
        raise ExportError(half_overflow(precision))
    if worst > tolerance:
        raise ExportError(f"validation of the {precision} graph failed: max |logit diff| {worst:.3g} exceeds the "
                          f"{precision} tolerance {tolerance:.3g} ({atol:g} + {rtol:g} x max |logit| {largest:.3g})")
    if agreement < least:
        raise ExportError(f"validation of the {precision} graph failed: greedy tokens identical to PyTorch fp32 on "
                          f"{agreement:.0%} of the prompts (at least {least:.0%} needed)")
    return {"samples": len(prompts), "max_abs_logit_diff": worst, "tolerance": tolerance,
            "greedy_tokens_identical": agreement == 1.0, "greedy_token_agreement": agreement,
            "min_greedy_token_agreement": least,  # the keys a half corrector's validation has
            "validated_on": "cuda" if precision == "bf16" else "cpu"}


def greedy_config(special, max_new_tokens: int, ends: Sequence[int] = ()):
    """The search `Generator` runs in greedy mode, as the model's generation config: set there rather than
    passed to `generate`, where transformers would fill the values left at their defaults from the
    checkpoint's own (a repetition penalty, sampling, beams)."""
    from transformers import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                            eos_token_id=[special.eos, *ends], pad_token_id=special.pad)


def _sliding_window(config) -> int | None:
    """The window of recent positions the model's attention spans, if it has one: Mistral's and Phi-3's
    `sliding_window`, Qwen2's where `use_sliding_window`, GPT-Neo's local layers' `window_size`."""
    if config.model_type == "gpt_neo":
        return int(config.window_size) if "local" in config.attention_layers else None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if isinstance(window, int) and window > 0 else None


def _answer(tokens: list[int], ends: set[int]) -> list[int]:
    """`generate`'s new tokens up to the first that ends the answer."""
    return next((tokens[:i] for i, t in enumerate(tokens) if t in ends), tokens)
