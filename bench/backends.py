"""The systems compared by `lmcor bench`, behind one small interface.

Each backend takes the same input ids and returns output ids; converting the checkpoint for it
(ONNX export, CTranslate2 conversion) happens once and is cached in the bench's cache folder.
A backend whose package is missing is skipped by the harness, with a note.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from lmcor.runtime.batching import pad_batch


@dataclass
class Output:
    tokens: list[list[int]]
    encoder_s: float | None = None  # where the backend reports its phases (lmcor)
    decoder_s: float | None = None
    decoder_calls: int | None = None


class Backend:
    name: str

    def generate(self, inputs: list[np.ndarray], new_tokens: int, forced: bool, batch_size: int) -> Output:
        raise NotImplementedError


def _cut(tokens: list[int], eos: int) -> list[int]:
    return tokens[: tokens.index(eos)] if eos in tokens else tokens


def bundle_for(hf_dir: Path, cache: Path, precision: str = "fp32") -> Path:
    """The lmcor bundle of a checkpoint, exported on first use."""
    from lmcor.export import export_corrector
    from lmcor.runtime.bundle import FORMAT_VERSION, load_manifest
    from lmcor.runtime.errors import BundleError

    bundle = cache / f"bundle-{precision}"
    # A bundle cached by an older lmcor (or not at all) is exported again rather than benchmarked as it was.
    try:
        current = load_manifest(bundle, verify=False).format_version == FORMAT_VERSION
    except BundleError:
        current = False
    if not current:
        export_corrector(hf_dir, bundle, precision=precision, overwrite=True)
    return bundle


class Lmcor(Backend):
    def __init__(self, hf_dir: Path, cache: Path, threads: int, precision: str = "fp32"):
        from lmcor.runtime.corrector import Corrector

        self.name = "lmcor" if precision == "fp32" else f"lmcor-{precision}"
        self.corrector = Corrector.load(bundle_for(hf_dir, cache, precision), threads=threads)

    def generate(self, inputs, new_tokens, forced, batch_size):
        before = self.corrector.engine.stats
        results = self.corrector.generate(inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens if forced else 0,
                                          batch_size=batch_size)
        used = self.corrector.engine.stats - before
        return Output([r.token_ids for r in results], used.encoder_s, used.decoder_s, used.decoder_calls)


class Transformers(Backend):
    """Hugging Face eager `generate` on PyTorch."""

    name = "transformers"

    def __init__(self, hf_dir: Path, cache: Path, threads: int):
        import torch
        from transformers import AutoModelForSeq2SeqLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForSeq2SeqLM.from_pretrained(hf_dir, attn_implementation="eager").eval()
        self.pad, self.eos = self.model.config.pad_token_id, self.model.config.eos_token_id

    def generate(self, inputs, new_tokens, forced, batch_size):
        out: list[list[int]] = []
        for start in range(0, len(inputs), batch_size):
            ids, mask = pad_batch(inputs[start : start + batch_size], self.pad)
            with self.torch.inference_mode():
                result = self.model.generate(input_ids=self.torch.from_numpy(ids), attention_mask=self.torch.from_numpy(mask),
                                             max_new_tokens=new_tokens, min_new_tokens=new_tokens if forced else 0,
                                             do_sample=False, num_beams=1)
            out += [_cut(row[1:], self.eos) for row in result.tolist()]
        return Output(out)


class Optimum(Transformers):
    """optimum's ORTModelForSeq2SeqLM: ONNX Runtime sessions behind transformers' `generate`."""

    name = "optimum"

    def __init__(self, hf_dir: Path, cache: Path, threads: int):
        import onnxruntime as ort
        import torch
        from lmcor.export.checkpoint import quiet_exporter
        from optimum.exporters.onnx import main_export
        from optimum.onnxruntime import ORTModelForSeq2SeqLM

        folder = cache / "optimum"
        if not (folder / "decoder_model_merged.onnx").is_file():
            with quiet_exporter():
                main_export(str(hf_dir), output=folder, task="text2text-generation-with-past", do_validation=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.model = ORTModelForSeq2SeqLM.from_pretrained(folder, session_options=options, use_cache=True)
        # optimum-onnx 0.1.0 sizes its first-step dummy past as d_model // num_heads, which is wrong
        # where d_kv differs (Flan-T5 shapes); the config knows the real head size.
        head = getattr(self.model.config, "d_kv", None)
        if head:
            self.model.decoder.embed_size_per_head = head
        self.torch = torch
        self.pad, self.eos = self.model.config.pad_token_id, self.model.config.eos_token_id


class CTranslate2(Backend):
    def __init__(self, hf_dir: Path, cache: Path, threads: int, precision: str = "fp32"):
        import ctranslate2
        from transformers import AutoTokenizer

        self.name = "ct2" if precision == "fp32" else f"ct2-{precision}"
        folder = cache / f"ct2-{precision}"
        if not (folder / "model.bin").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            ctranslate2.converters.TransformersConverter(str(hf_dir)).convert(
                str(folder), quantization=None if precision == "fp32" else precision)
        self.translator = ctranslate2.Translator(str(folder), device="cpu", intra_threads=threads, inter_threads=1,
                                                 compute_type="float32" if precision == "fp32" else precision)
        self.tokenizer = AutoTokenizer.from_pretrained(hf_dir)
        self.eos = self.tokenizer.eos_token_id

    def generate(self, inputs, new_tokens, forced, batch_size):
        source = [self.tokenizer.convert_ids_to_tokens(x.tolist()) for x in inputs]
        results = self.translator.translate_batch(source, max_batch_size=batch_size, beam_size=1,
                                                  max_decoding_length=new_tokens,
                                                  min_decoding_length=new_tokens if forced else 0)
        return Output([_cut(self.tokenizer.convert_tokens_to_ids(r.hypotheses[0]), self.eos) for r in results])


# name -> (constructor, keyword arguments, the package it needs)
BACKENDS: dict[str, tuple[Any, dict, str]] = {
    "lmcor": (Lmcor, {}, "onnxruntime"),
    "lmcor-int8": (Lmcor, {"precision": "int8"}, "onnxruntime"),
    "transformers": (Transformers, {}, "transformers"),
    "optimum": (Optimum, {}, "optimum.onnxruntime"),
    "ct2": (CTranslate2, {}, "ctranslate2"),
    "ct2-int8": (CTranslate2, {"precision": "int8"}, "ctranslate2"),
}
