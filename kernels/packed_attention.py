"""Varlen, non-causal attention over a packed token stream, with T5's relative position bias.

Requests are packed one after another (`kernels/pack.py`); request b owns rows
cu_seqlens[b]:cu_seqlens[b + 1], and its tokens attend only to each other, so no pad token is
ever computed and no (batch, heads, L, L) bias tensor is materialized: the bias of each
(query, key) pair is read inside the kernel from the (num_buckets, heads) table, through a small
lookup table of T5's bucket for every relative distance (computed once, exactly as T5 computes
it, rather than with the GPU's approximate log). The softmax is computed online (one pass over
the keys, running max and sum), accumulating in fp32.

`segment_mode` makes each candidate attend only to the source and to itself (and the source only
to itself), for correctors trained that way; it is off by default, which keeps LMCor models exact.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _packed_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr, seg_ptr, lut_ptr, bias_ptr,
                             heads, head_dim, lut_center, scale,
                             SEGMENTS: tl.constexpr, DOT_FP32: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    block = tl.program_id(0)
    request = tl.program_id(1)
    head = tl.program_id(2)
    start = tl.load(cu_ptr + request)
    length = tl.load(cu_ptr + request + 1) - start
    if block * BLOCK_M >= length:
        return
    row_stride = heads * head_dim
    m = block * BLOCK_M + tl.arange(0, BLOCK_M)  # query positions within the request
    d = tl.arange(0, BLOCK_D)
    q_live = m < length
    d_live = d < head_dim
    q_rows = (start + m).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * row_stride + head * head_dim + d[None, :],
                mask=q_live[:, None] & d_live[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    if SEGMENTS:
        q_seg = tl.load(seg_ptr + start + m, mask=q_live, other=0)
    running_max = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)  # finite, so fully masked blocks add 0
    running_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, length, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        k_live = n < length
        k_rows = (start + n).to(tl.int64)
        kv_mask = k_live[:, None] & d_live[None, :]
        k = tl.load(k_ptr + k_rows[:, None] * row_stride + head * head_dim + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + k_rows[:, None] * row_stride + head * head_dim + d[None, :], mask=kv_mask, other=0.0)
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # ieee: on NVIDIA tensor cores an fp32 dot defaults to tf32 (10 mantissa bits); fp16/bf16 ignore it
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        bucket = tl.load(lut_ptr + (n[None, :] - m[:, None]) + lut_center, mask=q_live[:, None] & k_live[None, :], other=0)
        scores += tl.load(bias_ptr + bucket * heads + head).to(tl.float32)
        allowed = q_live[:, None] & k_live[None, :]
        if SEGMENTS:
            k_seg = tl.load(seg_ptr + start + n, mask=k_live, other=0)
            allowed = allowed & ((k_seg[None, :] == 0) | (k_seg[None, :] == q_seg[:, None]))
        scores = tl.where(allowed, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        p = tl.exp(scores - new_max[:, None])
        alpha = tl.exp(running_max - new_max)
        running_sum = running_sum * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee").to(tl.float32)
        running_max = new_max
    out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]  # rows past the request: not stored
    tl.store(o_ptr + q_rows[:, None] * row_stride + head * head_dim + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=q_live[:, None] & d_live[None, :])


def relative_buckets(relative: torch.Tensor, num_buckets: int, max_distance: int, bidirectional: bool = True) -> torch.Tensor:
    """T5's bucket of each relative distance (key position - query position)."""
    out = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        out += (relative > 0).to(relative.dtype) * num_buckets
        distance = relative.abs()
    else:
        distance = -torch.clamp(relative, max=0)
    exact = num_buckets // 2
    large = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact) * (num_buckets - exact)).to(relative.dtype)
    large = torch.clamp(large, max=num_buckets - 1)
    return out + torch.where(distance < exact, distance, large)


def bucket_table(max_len: int, num_buckets: int, max_distance: int, bidirectional: bool = True,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Buckets of every relative distance -(max_len - 1) .. max_len - 1, centred at index max_len - 1."""
    relative = torch.arange(-(max_len - 1), max_len, device=device)
    return relative_buckets(relative, num_buckets, max_distance, bidirectional).to(torch.int32)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int,
                     bias_table: torch.Tensor, *, max_distance: int = 128, segments: torch.Tensor | None = None,
                     segment_mode: bool = False, scale: float = 1.0, block: int = 32) -> torch.Tensor:
    """q, k, v: (tokens, heads, head_dim) packed; bias_table: (num_buckets, heads), T5's
    `relative_attention_bias.weight`. T5 does not scale scores (scale=1.0)."""
    tokens, heads, head_dim = q.shape
    if segment_mode and segments is None:
        raise ValueError("segment_mode needs the packed segments")
    lut = bucket_table(max_len, bias_table.shape[0], max_distance, device=q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # the kernel writes rows in order: q's strides may not be
    seg = segments if segments is not None else cu_seqlens  # unread unless segment_mode
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    grid = (triton.cdiv(max_len, block), cu_seqlens.numel() - 1, heads)
    _packed_attention_kernel[grid](
        q.contiguous(), k.contiguous(), v.contiguous(), out, cu_seqlens, seg, lut, bias_table.contiguous(),
        heads, head_dim, max_len - 1, scale,
        SEGMENTS=segment_mode, DOT_FP32=interpret or q.dtype == torch.float32,
        BLOCK_M=block, BLOCK_N=block, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
    )
    return out


def packed_attention_reference(q, k, v, cu_seqlens, bias_table, *, max_distance: int = 128, segments=None,
                               segment_mode: bool = False, scale: float = 1.0) -> torch.Tensor:
    """The same, request by request, in plain PyTorch (fp32)."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qr, kr, vr = (x[start:end].float().transpose(0, 1) for x in (q, k, v))  # (heads, L, head_dim)
        positions = torch.arange(end - start, device=q.device)
        buckets = relative_buckets(positions[None, :] - positions[:, None], bias_table.shape[0], max_distance)
        scores = qr @ kr.transpose(1, 2) * scale + bias_table.float()[buckets].permute(2, 0, 1)
        if segment_mode:
            seg = segments[start:end]
            allowed = (seg[None, :] == 0) | (seg[None, :] == seg[:, None])
            scores = scores.masked_fill(~allowed, float("-inf"))
        out[start:end] = (torch.softmax(scores, dim=-1) @ vr).transpose(0, 1).to(q.dtype)
    return out
