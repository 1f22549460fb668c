"""A T5 encoder over packed requests: the kernels composed into the corrector's encoder stage.

pack (embedding gather) -> per layer: packed attention with the relative bias in the kernel,
fused residual + RMSNorm, feed-forward -> final norm. Matrix products stay in PyTorch (cuBLAS on
a GPU); what the kernels remove is the padding of ragged batches and the materialized
(batch, heads, L, L) bias. The output equals transformers' T5 encoder on the padded batch at
every real token (`unpack` restores the padded layout the decoder reads).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .pack import pack
from .packed_attention import packed_attention
from .rmsnorm import add_rmsnorm

ACTIVATIONS = {
    "relu": torch.relu,
    "gelu_new": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
    "gelu": torch.nn.functional.gelu,
    "silu": torch.nn.functional.silu,
}


@dataclass(frozen=True)
class Layer:
    norm_attention: torch.Tensor
    qkv: torch.Tensor  # (d_model, 3 * heads * d_kv): the three projections in one product
    out: torch.Tensor  # (heads * d_kv, d_model)
    norm_ff: torch.Tensor
    wi: tuple[torch.Tensor, ...]  # (d_model, d_ff): one matrix, or gate and up for gated activations
    wo: torch.Tensor  # (d_ff, d_model)


@dataclass(frozen=True)
class EncoderWeights:
    embed: torch.Tensor
    bias: torch.Tensor  # (num_buckets, heads): the first layer's relative attention bias
    layers: tuple[Layer, ...]
    final_norm: torch.Tensor
    heads: int
    d_kv: int
    eps: float
    max_distance: int
    activation: str

    @classmethod
    def from_t5(cls, model, dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> "EncoderWeights":
        """From a transformers T5 model (T5ForConditionalGeneration or T5EncoderModel)."""
        config = model.config
        cast = lambda t: t.detach().to(device=device, dtype=dtype or t.dtype).contiguous()  # noqa: E731
        layers = []
        for block in model.encoder.block:
            attention, ff = block.layer[0].SelfAttention, block.layer[1].DenseReluDense
            gated = hasattr(ff, "wi_0")
            layers.append(Layer(
                norm_attention=cast(block.layer[0].layer_norm.weight),
                qkv=cast(torch.cat([attention.q.weight, attention.k.weight, attention.v.weight]).T),
                out=cast(attention.o.weight.T),
                norm_ff=cast(block.layer[1].layer_norm.weight),
                wi=(cast(ff.wi_0.weight.T), cast(ff.wi_1.weight.T)) if gated else (cast(ff.wi.weight.T),),
                wo=cast(ff.wo.weight.T),
            ))
        first = model.encoder.block[0].layer[0].SelfAttention
        if config.dense_act_fn not in ACTIVATIONS:
            raise ValueError(f"activation {config.dense_act_fn!r} is not supported ({', '.join(ACTIVATIONS)})")
        return cls(embed=cast(model.encoder.embed_tokens.weight), bias=cast(first.relative_attention_bias.weight),
                   layers=tuple(layers), final_norm=cast(model.encoder.final_layer_norm.weight), heads=config.num_heads,
                   d_kv=config.d_kv, eps=config.layer_norm_epsilon, max_distance=config.relative_attention_max_distance,
                   activation=config.dense_act_fn)


    _SCALARS = ("heads", "d_kv", "eps", "max_distance", "activation")

    def save(self, path: Path) -> None:
        """One safetensors file: the tensors, and the scalars in its metadata."""
        from safetensors.torch import save_file

        tensors = {"embed": self.embed, "bias": self.bias, "final_norm": self.final_norm}
        for i, layer in enumerate(self.layers):
            for f in fields(Layer):
                value = getattr(layer, f.name)
                for j, t in enumerate(value if isinstance(value, tuple) else (value,)):
                    tensors[f"layers.{i}.{f.name}.{j}"] = t
        meta = {name: getattr(self, name) for name in self._SCALARS}
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path),
                  metadata={"lmcor": json.dumps(meta), "layers": str(len(self.layers))})

    @classmethod
    def load(cls, path: Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> "EncoderWeights":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta, count = json.loads(f.metadata()["lmcor"]), int(f.metadata()["layers"])
            get = lambda name: f.get_tensor(name).to(dtype or torch.float32)  # noqa: E731
            layers = []
            for i in range(count):
                parts = {}
                for field in fields(Layer):
                    names = sorted(n for n in f.keys() if n.startswith(f"layers.{i}.{field.name}."))
                    values = tuple(get(n) for n in names)
                    parts[field.name] = values if field.name == "wi" else values[0]
                layers.append(Layer(**parts))
            return cls(embed=get("embed"), bias=get("bias"), layers=tuple(layers), final_norm=get("final_norm"), **meta)


def encode_packed(weights: EncoderWeights, ids: torch.Tensor, segments: torch.Tensor, lengths: torch.Tensor, *,
                  segment_mode: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded (batch, width) ids, their segments and lengths -> (hidden (tokens, d_model), cu_seqlens)."""
    hidden, _, packed_segments, cu = pack(ids, segments, lengths, weights.embed)
    max_len = int(lengths.max())
    act = ACTIVATIONS[weights.activation]
    tokens, inner = hidden.shape[0], weights.heads * weights.d_kv
    hidden, normed = add_rmsnorm(hidden, torch.zeros_like(hidden), weights.layers[0].norm_attention, weights.eps)
    for i, layer in enumerate(weights.layers):
        q, k, v = (normed @ layer.qkv).view(tokens, 3, weights.heads, weights.d_kv).unbind(1)
        mixed = packed_attention(q, k, v, cu, max_len, weights.bias, max_distance=weights.max_distance,
                                 segments=packed_segments, segment_mode=segment_mode)
        hidden, normed = add_rmsnorm(mixed.reshape(tokens, inner) @ layer.out, hidden, layer.norm_ff, weights.eps)
        up = act(normed @ layer.wi[0]) * (normed @ layer.wi[1]) if len(layer.wi) == 2 else act(normed @ layer.wi[0])
        following = weights.layers[i + 1].norm_attention if i + 1 < len(weights.layers) else weights.final_norm
        hidden, normed = add_rmsnorm(up @ layer.wo, hidden, following, weights.eps)
    return normed, cu


def unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, width: int) -> torch.Tensor:
    """(tokens, dim) -> (batch, width, dim), zeros after each request's tokens."""
    bounds = cu_seqlens.tolist()
    out = packed.new_zeros((len(bounds) - 1, width, packed.shape[1]))
    for b, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        out[b, : end - start] = packed[start:end]
    return out
