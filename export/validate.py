"""Validation of an exported corrector against its PyTorch checkpoint.

Two checks on sample requests: the largest |logit difference| between PyTorch and the ONNX
encoder + decoder (first step, then all later tokens in one cached multi-token call, the path
drafted decoding relies on), and greedy tokens identical to `generate`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from lmcor.runtime.corrector import Corrector
from lmcor.runtime.decode import open_decoder
from lmcor.runtime.encode import encode
from lmcor.runtime.errors import ExportError, InputError
from lmcor.runtime.request import Request
from lmcor.runtime.tokens import ModelInput, encode_requests

log = logging.getLogger("lmcor")

# Varied, ordinary-English requests in LMCor's shape; any checkpoint can be validated on them.
SAMPLE_REQUESTS = (
    Request("she go to school every days", ("She goes to school every day.", "She go to school every day.", "She goes to the school every days.")),
    Request("The results was suprising , and nobody expected them", ("The results were surprising, and nobody expected them.", "The result was surprising and nobody expected it.")),
    Request("Can you tell me where is the station?", ("Can you tell me where the station is?", "Could you tell me where is the station?", "Can you tell me where the station is?", "Can you tell me, where is the station?", "Can you tell me where is station?")),
    Request("In 2019 we has moved to Paris for 3 years.", ("In 2019 we moved to Paris for 3 years.", "In 2019, we have moved to Paris for three years.")),
    Request("he don't like \"spicy\" food!", ("He doesn't like \"spicy\" food!", "He don't like spicy food!", "He does not like \"spicy\" food.")),
    Request("a", ("a",)),
)


# Half-precision bundles against PyTorch fp32: |logit diff| <= ATOL + RTOL * max|logit|, and at least
# MIN_AGREEMENT of the samples with greedy tokens identical (a near tie may flip one sample's path).
HALF_TOLERANCES = {"fp16": (5e-2, 1e-2), "bf16": (1e-1, 4e-2)}  # (atol, rtol)
HALF_MIN_AGREEMENT = {"fp16": 0.8, "bf16": 0.6}


@dataclass(frozen=True)
class ValidationReport:
    samples: int
    max_abs_logit_diff: float
    tolerance: float | None  # None where the bundle is not expected to match exactly (int8)
    greedy_token_agreement: float  # share of samples whose greedy tokens equal PyTorch's
    validated_on: str = "cpu"  # the execution provider, or "not run: ..." (a bf16 bundle without CUDA)
    min_agreement: float | None = None  # half precision: the least agreement accepted

    def as_dict(self) -> dict:
        out = {
            "samples": self.samples,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "tolerance": self.tolerance,
            "greedy_tokens_identical": self.greedy_token_agreement == 1.0,
            "greedy_token_agreement": self.greedy_token_agreement,
            "validated_on": self.validated_on,
        }
        if self.min_agreement is not None:
            out["min_greedy_token_agreement"] = self.min_agreement
        return out


def validate_half(model, bundle: Path, precision: str, *, providers: Sequence[str] = ("CPUExecutionProvider",),
                  requests: Sequence[Request] = SAMPLE_REQUESTS, atol: float | None = None) -> ValidationReport:
    """Compare a half-precision bundle with the PyTorch fp32 `model` on `providers`; raise `ExportError`
    unless logits agree within the precision's tolerance (`atol`, if given, replacing its absolute part)
    and enough samples' greedy tokens are identical."""
    default_atol, rtol = HALF_TOLERANCES[precision]
    atol = default_atol if atol is None else atol
    report = validate_corrector(model, bundle, requests=requests, exact=False, providers=providers)
    tolerance = atol + rtol * report.max_abs_logit
    least = HALF_MIN_AGREEMENT[precision]
    if not math.isfinite(report.max_abs_logit_diff):
        raise ExportError(half_overflow(precision))
    if report.max_abs_logit_diff > tolerance:
        raise ExportError(f"validation of the {precision} graphs failed: max |logit diff| "
                          f"{report.max_abs_logit_diff:.3g} exceeds the {precision} tolerance {tolerance:.3g} "
                          f"({atol:g} + {rtol:g} x max |logit| {report.max_abs_logit:.3g})")
    if report.greedy_token_agreement < least:
        raise ExportError(f"validation of the {precision} graphs failed: greedy tokens identical to PyTorch fp32 on "
                          f"{report.greedy_token_agreement:.0%} of the samples (at least {least:.0%} needed)")
    where = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"
    return ValidationReport(report.samples, report.max_abs_logit_diff, tolerance, report.greedy_token_agreement,
                            validated_on=where, min_agreement=least)


def half_overflow(precision: str) -> str:
    """What a half graph's logits that are no numbers (where PyTorch fp32's are) mean."""
    return (f"validation of the {precision} graphs failed: they give logits that are not finite numbers (NaN or "
            f"infinite) where PyTorch's are: an activation overflows {precision}'s range"
            + (" (65504); export bf16 (same range as fp32) or fp32" if precision == "fp16" else "; export fp32"))


