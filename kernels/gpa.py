"""Gaussian prompt aggregation (PromptSRC's GPA) as one kernel launch per epoch.

PromptSRC keeps theta_GPA = sum_e g_e theta_e over epochs e = 1..E with g_e = N(e; mu, sigma)
normalised over 1..E. Here the aggregate is an fp32 running average: with S_e = g_1 + ... + g_e,

    avg <- lerp(avg, theta_e, g_e / S_e)        (avg = theta_1 after epoch 1)

which after epoch e equals sum_{k<=e} g_k theta_k / S_e, so at e = E (S_E = 1) exactly PromptSRC's sum.
Between epochs it is the normalised partial average rather than the partial sum.

One launch updates every prompt tensor, whatever its shape and dtype (fp32/fp16/bf16): the kernel
reads a small int64 table [4, n] (data pointer, dtype code, numel, offset into the flat fp32 average)
and casts each pointer to its element type. Works under the Triton interpreter (CPU tensors, host
pointers) and on CUDA. The table is rebuilt only when a parameter's storage moves.

Order of this file: Triton kernel, wrapper class, PyTorch reference.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch

from .kl_ce import HAS_TRITON, kernel_available

if HAS_TRITON:
    import triton
    import triton.language as tl

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# ----------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _lerp_into(src, avg, n, factor, BLOCK: tl.constexpr):
        # torch.lerp's two-sided formula, so that results match torch._foreach_lerp_ closely
        offs = tl.arange(0, BLOCK)
        step = tl.num_programs(1).to(tl.int64) * BLOCK  # n is int64 (from the table)
        for start in range(tl.program_id(1).to(tl.int64) * BLOCK, n, step):
            idx = start + offs
            mask = idx < n
            x = tl.load(src + idx, mask=mask, other=0.0).to(tl.float32)
            a = tl.load(avg + idx, mask=mask, other=0.0)
            out = tl.where(factor < 0.5, a + factor * (x - a), x - (x - a) * (1.0 - factor))
            tl.store(avg + idx, out, mask=mask)

    @triton.jit
    def _gpa_update_kernel(table_ptr, avg_ptr, n_tensors, factor, BLOCK: tl.constexpr):
        i = tl.program_id(0)  # tensor; axis 1 strides over its blocks
        addr = tl.load(table_ptr + i)
        code = tl.load(table_ptr + n_tensors + i)
        n = tl.load(table_ptr + 2 * n_tensors + i)
        avg = avg_ptr + tl.load(table_ptr + 3 * n_tensors + i)
        if code == 0:
            _lerp_into(addr.to(tl.pointer_type(tl.float32)), avg, n, factor, BLOCK)
        elif code == 1:
            _lerp_into(addr.to(tl.pointer_type(tl.float16)), avg, n, factor, BLOCK)
        else:
            _lerp_into(addr.to(tl.pointer_type(tl.bfloat16)), avg, n, factor, BLOCK)


def gpa_weights(n_epochs: int, mu: float, sigma: float) -> list[float]:
    """g_e = N(e; mu, sigma) / sum_{e'=1..E} N(e'; mu, sigma), e = 1..E (sigma is a standard deviation)."""
    if n_epochs < 1 or not (math.isfinite(mu) and math.isfinite(sigma)) or sigma <= 0:
        raise ValueError(f"need n_epochs >= 1, finite mu and sigma > 0; got {n_epochs}, {mu}, {sigma}")
    pdf = [math.exp(-0.5 * ((e - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
           for e in range(1, n_epochs + 1)]
    total = sum(pdf)
    if total == 0.0:
        raise ValueError(f"all Gaussian weights underflow for mu={mu}, sigma={sigma} over 1..{n_epochs}")
    return [g / total for g in pdf]


def _check_params(params: Sequence[torch.Tensor], device: torch.device):
    if not params:
        raise ValueError("no tensors to average")
    for k, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"tensor {k} is a {type(p).__name__}")
        if p.dtype not in _DTYPE_CODE:
            raise TypeError(f"tensor {k} has dtype {p.dtype}; float32, float16 or bfloat16 expected")
        if p.device != device:
            raise ValueError(f"tensor {k} is on {p.device}, the average on {device}")
        if not p.is_contiguous():
            raise ValueError(f"tensor {k} is not contiguous")


def _offsets(numels: Sequence[int]) -> list[int]:
    """Where each tensor starts in the flat average: [0, n_0, n_0 + n_1, ...]."""
    offsets = [0]
    for n in numels[:-1]:
        offsets.append(offsets[-1] + n)
    return offsets


def _pointer_table(params: Sequence[torch.Tensor], device) -> torch.Tensor:
    """The kernel's int64 table [4, n]: data pointer, dtype code, numel, offset into the average."""
    numels = [p.numel() for p in params]
    rows = [[p.data_ptr() for p in params], [_DTYPE_CODE[p.dtype] for p in params], numels, _offsets(numels)]
    return torch.tensor(rows, dtype=torch.int64).to(device)


