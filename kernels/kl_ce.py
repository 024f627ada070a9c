"""Fused cross-entropy + temperature KL over logits [B, C], with ProReg's per-sample adaptive weight.

Per row i (student s, teacher t, label y, temperature T, p = softmax(t/T), q = softmax(s/T)):

    ce_i = lse(s_i) - s_{i,y}                       (hard-label CE at T = 1)
    kl_i = sum_j p_j (log p_j - log q_j)            kl_form="kl"   (true KL, >= 0)
         = sum_j p_j (-log q_j)                     kl_form="soft_ce" (ProReg's official value; KL + H(p))
    loss = sum_i (a_i ce_i + b_i T^2 kl_i) / B

fixed weights:    a_i = ce_weight, b_i = kl_weight        (PromptSRC: a = 0 or 1, b = 1/C, T = 1)
adaptive (ProReg, losses.py xERM): ce_zs = CE of the teacher at T = 1,
    w_i = exp(-10 ce_zs) / (exp(-ce_i) + exp(-10 ce_zs) + 1e-5),   a_i = 1 - w_i,   b_i = alpha w_i
    detach_weight=True (official) stops the gradient through w; False adds dL/dw_i * dw_i/ds_i.

One program per row makes two passes over C in chunks of BLOCK: pass 1 keeps online-softmax running
maxima and rescaled sums (fp32) for s/T, t/T and, where needed, s and t at T = 1; pass 2 writes the
gradient w.r.t. the student (already scaled by 1/B) into a fresh buffer. The caller's logits are never
written. Backward only multiplies that buffer by the upstream gradient, and skips even that when the
upstream gradient is 1 (decided on the device, no host sync; small gradients are scaled by one torch
op instead, cheaper on the host). The teacher gets no gradient.

Order of this file: Triton kernels, autograd.Function and wrappers, PyTorch reference.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # method files fall back to the reference below
    triton = None
    tl = None
    HAS_TRITON = False

# Kernels decorated while TRITON_INTERPRET=1 run on CPU tensors; others need CUDA tensors.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _kl_ce_kernel(
        s_ptr, t_ptr, y_ptr, grad_ptr, stats_ptr,  # s, t, grad: [B, C]; y: [B]; stats: [4, B] fp32
        B, C, s_stride, t_stride, g_stride,
        inv_t, temp, temp_sq, ce_weight, kl_weight, alpha, inv_b,
        HAS_CE: tl.constexpr, ADAPTIVE: tl.constexpr, DETACH_W: tl.constexpr, SOFT_CE: tl.constexpr,
        UNIT_T: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
        REVERSE: tl.constexpr, EVICT1: tl.constexpr, EVICT2: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)  # int64: row * stride overflows int32 at B*C > 2^31
        s_row = s_ptr + row * s_stride
        t_row = t_ptr + row * t_stride
        offs = tl.arange(0, BLOCK)

        # Online softmax state, fp32. q: s/T; p: t/T; s1, z: s and t at T = 1 (only when T != 1).
        m_q = float("-inf")
        d_q = 0.0
        m_p = float("-inf")
        d_p = 0.0
        a_p = 0.0  # sum_j e^{t_j/T - m_p} x_j, x = t/T - s/T (KL) or -s/T (soft CE)
        m_s1 = float("-inf")
        d_s1 = 0.0
        m_z = float("-inf")
        d_z = 0.0
        for start in range(0, C, BLOCK):
            cols = start + offs
            mask = cols < C
            s = tl.load(s_row + cols, mask=mask, other=float("-inf"),
                            eviction_policy=EVICT1).to(tl.float32)
            t = tl.load(t_row + cols, mask=mask, other=float("-inf"),
                            eviction_policy=EVICT1).to(tl.float32)
            if UNIT_T:
                sq = s
                tp = t
            else:
                sq = s * inv_t
                tp = t * inv_t
            m_new = tl.maximum(m_q, tl.max(sq, 0))
            d_q = d_q * tl.exp(m_q - m_new) + tl.sum(tl.exp(sq - m_new), 0)
            m_q = m_new

            m_new = tl.maximum(m_p, tl.max(tp, 0))
            rescale = tl.exp(m_p - m_new)
            e = tl.exp(tp - m_new)  # 0 on masked lanes (-inf)
            if SOFT_CE:
                x = -sq
            else:
                x = tp - sq
            x = tl.where(mask, x, 0.0)  # -inf - -inf = NaN on masked lanes
            d_p = d_p * rescale + tl.sum(e, 0)
            a_p = a_p * rescale + tl.sum(e * x, 0)
            m_p = m_new

            if not UNIT_T:
                if HAS_CE:
                    m_new = tl.maximum(m_s1, tl.max(s, 0))
                    d_s1 = d_s1 * tl.exp(m_s1 - m_new) + tl.sum(tl.exp(s - m_new), 0)
                    m_s1 = m_new
                if ADAPTIVE:
                    m_new = tl.maximum(m_z, tl.max(t, 0))
                    d_z = d_z * tl.exp(m_z - m_new) + tl.sum(tl.exp(t - m_new), 0)
                    m_z = m_new

        lse_q = m_q + tl.log(d_q)
        lse_p = m_p + tl.log(d_p)
        if SOFT_CE:
            kl = a_p / d_p + lse_q
        else:
            # E_p[t/T - s/T] - lse_p + lse_q, the maxima subtracted first (they nearly cancel)
            kl = a_p / d_p + (m_q - m_p) + (tl.log(d_q) - tl.log(d_p))

        ce = 0.0
        y = 0
        if HAS_CE:
            y = tl.load(y_ptr + row).to(tl.int64)
            y_ok = (y >= 0) & (y < C)
            y_safe = tl.where(y_ok, y, 0)  # never read out of bounds; a bad label gives NaN
            s_y = tl.load(s_row + y_safe).to(tl.float32)
            s_y = tl.where(y_ok, s_y, float("nan"))
            if UNIT_T:
                lse_s1 = lse_q
            else:
                lse_s1 = m_s1 + tl.log(d_s1)
            ce = lse_s1 - s_y

        w = 0.0
        if ADAPTIVE:
            t_y = tl.load(t_row + y_safe).to(tl.float32)
            if UNIT_T:
                lse_z = lse_p
            else:
                lse_z = m_z + tl.log(d_z)
            ce_zs = lse_z - t_y
            num = tl.exp(-10.0 * ce_zs)
            e_ft = tl.exp(-ce)
            den = e_ft + num + 1e-5
            w = num / den
            c_ce = 1.0 - w
            c_kl = alpha * w
            row_loss = c_ce * ce + c_kl * temp_sq * kl
            g_ce = c_ce
            if not DETACH_W:
                # dL_i/dw_i * dw_i/dce_i; dce_i/ds is the same softmax - onehot as the CE term
                g_ce += (alpha * temp_sq * kl - ce) * (num * e_ft / (den * den))
        else:
            c_kl = kl_weight
            if HAS_CE:
                g_ce = ce_weight
                row_loss = ce_weight * ce + kl_weight * temp_sq * kl
            else:
                g_ce = 0.0
                row_loss = kl_weight * temp_sq * kl

        tl.store(stats_ptr + row, ce)
        tl.store(stats_ptr + B + row, kl)
        tl.store(stats_ptr + 2 * B + row, w)
        tl.store(stats_ptr + 3 * B + row, row_loss * inv_b)

        if WRITE_GRAD:
            g_row = grad_ptr + row * g_stride
            k_ce = g_ce * inv_b
            k_kl = c_kl * temp * inv_b  # d(T^2 KL)/ds = T (q - p)
            if UNIT_T:
                k_q = k_ce + k_kl
            else:
                k_q = k_kl
            n_chunks = tl.cdiv(C, BLOCK)
            for i in range(0, n_chunks):
                # REVERSE: the chunks pass 1 read last are the likeliest still in L2
                start = (n_chunks - 1 - i) * BLOCK if REVERSE else i * BLOCK
                cols = start + offs
                mask = cols < C
                # -inf on masked lanes: q = p = 0 there, nothing overflows before the masked store
                s = tl.load(s_row + cols, mask=mask, other=float("-inf"),
                            eviction_policy=EVICT2).to(tl.float32)
                t = tl.load(t_row + cols, mask=mask, other=float("-inf"),
                            eviction_policy=EVICT2).to(tl.float32)
                if UNIT_T:
                    q = tl.exp(s - lse_q)
                    p = tl.exp(t - lse_p)
                else:
                    q = tl.exp(s * inv_t - lse_q)
                    p = tl.exp(t * inv_t - lse_p)
                g = k_q * q - k_kl * p
                if HAS_CE:
                    if not UNIT_T:
                        g += k_ce * tl.exp(s - lse_s1)
                    # one-hot term in fp32 before rounding: bf16 would cancel at confident rows
                    g -= tl.where(cols == y, k_ce, 0.0)
                tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _scale_by_upstream_kernel(g_ptr, go_ptr, n, BLOCK: tl.constexpr):
        # grad *= upstream scalar, in place on our own buffer; nothing to do when it is 1 (the usual
        # loss.backward()), decided here so the host never waits for the device.
        go = tl.load(go_ptr).to(tl.float32)
        if go != 1.0:
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
            tl.store(g_ptr + offs, (g * go).to(g_ptr.dtype.element_ty), mask=mask)

    def _prune(configs, named_args, **kwargs):
        c_pow2 = triton.next_power_of_2(named_args["C"])
        if c_pow2 <= 256:  # one chunk, launch-bound: nothing to tune
            block, warps = _default_launch(named_args["C"])
            keep = [cf for cf in configs if cf.kwargs["BLOCK"] == block and cf.num_warps == warps]
        elif c_pow2 <= 1024:
            keep = [cf for cf in configs if cf.kwargs["BLOCK"] == c_pow2 and cf.num_warps in (4, 8)]
        else:
            keep = [cf for cf in configs if 1024 <= cf.kwargs["BLOCK"] <= c_pow2 and cf.num_warps >= 4]
        return keep or [configs[-1]]

    _CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w)
                for b in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192) for w in (1, 2, 4, 8, 16)]
    # On CUDA, when no block is forced: tuned once per (B, C, dtypes). Re-running is harmless: the
    # kernel only writes its outputs.
    _kl_ce_kernel_tuned = triton.autotune(configs=_CONFIGS, key=["B", "C"],
                                          prune_configs_by={"early_config_prune": _prune})(_kl_ce_kernel)


def _default_launch(C: int) -> tuple[int, int]:
    """(BLOCK, num_warps) used by the interpreter and as the untuned choice."""
    block = min(max(16, 1 << (C - 1).bit_length()), 4096)
    return block, (1 if block <= 64 else 2 if block <= 256 else 4 if block <= 1024 else 8)


# ----------------------------------------------------------------------------------------------
# autograd.Function and the wrappers method files call
# ----------------------------------------------------------------------------------------------
class KLCEStats(NamedTuple):
    ce: torch.Tensor      # [B] fp32, hard-label CE of the student (0 when there are no labels)
    kl: torch.Tensor      # [B] fp32, KL(p_T || q_T) or soft-target CE, per kl_form, without T^2
    weight: torch.Tensor  # [B] fp32, ProReg's adaptive w (0 in fixed-weight mode)


def kernel_available(device) -> bool:
    """True where the Triton kernels can run on tensors of this device."""
    device = torch.device(device)
    return HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and INTERPRETED))


def _check_finite(name, value):
    if isinstance(value, torch.Tensor):
        value = float(value)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_inputs(student, teacher, labels, temperature, need_labels, check_labels):
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} logits must be a tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} logits must be 2-D [B, C], got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} logits must be float32, float16 or bfloat16, got {x.dtype}")
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ in shape")
    B, C = student.shape
    if B == 0 or C == 0:
        raise ValueError(f"logits must be non-empty, got shape {tuple(student.shape)}")
    if teacher.device != student.device:
        raise ValueError(f"student on {student.device} but teacher on {teacher.device}")
    if teacher.requires_grad and torch.is_grad_enabled():
        raise ValueError("teacher logits require grad but get none from this loss; pass teacher.detach()")
    temperature = _check_finite("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if need_labels:
        if labels is None:
            raise ValueError("labels are needed (CE weight is non-zero or the weight is adaptive)")
        if not isinstance(labels, torch.Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex \
                or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels))}")
        if labels.shape != (B,):
            raise ValueError(f"labels must have shape [B] = ({B},), got {tuple(labels.shape)}")
        if labels.device != student.device:
            raise ValueError(f"logits on {student.device} but labels on {labels.device}")
        if check_labels or student.device.type == "cpu":
            bad = (labels < 0) | (labels >= C)
            if bool(bad.any()):  # one host sync on CUDA; check_labels=False skips it (bad rows give NaN)
                raise ValueError(f"labels must lie in [0, {C}), got {labels[bad][:5].tolist()}")
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: use kl_ce_reference (kernels.HAS_TRITON is False)")
    if not kernel_available(student.device):
        if student.device.type == "cpu":
            raise RuntimeError("CPU tensors run only under the Triton interpreter: set TRITON_INTERPRET=1 "
                               "before importing kernels, or use kl_ce_reference")
        raise RuntimeError(f"no Triton backend for device {student.device}")
    return temperature


_TUNED: dict = {}  # (B, C, dtypes, flags) -> (BLOCK, num_warps) chosen by the autotuner
SCALE_IN_KERNEL_MIN = 1 << 20  # gradients with fewer elements are scaled by torch in backward
# How pass 2 re-reads the row: chunk order and L2 eviction hints for the two passes' loads. A row of
# C = 32000 fp32 logits (s and t: 256 KB) may or may not still sit in L2 when pass 2 reads it again.
# H100, B = 1024, C = 32000, fp32: 56 % of copy bandwidth in order without hints, 66 % reversed with
# hints (kernels/bench.py --cuda-graph --pass2-variants; README).
PASS2_ORDER = dict(REVERSE=True, EVICT1="evict_last", EVICT2="evict_first")


class KLCELoss(torch.autograd.Function):
    """loss = sum_i (a_i ce_i + b_i T^2 kl_i) / B; returns (loss, ce, kl, w), only loss differentiable."""

    @staticmethod
    def forward(ctx, student, teacher, labels, temperature, ce_weight, kl_weight, alpha,
                adaptive, detach_weight, soft_ce, block, num_warps):
        B, C = student.shape
        # the kernel needs unit stride along C only; rows may be strided (e.g. a slice of a bigger batch)
        student = student if student.stride(1) == 1 else student.contiguous()
        teacher = teacher if teacher.stride(1) == 1 else teacher.contiguous()
        has_ce = adaptive or ce_weight != 0.0
        write_grad = ctx.needs_input_grad[0]
        grad = torch.empty((B, C), dtype=student.dtype, device=student.device) if write_grad else student
        stats = torch.empty((4, B), dtype=torch.float32, device=student.device)
        y = labels.contiguous() if has_ce else stats  # [B], read at y_ptr + row; unused without CE
        args = (student, teacher, y, grad, stats, B, C, student.stride(0), teacher.stride(0),
                grad.stride(0), 1.0 / temperature, temperature, temperature * temperature,
                float(ce_weight), float(kl_weight), float(alpha), 1.0 / B)
        flags = dict(HAS_CE=has_ce, ADAPTIVE=adaptive, DETACH_W=detach_weight, SOFT_CE=soft_ce,
                     UNIT_T=temperature == 1.0, WRITE_GRAD=write_grad, **PASS2_ORDER)
        if block is None and student.is_cuda and not INTERPRETED:
            key = (B, C, student.dtype, teacher.dtype, *flags.values())
            tuned = _TUNED.get(key)
            if tuned is None:  # first call of this shape: autotune, then launch the plain kernel
                _kl_ce_kernel_tuned[(B,)](*args, **flags)
                cfg = _kl_ce_kernel_tuned.best_config
                _TUNED[key] = (cfg.kwargs["BLOCK"], cfg.num_warps)
            else:  # the autotuner's own dispatch costs host time on every call; skip it
                _kl_ce_kernel[(B,)](*args, **flags, BLOCK=tuned[0], num_warps=tuned[1])
        else:
            d_block, d_warps = _default_launch(C)
            _kl_ce_kernel[(B,)](*args, **flags, BLOCK=block or d_block, num_warps=num_warps or d_warps)
        loss = stats[3].sum()
        ce, kl, w = stats[0], stats[1], stats[2]
        ctx.mark_non_differentiable(ce, kl, w)
        ctx.grad = grad if write_grad else None
        return loss, ce, kl, w

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("KLCELoss: backward called twice; the gradient buffer is scaled in place, "
                               "so retain_graph=True is not supported")
        ctx.grad = None
        n = grad.numel()
        if n < SCALE_IN_KERNEL_MIN:  # small: one torch op costs less host time than a Triton launch
            grad.mul_(grad_loss)
        else:  # large: skip the extra read/write pass when the upstream gradient is 1
            block = 4096
            _scale_by_upstream_kernel[(triton.cdiv(n, block),)](grad, grad_loss.reshape(()).contiguous(),
                                                                n, BLOCK=block, num_warps=8)
        return grad, *([None] * 11)


def fused_kl_ce(student: torch.Tensor, teacher: torch.Tensor, labels: Optional[torch.Tensor] = None, *,
                temperature: float = 1.0, ce_weight: float = 1.0, kl_weight: float = 1.0,
                kl_form: str = "kl", check_labels: bool = True, return_stats: bool = False,
                block: Optional[int] = None, num_warps: Optional[int] = None):
    """Fixed weights: mean_i(ce_weight * ce_i + kl_weight * T^2 * kl_i), one kernel launch.

    student, teacher: [B, C] fp32/fp16/bf16 (teacher gets no gradient); labels: [B] integers in [0, C),
    needed unless ce_weight == 0. Returns an fp32 scalar, or (loss, KLCEStats) with return_stats."""
    need_labels = float(ce_weight) != 0.0
    temperature = _check_inputs(student, teacher, labels, temperature, need_labels, check_labels)
    ce_weight = _check_finite("ce_weight", ce_weight)
    kl_weight = _check_finite("kl_weight", kl_weight)
    loss, ce, kl, w = KLCELoss.apply(student, teacher, labels, temperature, ce_weight, kl_weight, 0.0,
                                     False, True, _soft_ce(kl_form), _check_block(block), num_warps)
    return (loss, KLCEStats(ce, kl, w)) if return_stats else loss


def proreg_loss(student_logits: torch.Tensor, zs_logits: torch.Tensor, labels: torch.Tensor, *,
                alpha: float, temperature: float = 1.0, detach_weight: bool = True,
                kl_form: str = "soft_ce", check_labels: bool = True, return_stats: bool = False,
                block: Optional[int] = None, num_warps: Optional[int] = None):
    """ProReg (losses.py xERM): mean((1 - w) ce_ft) + alpha * mean(w T^2 kl(p_zs,T || p_ft,T)).

    w = exp(-10 ce_zs) / (exp(-ce_ft) + exp(-10 ce_zs) + 1e-5), gradient stopped (official) unless
    detach_weight=False. kl_form="soft_ce" (default) is the official value -sum p_zs log p_ft; "kl"
    subtracts the teacher entropy (same gradient while the weight is detached)."""
    temperature = _check_inputs(student_logits, zs_logits, labels, temperature, True, check_labels)
    alpha = _check_finite("alpha", alpha)
    loss, ce, kl, w = KLCELoss.apply(student_logits, zs_logits, labels, temperature, 0.0, 0.0, alpha,
                                     True, bool(detach_weight), _soft_ce(kl_form), _check_block(block),
                                     num_warps)
    return (loss, KLCEStats(ce, kl, w)) if return_stats else loss


def promptsrc_logit_loss(prompted_logits: torch.Tensor, frozen_logits: torch.Tensor,
                         labels: Optional[torch.Tensor] = None, *, check_labels: bool = True,
                         return_stats: bool = False, block: Optional[int] = None,
                         num_warps: Optional[int] = None):
    """PromptSRC's L_SCL-logits = F.kl_div(log_softmax(z_p), log_softmax(z), log_target=True,
    reduction='sum') / (B*C) at T = 1; with labels, F.cross_entropy(z_p, labels) is added in the
    same pass. return_stats: (loss, KLCEStats), per row the CE and the KL (before the 1/C)."""
    if not isinstance(prompted_logits, torch.Tensor) or prompted_logits.dim() != 2:
        raise ValueError("prompted logits must be a 2-D tensor [B, C]")
    C = prompted_logits.shape[1]
    return fused_kl_ce(prompted_logits, frozen_logits, labels, temperature=1.0,
                       ce_weight=0.0 if labels is None else 1.0, kl_weight=1.0 / C, kl_form="kl",
                       check_labels=check_labels, return_stats=return_stats, block=block,
                       num_warps=num_warps)


def _soft_ce(kl_form: str) -> bool:
    if kl_form not in ("kl", "soft_ce"):
        raise ValueError(f"kl_form must be 'kl' or 'soft_ce', got {kl_form!r}")
    return kl_form == "soft_ce"


def _check_block(block):
    if block is not None and (not isinstance(block, int) or block < 16 or block & (block - 1)):
        raise ValueError(f"block must be a power of two >= 16, got {block!r}")
    return block


# ----------------------------------------------------------------------------------------------
# PyTorch reference (the readable form; tests compare the kernel with it and with its autograd)
# ----------------------------------------------------------------------------------------------
def kl_ce_reference(student, teacher, labels=None, *, temperature=1.0, ce_weight=1.0, kl_weight=1.0,
                    alpha=1.0, adaptive=False, detach_weight=True, kl_form="kl"):
    """Returns (loss, ce, kl, w) in fp32, differentiable w.r.t. student like the kernel."""
    s, t = student.float(), teacher.detach().float()                       # [B, C]
    B = s.shape[0]
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    p = log_p.exp()
    if kl_form == "kl":
        kl = (p * (log_p - log_q)).sum(-1)                                 # [B]
    else:
        kl = -(p * log_q).sum(-1)
    has_ce = adaptive or ce_weight != 0.0
    ce = F.cross_entropy(s, labels.long(), reduction="none") if has_ce else s.new_zeros(B)
    if adaptive:
        ce_zs = F.cross_entropy(t, labels.long(), reduction="none")
        w = torch.exp(-10 * ce_zs) / (torch.exp(-ce) + torch.exp(-10 * ce_zs) + 1e-5)
        w_used = w.detach() if detach_weight else w
        rows = (1 - w_used) * ce + alpha * w_used * temperature ** 2 * kl
    else:
        w = s.new_zeros(B)
        rows = ce_weight * ce + kl_weight * temperature ** 2 * kl
    return rows.mean(), ce.detach(), kl.detach(), w.detach()


def proreg_loss_reference(student_logits, zs_logits, labels, *, alpha, temperature=1.0,
                          detach_weight=True, kl_form="soft_ce"):
    """ProReg's loss as a method file would write it in plain PyTorch."""
    ce_ft = F.cross_entropy(student_logits.float(), labels, reduction="none")
    ce_zs = F.cross_entropy(zs_logits.float(), labels, reduction="none")
    w = torch.exp(-10 * ce_zs) / (torch.exp(-ce_ft) + torch.exp(-10 * ce_zs) + 1e-5)
    if detach_weight:
        w = w.detach()
    T = temperature
    p_zs = F.softmax(zs_logits.float() / T, dim=-1)
    log_p_ft = F.log_softmax(student_logits.float() / T, dim=-1)
    kl = -(p_zs * log_p_ft).sum(-1)
    if kl_form == "kl":
        kl = kl + (p_zs * F.log_softmax(zs_logits.float() / T, dim=-1)).sum(-1)
    return ((1 - w) * ce_ft).mean() + alpha * (w * T * T * kl).mean()


def promptsrc_logit_loss_reference(prompted_logits, frozen_logits, labels=None):
    """PromptSRC's logit term exactly as its trainer computes it (plus CE when labels are given)."""
    z_p, z = prompted_logits.float(), frozen_logits.float()
    loss = F.kl_div(F.log_softmax(z_p, dim=1), F.log_softmax(z, dim=1), reduction="sum",
                    log_target=True) / z_p.numel()
    if labels is not None:
        loss = loss + F.cross_entropy(z_p, labels)
    return loss
