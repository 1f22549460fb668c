"""An fp32 T5 corrector bundle -> the Hugging Face checkpoint it was exported from.

A bundle holds every weight of its model as an initializer of its graphs, so the checkpoint can be
rebuilt from it where the training folder is gone (the shipped default corrector travels only as
its bundle). The rebuilt checkpoint is checked before it is written: its encoder states within
1e-4 of the bundle's encoder, and transformers' greedy tokens identical to the bundle's own (drafts
on, fallback off) on the first requests of a data file. It serves training on from the shipped
model (`lmcor train-corrector --init`) and the GPU check (the packed encoder, transformers' latency).

    python -m lmcor.recipes.from_bundle OUT [--bundle BUNDLE] [--check FILE] [--requests N]

Names: optimum's export keeps each module's path in its nodes' output names
(`/block.0/layer.1/DenseReluDense/wi_0/MatMul_output_0`), the fused encoder's `Attention` nodes
hold each layer's query/key/value weights side by side, and lmcor's decoder graphs hold joined
projections (`own_i`: q, k, v; `gate_i`: wi_0, wi_1; the cross graph's one product: every layer's
k and v).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from pathlib import Path

import numpy as np

from lmcor.runtime.bundle import load_manifest, shipped_bundle
from lmcor.runtime.errors import InputError, LmcorError

from . import command_line

log = logging.getLogger("lmcor")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECK = ROOT / "recipes" / "splits" / "test.jsonl"
STATES_TOLERANCE = 1e-4  # of the states' largest magnitude
_NORM = re.compile(r"^/block\.(\d+)/layer\.(\d+)/layer_norm/")
_MODULE = re.compile(r"^/block\.(\d+)/layer\.(\d+)/(.+)/MatMul(?:_\d+)?_output_0$")


def _initializers(path: Path) -> tuple:
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph  # external weights (the shared embedding) read from beside it
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:  # equal weights (norms still at their init) are stored once, named through Identity
        if node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
    return graph, values


def _encoder_weights(path: Path) -> tuple[dict[str, np.ndarray], int | None]:
    """The encoder's weights under T5's names, and the position bias's max distance (None: not found)."""
    graph, values = _initializers(path)
    state: dict[str, np.ndarray] = {}
    max_distance = None
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in values:
            match = _MODULE.match(node.output[0])
            if match is None:
                raise InputError(f"{path}: a weight product this reader cannot place ({node.output[0]})")
            block, layer, module = match.groups()
            state[f"encoder.block.{block}.layer.{layer}.{module.replace('/', '.')}.weight"] = values[node.input[1]].T
        elif node.op_type == "Attention":
            block = re.search(r"/block\.(\d+)/", node.input[0])
            if block is None:
                raise InputError(f"{path}: a fused attention this reader cannot place ({node.input[0]})")
            for name, part in zip("qkv", np.split(values[node.input[1]], 3, axis=1)):
                state[f"encoder.block.{block.group(1)}.layer.0.SelfAttention.{name}.weight"] = part.T
        norm = next((i for i in node.input if i in values and i.endswith("layer_norm.weight")), None)
        if norm is not None:  # placed by what it normalizes: equal weights may share one initializer
            out = node.output[0]
            place = _NORM.match(out)
            if place is None and out != "last_hidden_state" and "final_layer_norm" not in out:
                raise InputError(f"{path}: a norm this reader cannot place ({out})")
            name = "final_layer_norm" if place is None else f"block.{place[1]}.layer.{place[2]}.layer_norm"
            state[f"encoder.{name}.weight"] = values[norm]
    for name, value in values.items():
        if name == "embed_tokens.weight":
            state["shared.weight"] = value
        elif name.endswith("/portable/table"):  # lmcor's fused position bias: (buckets, heads), as T5 keeps it
            state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = value
            prefix = name[: -len("table")]
            # Exact buckets, then log-spaced up to max_distance: log_span = log(max_distance / exact).
            max_distance = round(float(values[prefix + "exact"]) * math.exp(float(values[prefix + "log_span"])))
    if not any(".SelfAttention.q." in k for k in state):
        raise InputError(f"{path}: not the fused T5 encoder `lmcor export` writes in fp32 (no fused attention); "
                         "export the checkpoint again, or rebuild from an fp32 bundle")
    return state, max_distance


def _decoder_weights(decoder: Path, cross: Path, layers: int) -> dict[str, np.ndarray]:
    _, values = _initializers(decoder)
    state: dict[str, np.ndarray] = {}
    for name, value in values.items():
        if name.startswith("model."):
            state[name[len("model."):]] = value
        elif re.fullmatch(r"own_\d+", name):
            for part, weight in zip("qkv", np.split(value, 3, axis=0)):
                state[f"decoder.block.{name[4:]}.layer.0.SelfAttention.{part}.weight"] = weight
        elif re.fullmatch(r"gate_\d+", name):
            for part, weight in zip(("wi_0", "wi_1"), np.split(value, 2, axis=0)):
                state[f"decoder.block.{name[5:]}.layer.2.DenseReluDense.{part}.weight"] = weight
    _, values = _initializers(cross)
    (joined,) = [v for v in values.values() if v.ndim == 2]  # (d_model, layers x (k, v) x inner)
    for n, weight in enumerate(np.split(joined, 2 * layers, axis=1)):
        state[f"decoder.block.{n // 2}.layer.1.EncDecAttention.{'kv'[n % 2]}.weight"] = weight.T
    return state