class GaussianPromptAverage:
    """fp32 running Gaussian average of a list of prompt tensors.

    gpa = GaussianPromptAverage(prompt_params, n_epochs=20, mu=15, sigma=1)
    gpa.update(epoch)        # at the end of each epoch, 1-based: one kernel launch
    gpa.copy_to(prompt_params)   # at the end of training (or gpa.averages: fp32 tensors, same shapes)
    """

    def __init__(self, params: Iterable[torch.Tensor], n_epochs: int, mu: float, sigma: float,
                 block: int = 1024):
        params = [p.detach() for p in params]
        if not params:
            raise ValueError("no tensors to average")
        self.device = params[0].device
        _check_params(params, self.device)
        self.weights = gpa_weights(n_epochs, mu, sigma)
        self.shapes = [p.shape for p in params]
        self.numels = [p.numel() for p in params]
        self.offsets = _offsets(self.numels)
        self.flat = torch.zeros(sum(self.numels), dtype=torch.float32, device=self.device)
        self.averages = [self.flat[o:o + n].view(s)
                         for o, n, s in zip(self.offsets, self.numels, self.shapes)]
        self.weight_seen = 0.0  # S_e
        self.block = block
        self._table = None
        self._table_key = None

    def _table_for(self, params):
        key = tuple((p.data_ptr(), p.dtype) for p in params)
        if key != self._table_key:  # shapes were checked: numels and offsets are the average's
            self._table = _pointer_table(params, self.device)  # [4, n]
            self._table_key = key
        return self._table

    @torch.no_grad()
    def update(self, epoch: int, params: Iterable[torch.Tensor]) -> float:
        """Fold in the prompts at the end of `epoch` (1-based). Returns the lerp factor g_e / S_e."""
        if not 1 <= epoch <= len(self.weights):
            raise ValueError(f"epoch must lie in 1..{len(self.weights)}, got {epoch}")
        params = [p.detach() for p in params]
        _check_params(params, self.device)
        if [p.shape for p in params] != self.shapes:
            raise ValueError("tensors differ in number or shape from those the average was built for")
        g = self.weights[epoch - 1]
        self.weight_seen += g
        factor = g / self.weight_seen if self.weight_seen > 0 else 0.0
        gpa_update_(self.flat, params, factor, table=self._table_for(params), block=self.block)
        return factor

    @torch.no_grad()
    def copy_to(self, params: Iterable[torch.Tensor]):
        """Load the average into the parameters (cast to their dtypes)."""
        torch._foreach_copy_([p.data for p in params], self.averages)


def gpa_update_(avg_flat: torch.Tensor, params: Sequence[torch.Tensor], factor: float, *,
                table: Optional[torch.Tensor] = None, block: int = 1024):
    """avg_flat[offset_k : offset_k + numel_k] = lerp(avg_k, params[k].float(), factor) for every k,
    in one kernel launch. avg_flat: fp32, contiguous, tensors packed in order."""
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: use gpa_update_reference (kernels.HAS_TRITON is False)")
    if not isinstance(avg_flat, torch.Tensor) or avg_flat.dtype != torch.float32 or avg_flat.dim() != 1 \
            or not avg_flat.is_contiguous():
        raise TypeError("avg_flat must be a contiguous 1-D float32 tensor")
    if not kernel_available(avg_flat.device):
        raise RuntimeError(f"no Triton backend for {avg_flat.device} (CPU needs TRITON_INTERPRET=1 "
                           "set before importing kernels)")
    if not math.isfinite(factor) or not 0.0 <= factor <= 1.0:
        raise ValueError(f"factor must lie in [0, 1], got {factor}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    if table is None:
        _check_params(params, avg_flat.device)
        total = sum(p.numel() for p in params)
        if total != avg_flat.numel():
            raise ValueError(f"tensors hold {total} elements, the average {avg_flat.numel()}")
        table = _pointer_table(params, avg_flat.device)
    n_tensors = len(params)
    n_split = max(1, min(triton.cdiv(max(p.numel() for p in params), block), 256))
    _gpa_update_kernel[(n_tensors, n_split)](table, avg_flat, n_tensors, float(factor), BLOCK=block,
                                             num_warps=4)


# ----------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def gpa_update_reference(averages: list[torch.Tensor], params: Sequence[torch.Tensor], factor: float):
    """The readable form (as torch.optim.swa_utils does it): one foreach lerp over fp32 averages."""
    torch._foreach_lerp_(averages, [p.detach().float() for p in params], factor)


def gpa_sum_reference(params_per_epoch: Sequence[Sequence[torch.Tensor]], weights: Sequence[float]):
    """PromptSRC's own form, in float64: theta_GPA = sum_e g_e theta_e."""
    out = [torch.zeros(p.shape, dtype=torch.float64) for p in params_per_epoch[0]]
    for g, params in zip(weights, params_per_epoch):
        for o, p in zip(out, params):
            o += g * p.detach().double().cpu()
    return out
