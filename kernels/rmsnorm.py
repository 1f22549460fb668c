"""Residual add + T5's RMSNorm, fused: one read of each row instead of three.

T5 blocks end with `hidden = hidden + sublayer(...)` and the next sublayer starts with
`layer_norm(hidden)`; fusing them writes the new residual stream and its normalized copy in one
pass. T5's norm has no mean and no bias: x * rsqrt(mean(x^2) + eps) * weight, with the variance
in fp32 and the result cast to the weight's dtype when that is half precision.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rmsnorm_kernel(x_ptr, residual_ptr, weight_ptr, sum_ptr, out_ptr, dim, eps, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    live = d < dim
    x = tl.load(x_ptr + row * dim + d, mask=live, other=0.0).to(tl.float32)
    x += tl.load(residual_ptr + row * dim + d, mask=live, other=0.0).to(tl.float32)
    x = x.to(sum_ptr.dtype.element_ty)
    tl.store(sum_ptr + row * dim + d, x, mask=live)
    x = x.to(tl.float32)  # normalize the stored (rounded) sum, as the unfused model does
    variance = tl.sum(x * x, axis=0) / dim
    weight = tl.load(weight_ptr + d, mask=live, other=0.0)
    normed = (x * tl.rsqrt(variance + eps)).to(weight.dtype) * weight
    tl.store(out_ptr + row * dim + d, normed.to(out_ptr.dtype.element_ty), mask=live)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + residual, rmsnorm(x + residual) * weight) for rows of the last dimension."""
    dim = x.shape[-1]
    rows = x.numel() // dim
    total = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # written in row order, whatever x's strides
    normed = torch.empty(x.shape, dtype=weight.dtype if weight.dtype in (torch.float16, torch.bfloat16) else x.dtype,
                         device=x.device)
    _add_rmsnorm_kernel[(rows,)](x.contiguous(), residual.contiguous(), weight.contiguous(), total, normed, dim, eps,
                                 BLOCK_D=triton.next_power_of_2(dim))
    return total, normed


def add_rmsnorm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """What transformers' T5LayerNorm computes after the residual add."""
    total = (x.float() + residual.float()).to(x.dtype)
    variance = total.float().pow(2).mean(-1, keepdim=True)
    normed = total.float() * torch.rsqrt(variance + eps)
    if weight.dtype in (torch.float16, torch.bfloat16):
        normed = normed.to(weight.dtype)
    return total, weight * normed