def validate_corrector(
    model,
    bundle: Path,
    *,
    requests: Sequence[Request] = SAMPLE_REQUESTS,
    max_new_tokens: int = 24,
    atol: float = 1e-3,
    rtol: float = 1e-4,
    exact: bool = True,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    own_rounding: bool = True,
) -> ValidationReport:
    """Compare the bundle in `bundle` with the PyTorch `model`, decoding at most `max_new_tokens` (and
    at most the bundle's max_output_tokens). With `exact`, raise `ExportError` unless logits agree
    within `atol + rtol * max|logit|` (or, with `own_rounding`, the bundle is as close to float64
    arithmetic as PyTorch fp32 is) and greedy tokens are identical."""
    import torch

    corrector = Corrector.load(bundle, providers=list(providers))
    manifest = corrector.manifest
    max_new_tokens = min(max_new_tokens, manifest.max_output_tokens)  # a bundle's limit may be smaller
    special = manifest.special_tokens
    usable = _fitting(corrector, requests)
    if not usable:
        raise ExportError(f"validation failed: no sample request fits {manifest.max_input_tokens} input tokens")
    use_cache = _generate_cache_fits(model.config, manifest.decoder.num_layers)
    ours = corrector.correct_batch([r for r, _ in usable], max_new_tokens=max_new_tokens, batch_size=1, drafts=False)
    worst, worst_ref, agreeing = 0.0, 0.0, 0
    compared = []  # (input ids, decoder ids, PyTorch's logits, the bundle's): for `_own_rounding`
    # The model's own generation config is replaced, not passed over: transformers fills the values a
    # config passed to `generate` leaves at their defaults (num_beams=1, min_length=0...) from the
    # checkpoint's (a summarizer's num_beams=4), and the reference would not be greedy search.
    model.generation_config = _plain_generation_config(special, max_new_tokens, manifest.no_repeat_ngram_size)
    for n, ((_, model_input), correction) in enumerate(zip(usable, ours)):
        ids = model_input.ids
        input_ids = torch.from_numpy(ids)[None, :]
        with torch.no_grad():
            reference = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                       use_cache=use_cache)[0, 1:].tolist()
        reference = reference[: reference.index(special.eos)] if special.eos in reference else reference
        agreeing += reference == correction.token_ids
        if exact and reference != correction.token_ids:
            raise ExportError(
                f"validation failed: greedy tokens differ from PyTorch on sample {n} "
                f"(PyTorch {reference[:12]}..., ONNX {correction.token_ids[:12]}...)"
            )
        decoder_ids = np.array([[special.decoder_start] + reference], dtype=np.int64)
        with torch.no_grad():
            expected = model(input_ids=input_ids, decoder_input_ids=torch.from_numpy(decoder_ids)).logits[0].numpy()
        got = _onnx_logits(corrector, ids[None, :], decoder_ids)
        compared.append((input_ids, decoder_ids, expected, got))
        worst = max(worst, logit_difference(expected, got))
        worst_ref = max(worst_ref, float(np.abs(expected).max()))
    if not exact:
        return _Measured(len(usable), worst, None, agreeing / len(usable), max_abs_logit=worst_ref)
    tolerance = atol + rtol * worst_ref
    if not math.isfinite(worst):  # no rounding explains a logit that is no number
        raise ExportError("validation failed: the bundle gives logits that are not finite numbers (NaN or infinite) "
                          "where PyTorch's are")
    if worst > tolerance:
        if not own_rounding:
            raise ExportError(f"validation failed: max |logit diff| {worst:.3g} exceeds the tolerance {tolerance:.3g}")
        # Large weights make fp32's own rounding larger than the tolerance: a bundle as close to exact
        # (float64) arithmetic as PyTorch fp32 is passes, with the tolerance that this widens to.
        own, bundle_error = _own_rounding(model, compared)
        if bundle_error > max(tolerance, 2 * own):
            raise ExportError(f"validation failed: max |logit diff| {worst:.3g} exceeds the tolerance {tolerance:.3g} "
                              f"(and the bundle is {bundle_error:.3g} from float64 arithmetic, PyTorch fp32 {own:.3g}); "
                              "--atol raises the tolerance where that is expected")
        tolerance = max(worst, 2 * own)
    return ValidationReport(len(usable), worst, tolerance, 1.0)


def logit_difference(expected: np.ndarray, got: np.ndarray) -> float:
    """The largest |difference| of two logit arrays, infinite where one is not finite and the other
    differs: NaN from an overflow then fails every tolerance (`max` and `>` let it pass every one)."""
    diff = np.abs(expected.astype(np.float64) - got.astype(np.float64))
    diff[expected == got] = 0.0  # equal infinities
    return float(np.nan_to_num(diff, nan=np.inf, posinf=np.inf).max())


