"""T5-family decoder -> lmcor's ragged step graphs (`decoder.onnx` + `decoder_cross.onnx`).

optimum's merged decoder advances every row of a batch by the same number of tokens: its only
notion of position is the length of the past. Drafted decoding verifies a different number of
tokens per row, so lmcor exports its own step graph for T5 (and mT5) decoders, computing exactly
what Hugging Face's decoder computes, with two more inputs:

- `lengths` (batch,): how many cached self-attention slots of each row are real. Slots past a
  row's length are masked; a row's rejected draft tokens are simply forgotten by not counting
  them.
- the new tokens' positions follow from `lengths`, and T5's relative attention bias is computed
  per row from them, so rows at different lengths share one call exactly.

The graph returns only the new tokens' keys/values; the runtime writes them into its cache at
each row's length. Cross-attention keys/values are computed once per request by
`decoder_cross.onnx` from the encoder states, so their weights live only there.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .reshapes import rewrite_file

STEP_FILE = "decoder.onnx"
CROSS_FILE = "decoder_cross.onnx"
ARCHITECTURES = ("t5", "mt5")


def _heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], heads, head_dim).transpose(1, 2)


def _joined(*linears: torch.nn.Linear) -> torch.Tensor:
    """One weight for several bias-free projections of the same input. One matrix product reads
    the input once, and at batch 1 it ran faster than several small ones (the outputs are the same
    numbers: each output column is its own dot product)."""
    return torch.cat([linear.weight for linear in linears], dim=0)


def _project(x: torch.Tensor, joined: torch.Tensor | None, linears) -> list[torch.Tensor]:
    """Each of `linears` applied to `x`: in one product with their `joined` weight where there is one."""
    if joined is None:
        return [linear(x) for linear in linears]
    return list(torch.nn.functional.linear(x, joined).split([linear.out_features for linear in linears], -1))


def _attend(attention, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """T5 attention of `query` (batch, heads, new, head_dim) over given keys/values: no 1/sqrt(d)
    scaling, bias added (masks included), softmax in fp32."""
    scores = torch.matmul(query, keys.transpose(3, 2)) + bias
    weights = torch.softmax(scores.float(), dim=-1).type_as(scores)
    out = torch.matmul(weights, values).transpose(1, 2)
    return attention.o(out.reshape(out.shape[0], out.shape[1], attention.inner_dim))


class StepDecoder(torch.nn.Module):
    """(input_ids, lengths, encoder_attention_mask, self past k/v..., cross k/v...) ->
    (logits, new self k/v...). `join`: the projections of one input as one product (`_joined`)."""

    def __init__(self, model, join: bool = True):
        super().__init__()
        self.model = model
        self.layers = len(model.decoder.block)
        for i, block in enumerate(model.decoder.block):
            attention, dense = block.layer[0].SelfAttention, block.layer[2].DenseReluDense
            self.register_buffer(f"own_{i}", _joined(attention.q, attention.k, attention.v) if join else None)
            gated = hasattr(dense, "wi_0")  # T5 v1.1, Flan-T5, mT5
            self.register_buffer(f"gate_{i}", _joined(dense.wi_0, dense.wi_1) if join and gated else None)

    def forward(self, input_ids, lengths, encoder_attention_mask, *past):
        decoder, config = self.model.decoder, self.model.config
        self_past, cross = past[: 2 * self.layers], past[2 * self.layers :]
        new, cached = input_ids.shape[1], self_past[0].shape[2]
        hidden = decoder.embed_tokens(input_ids)
        lowest = torch.finfo(hidden.dtype).min  # Hugging Face's mask value

        # Slot j < cached holds position j; new token i sits in slot cached + i at position
        # lengths + i. A cached slot is real below the row's length; new tokens are causal.
        slot = torch.arange(cached + new, device=input_ids.device)
        step = torch.arange(new, device=input_ids.device)
        key_pos = torch.where(slot[None, :] < cached, slot[None, :], lengths[:, None] + slot[None, :] - cached)
        query_pos = lengths[:, None] + step[None, :]
        in_cache = slot[None, None, :] < cached
        visible = (in_cache & (slot[None, None, :] < lengths[:, None, None])) | (
            ~in_cache & ((slot[None, None, :] - cached) <= step[None, :, None]))
        first = decoder.block[0].layer[0].SelfAttention
        buckets = first._relative_position_bucket(
            key_pos[:, None, :] - query_pos[:, :, None], bidirectional=False,
            num_buckets=config.relative_attention_num_buckets, max_distance=config.relative_attention_max_distance)
        self_bias = first.relative_attention_bias(buckets).permute(0, 3, 1, 2)
        self_bias = self_bias.masked_fill(~visible[:, None, :, :], lowest)
        cross_bias = torch.zeros(encoder_attention_mask.shape, dtype=hidden.dtype, device=hidden.device)
        cross_bias = cross_bias.masked_fill(encoder_attention_mask == 0, lowest)[:, None, None, :]

        presents = []
        for i, block in enumerate(decoder.block):
            attention = block.layer[0].SelfAttention
            heads, head_dim = attention.n_heads, attention.key_value_proj_dim
            normed = block.layer[0].layer_norm(hidden)
            query, key, value = (_heads(x, heads, head_dim) for x in
                                 _project(normed, getattr(self, f"own_{i}"), (attention.q, attention.k, attention.v)))
            presents += [key, value]
            keys = torch.cat([self_past[2 * i], key], dim=2)
            values = torch.cat([self_past[2 * i + 1], value], dim=2)
            hidden = hidden + _attend(attention, query, keys, values, self_bias)
            cross_attention = block.layer[1].EncDecAttention
            query = _heads(cross_attention.q(block.layer[1].layer_norm(hidden)), heads, head_dim)
            hidden = hidden + _attend(cross_attention, query, cross[2 * i], cross[2 * i + 1], cross_bias)
            hidden = hidden + self._feed_forward(i, block.layer[2], hidden)
        hidden = decoder.final_layer_norm(hidden)
        if config.tie_word_embeddings:
            hidden = hidden * (config.d_model**-0.5)
        return (self.model.lm_head(hidden), *presents)

    def _feed_forward(self, i: int, layer, hidden: torch.Tensor) -> torch.Tensor:
        """Hugging Face's T5 feed-forward (dropout is off in eval mode), the gated one's two input
        projections in one product."""
        dense, normed = layer.DenseReluDense, layer.layer_norm(hidden)
        if not hasattr(dense, "wi_0"):
            return dense(normed)
        gate, linear = _project(normed, getattr(self, f"gate_{i}"), (dense.wi_0, dense.wi_1))
        return dense.wo(dense.act(gate) * linear)


class CrossKeysValues(torch.nn.Module):
    """encoder_hidden_states -> every decoder layer's cross-attention keys and values."""

    def __init__(self, model, join: bool = True):
        super().__init__()
        self.model = model
        self.projections = [p for block in model.decoder.block for p in (block.layer[1].EncDecAttention.k,
                                                                        block.layer[1].EncDecAttention.v)]
        self.register_buffer("keys_values", _joined(*self.projections) if join else None)

    def forward(self, encoder_hidden_states):
        first = self.model.decoder.block[0].layer[1].EncDecAttention
        projected = _project(encoder_hidden_states, self.keys_values, self.projections)
        return tuple(_heads(x, first.n_heads, first.key_value_proj_dim) for x in projected)