def rebuild(bundle: Path):
    """(model, tokenizer) of the fp32 T5 corrector `bundle`, unchecked (`check` compares them with it)."""
    import torch
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    manifest = load_manifest(bundle)
    if manifest.kind != "corrector" or manifest.architecture != "t5" or manifest.precision != "fp32" \
            or manifest.decoder_graph != "ragged":
        raise InputError(f"{bundle}: a {manifest.precision} {manifest.architecture} {manifest.kind} "
                         f"({manifest.decoder_graph} decoder); this rebuilds fp32 T5 correctors with the ragged decoder")
    files, shape = manifest.files, manifest.decoder
    state, max_distance = _encoder_weights(bundle / files["encoder"])
    state.update(_decoder_weights(bundle / files["decoder"], bundle / files["cross"], shape.num_layers))
    shared = state["shared.weight"]  # the encoder's embedding, and the decoder graph's `model.shared.weight`
    state["encoder.embed_tokens.weight"] = state["decoder.embed_tokens.weight"] = shared
    tied = "lm_head.weight" not in state
    if tied:
        state["lm_head.weight"] = shared
    gated = any(".wi_0." in k for k in state)
    feed_forward = state[f"encoder.block.0.layer.1.DenseReluDense.{'wi_0' if gated else 'wi'}.weight"]
    table = state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    config = T5Config(
        vocab_size=shared.shape[0], d_model=shared.shape[1], d_kv=shape.head_dim, num_heads=shape.num_heads,
        d_ff=feed_forward.shape[0], num_layers=1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.block.")),
        num_decoder_layers=shape.num_layers, relative_attention_num_buckets=table.shape[0],
        relative_attention_max_distance=max_distance or 128, feed_forward_proj="gated-gelu" if gated else "relu",
        dropout_rate=0.0, tie_word_embeddings=tied, pad_token_id=manifest.special_tokens.pad,
        eos_token_id=manifest.special_tokens.eos, decoder_start_token_id=manifest.special_tokens.decoder_start)
    model = T5ForConditionalGeneration(config).eval()
    missing = set(model.state_dict()) - set(state)
    unplaced = set(state) - set(model.state_dict())
    if missing or unplaced:
        raise InputError(f"{bundle}: its graphs do not make a T5 model (missing {sorted(missing)[:4]}, "
                         f"unplaced {sorted(unplaced)[:4]})")
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    # What the bundle decodes with, where an export of this checkpoint reads it.
    model.generation_config.no_repeat_ngram_size = manifest.no_repeat_ngram_size
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(bundle / files["tokenizer"]),
                                        model_max_length=manifest.max_input_tokens,
                                        model_input_names=["input_ids", "attention_mask"])
    backend = tokenizer.backend_tokenizer
    tokenizer.pad_token = backend.id_to_token(manifest.special_tokens.pad)
    tokenizer.eos_token = backend.id_to_token(manifest.special_tokens.eos)
    return model, tokenizer


def check(model, bundle: Path, data: Path, count: int) -> dict:
    """The rebuilt `model` against `bundle` on the first `count` requests of `data`: the largest
    difference of encoder states (relative to their largest magnitude) and the share of requests
    whose greedy tokens are identical."""
    import torch
    from lmcor import CorrectionOptions, Corrector
    from lmcor.bench.drafts import read_requests
    from lmcor.runtime.batching import pad_batch
    from lmcor.runtime.encode import encode
    from lmcor.runtime.tokens import encode_requests

    corrector = Corrector.load(bundle)
    manifest = corrector.manifest
    requests = read_requests(data, count, fit=(corrector.tokenizer, manifest))
    inputs = [x.ids for x in encode_requests(corrector.tokenizer, manifest.template, requests, manifest.max_input_tokens)]
    worst = 0.0
    for start in range(0, len(inputs), 16):
        ids, mask = pad_batch(inputs[start : start + 16], manifest.special_tokens.pad)
        theirs = encode(corrector.sessions, ids, mask).numpy()
        with torch.no_grad():
            ours = model.encoder(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))[0].numpy()
        real = mask.astype(bool)
        worst = max(worst, float(np.abs(ours - theirs)[real].max() / max(np.abs(theirs[real]).max(), 1e-6)))
    results = corrector.correct_batch(requests, options=CorrectionOptions(fallback_below=0), batch_size=16)
    same = 0
    for ids, result in zip(inputs, results):
        with torch.no_grad():
            out = model.generate(input_ids=torch.from_numpy(ids)[None], max_new_tokens=manifest.max_output_tokens,
                                 do_sample=False, num_beams=1)  # the n-gram ban from its own generation config
        tokens = out[0, 1:].tolist()
        if manifest.special_tokens.eos in tokens:
            tokens = tokens[: tokens.index(manifest.special_tokens.eos)]
        same += tokens == list(result.token_ids)
    return {"requests": len(requests), "states_relative_difference": worst, "identical_tokens": same / len(requests)}


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmcor.recipes.from_bundle", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the Hugging Face checkpoint (must not exist, or be empty)")
    parser.add_argument("--bundle", type=Path, help="the fp32 T5 corrector bundle (default: the shipped default corrector)")
    parser.add_argument("--check", type=Path, default=DEFAULT_CHECK, help="JSONL requests the tokens are compared on")
    parser.add_argument("--requests", type=int, default=100, help="how many of them (default: 100)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise InputError(f"{args.out}: exists and is not an empty folder")
    if args.requests < 1:
        raise InputError(f"--requests must be at least 1, got {args.requests}")
    bundle = args.bundle or shipped_bundle("default")
    model, tokenizer = rebuild(bundle)
    result = check(model, bundle, args.check, args.requests)
    log.info("encoder states within %.1e of the bundle's; greedy tokens identical on %.0f%% of %d requests",
             result["states_relative_difference"], 100 * result["identical_tokens"], result["requests"])
    if result["states_relative_difference"] > STATES_TOLERANCE or result["identical_tokens"] < 1:
        raise LmcorError(f"{bundle}: the rebuilt model differs from the bundle ({result}); nothing written")
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