def _own_rounding(model, compared: list) -> tuple[float, float]:
    """How far PyTorch fp32's logits and the bundle's are from the same model's in float64, at most."""
    import copy

    import torch

    exact_model = copy.deepcopy(model).double()
    own = bundle = 0.0
    for input_ids, decoder_ids, expected, got in compared:
        with torch.no_grad():
            exact = exact_model(input_ids=input_ids, decoder_input_ids=torch.from_numpy(decoder_ids)).logits[0].numpy()
        own, bundle = max(own, float(np.abs(expected - exact).max())), max(bundle, float(np.abs(got - exact).max()))
    return own, bundle


@dataclass(frozen=True)
class _Measured(ValidationReport):
    max_abs_logit: float = 0.0  # PyTorch's largest |logit|, which the half tolerances scale with


def _onnx_logits(corrector: Corrector, input_ids: np.ndarray, decoder_ids: np.ndarray) -> np.ndarray:
    """Logits of every decoder position: the first step alone, the rest in one cached call."""
    mask = np.ones_like(input_ids)
    hidden = encode(corrector.sessions, input_ids, mask)
    decoder = open_decoder(corrector.sessions, corrector.manifest)
    first = decoder.start(hidden, mask, decoder_ids[:, :1])[0].copy()  # the next call may reuse its buffer
    if decoder_ids.shape[1] == 1:
        return first
    rest = decoder.step(decoder_ids[:, 1:])
    return np.concatenate([first, rest[0]], axis=0)


def _generate_cache_fits(config, decoder_layers: int) -> bool:
    """Whether `generate`'s cache has one layer per decoder layer. transformers sizes it by the decoder
    config's `num_hidden_layers`, which T5 maps to the *encoder's* depth: where the depths differ
    (T5-efficient), cached `generate` fails, and the reference is computed without a cache (same
    tokens, slower)."""
    return getattr(config.get_text_config(decoder=True), "num_hidden_layers", None) == decoder_layers


def _fitting(corrector: Corrector, requests: Sequence[Request]) -> list[tuple[Request, ModelInput]]:
    """Each sample with its model input, or where it does not fit the model's input (a model of few
    positions), its source with one candidate, else their first three words: a short model is still
    validated on every sample, not on the one that fits ("a", whose output may be empty)."""
    manifest, out = corrector.manifest, []
    for request in requests:
        head = [" ".join(text.split()[:3]) for text in (request.source, request.candidates[0])]
        for form in (request, Request(request.source, request.candidates[:1]), Request(head[0], (head[1],))):
            (encoded,) = encode_requests(corrector.tokenizer, manifest.template, [form], manifest.max_input_tokens)
            if not isinstance(encoded, InputError):
                out.append((form, encoded))
                break
    return out


def _plain_generation_config(special, max_new_tokens: int, no_repeat_ngram_size: int):
    """Exactly the search lmcor runs: greedy, with the checkpoint's forced BOS/EOS and n-gram ban."""
    from transformers import GenerationConfig

    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        num_beams=1,
        do_sample=False,
        decoder_start_token_id=special.decoder_start,
        eos_token_id=special.eos,
        pad_token_id=special.pad,
        forced_bos_token_id=special.forced_bos,
        forced_eos_token_id=special.forced_eos,
        no_repeat_ngram_size=no_repeat_ngram_size,
    )


def check_half_graphs(bundle: Path, graphs: Sequence[str], precision: str, atol: float | None = None) -> dict:
    """Structural checks of half-precision graphs that cannot run here: each passes `onnx.checker`,
    keeps fp32 inputs and outputs (what the runtime feeds and reads) and holds `precision` weights.
    An `atol` the export was given is said not to be applied (no logits are compared)."""
    if atol is not None:
        log.warning("atol %g is not applied: %s graphs are validated on CUDA, which this machine lacks "
                    "(structural checks only)", atol, precision)
    import onnx
    from onnx import TensorProto

    from .half import HALF_TYPES

    half, counts = HALF_TYPES[precision], {}
    for name in graphs:
        path = bundle / name
        try:
            onnx.checker.check_model(str(path))
        except onnx.checker.ValidationError as e:
            raise ExportError(f"validation of the {precision} graphs failed: {name}: {str(e).splitlines()[0]}") from None
        model = onnx.load(str(path), load_external_data=False)
        for value in (*model.graph.input, *model.graph.output):
            if value.type.tensor_type.elem_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
                raise ExportError(f"validation of the {precision} graphs failed: {name}: {value.name} is not fp32")
        counts[name] = sum(t.data_type == half for t in model.graph.initializer)
        if not counts[name]:
            raise ExportError(f"validation of the {precision} graphs failed: {name} holds no {precision} weights")
    return {"structural": "onnx.checker passed; inputs and outputs fp32", f"{precision}_weights": counts}