def past_names(layers: int) -> tuple[list[str], list[str]]:
    """Input names of the self-attention cache and of the cross-attention keys/values."""
    own = [f"past.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    cross = [f"cross.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return own, cross


def export_step_decoder(model, out_dir: Path, opset: int, *, fold: bool = False) -> None:
    """Write STEP_FILE and CROSS_FILE for a T5-family `model` (in eval mode) into `out_dir`.

    Without `fold`, constants are not folded: with tied embeddings, folding would store the output
    layer as a second, transposed copy of the embedding matrix (ONNX Runtime folds it in memory at
    load instead). The int8 quantizer needs folded weights, since it quantizes initializers only;
    they keep each projection's weight apart, as it gives each weight one scale (joined, a layer's
    query, key and value would share one, and the quantization error of each tripled).

    The wrappers are put in eval mode too: the exporter restores a module's mode after tracing,
    and a wrapper left in training mode would switch the model's dropout back on. Both graphs then
    take constant Reshape targets (`reshapes.py`)."""
    config = model.config
    layers, heads, head_dim = len(model.decoder.block), config.num_heads, config.d_kv
    own, cross = past_names(layers)
    batch, new, cached, source = 2, 3, 4, 5
    ids = torch.ones((batch, new), dtype=torch.long)
    lengths = torch.tensor([cached, cached - 1], dtype=torch.long)
    mask = torch.ones((batch, source), dtype=torch.long)
    self_past = [torch.zeros(batch, heads, cached, head_dim) for _ in own]
    cross_kv = [torch.zeros(batch, heads, source, head_dim) for _ in cross]
    presents = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    axes = {"input_ids": {0: "batch", 1: "new"}, "lengths": {0: "batch"},
            "encoder_attention_mask": {0: "batch", 1: "source"}, "logits": {0: "batch", 1: "new"}}
    axes.update({n: {0: "batch", 2: "cached"} for n in own})
    axes.update({n: {0: "batch", 2: "source"} for n in cross})
    axes.update({n: {0: "batch", 2: "new"} for n in presents})
    with torch.no_grad():
        torch.onnx.export(StepDecoder(model, join=not fold).eval(), (ids, lengths, mask, *self_past, *cross_kv), str(out_dir / STEP_FILE),
                          input_names=["input_ids", "lengths", "encoder_attention_mask", *own, *cross],
                          output_names=["logits", *presents], dynamic_axes=axes, opset_version=opset, dynamo=False,
                          do_constant_folding=fold)
        hidden = torch.zeros(batch, source, config.d_model)
        torch.onnx.export(CrossKeysValues(model, join=not fold).eval(), (hidden,), str(out_dir / CROSS_FILE),
                          input_names=["encoder_hidden_states"], output_names=cross,
                          dynamic_axes={"encoder_hidden_states": {0: "batch", 1: "source"},
                                        **{n: {0: "batch", 2: "source"} for n in cross}},
                          opset_version=opset, dynamo=False)
    for name in (STEP_FILE, CROSS_FILE):
        rewrite_file(out_dir / name)
        one_data_file(out_dir / name)


def one_data_file(path: Path) -> None:
    """A graph over 2 GB keeps its weights in external files, which the TorchScript exporter names
    after each tensor: they become one `<graph>.data` beside it (a bundle holds `<graph>*`)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations = {entry.value for tensor in model.graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL
                 for entry in tensor.external_data if entry.key == "location"}
    if not locations or locations == {f"{path.name}.data"}:
        return
    model = onnx.load(str(path))
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=f"{path.name}.data")
    for name in locations - {f"{path.name}.data"}:
        (path.parent / name).unlink(missing_ok=True)
