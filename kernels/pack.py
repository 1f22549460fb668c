"""Pack a padded batch of correction requests into one token stream, gathering embeddings on the way.

A batch of requests (each a source plus K candidates, rendered with the template) is ragged:
padding it to a rectangle wastes encoder work on pad tokens. `pack` writes the real tokens of all
requests one after another: their embeddings (the gather is fused), each token's position within
its request and its segment (0: source and template text, i: the i-th candidate), and the
per-request offsets `cu_seqlens` (request b owns rows cu_seqlens[b]:cu_seqlens[b + 1]).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _pack_kernel(ids_ptr, seg_ptr, lengths_ptr, cu_ptr, table_ptr, out_ptr, pos_ptr, out_seg_ptr,
                 width, dim, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    request = tl.program_id(0)
    block = tl.program_id(1)
    length = tl.load(lengths_ptr + request)
    start = tl.load(cu_ptr + request)
    t = block * BLOCK_T + tl.arange(0, BLOCK_T)
    live = t < length
    ids = tl.load(ids_ptr + request * width + t, mask=live, other=0)
    seg = tl.load(seg_ptr + request * width + t, mask=live, other=0)
    row = start + t
    tl.store(pos_ptr + row, t, mask=live)
    tl.store(out_seg_ptr + row, seg, mask=live)
    for d0 in range(0, dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        both = live[:, None] & (d[None, :] < dim)
        vectors = tl.load(table_ptr + ids[:, None].to(tl.int64) * dim + d[None, :], mask=both, other=0.0)
        tl.store(out_ptr + row[:, None].to(tl.int64) * dim + d[None, :], vectors, mask=both)


def cu_seqlens(lengths: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int32)


def pack(ids: torch.Tensor, segments: torch.Tensor, lengths: torch.Tensor, table: torch.Tensor,
         *, block_t: int = 32, block_d: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, segments) of shape (batch, width), lengths (batch,), embedding table (vocab, dim) ->
    (embeddings (tokens, dim), positions (tokens,), segments (tokens,), cu_seqlens (batch + 1,))."""
    batch, width = ids.shape
    cu = cu_seqlens(lengths).to(ids.device)
    total = int(cu[-1])
    dim = table.shape[1]
    out = torch.empty((total, dim), dtype=table.dtype, device=table.device)
    positions = torch.empty(total, dtype=torch.int32, device=ids.device)
    packed_segments = torch.empty(total, dtype=torch.int32, device=ids.device)
    grid = (batch, triton.cdiv(width, block_t))
    _pack_kernel[grid](ids.contiguous(), segments.to(torch.int32).contiguous(), lengths.to(torch.int32).contiguous(), cu,
                       table.contiguous(), out, positions, packed_segments, width, dim, BLOCK_T=block_t, BLOCK_D=block_d)
    return out, positions, packed_segments, cu


def pack_reference(ids: torch.Tensor, segments: torch.Tensor, lengths: torch.Tensor, table: torch.Tensor):
    """The same, in plain PyTorch."""
    rows = [slice(0, int(n)) for n in lengths]
    flat_ids = torch.cat([ids[b, r] for b, r in enumerate(rows)])
    positions = torch.cat([torch.arange(int(n), dtype=torch.int32) for n in lengths])
    packed_segments = torch.cat([segments[b, r] for b, r in enumerate(rows)]).to(torch.int32)
    return table[flat_ids], positions, packed_segments, cu_seqlens(lengths)
