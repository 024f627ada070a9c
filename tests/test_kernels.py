"""kernels/: the fused CE+KL loss and the GPA update against their PyTorch references.

Runs on CUDA when present, else on CPU under the Triton interpreter (conftest.py sets TRITON_INTERPRET
before this module imports kernels). Property tests draw shapes, dtypes, temperatures, logit scales,
shifts and weights; gradients are compared with autograd of the reference."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import example, given, settings, strategies as st

import kernels
from kernels import (GaussianPromptAverage, fused_kl_ce, gpa_sum_reference, gpa_update_,
                     gpa_update_reference, gpa_weights, kl_ce_reference, promptsrc_logit_loss,
                     promptsrc_logit_loss_reference, proreg_loss, proreg_loss_reference)

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_kernels = pytest.mark.skipif(not kernels.kernel_available(DEV), reason="no Triton backend here")
# the interpreter evaluates masked lanes (-inf - -inf) before tl.where discards them
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# gradient tolerances (atol, rtol) per student dtype, vs the fp32 reference on the same rounded inputs
GRAD_TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1e-2, 2e-2)}


def make_logits(B, C, *, seed, scale=3.0, shift=0.0, margin=0.0, dtype=torch.float32,
                teacher_dtype=None, label_dtype=torch.int64):
    """student, teacher [B, C], labels [B]; the teacher leans towards the label by `margin`, so that
    ProReg's weight takes values across (0, 1) instead of sitting at 0."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, C, generator=g) * scale + shift
    t = torch.randn(B, C, generator=g) * scale - shift
    y = torch.randint(0, C, (B,), generator=g)
    t[torch.arange(B), y] += margin * torch.rand(B, generator=g) * 2
    s = s.to(dtype).to(DEV)
    t = t.to(teacher_dtype or dtype).to(DEV)
    return s, t, y.to(label_dtype).to(DEV)


def run_both(s, t, y, **kw):
    """(kernel loss, stats, grad) and (reference loss, ce, kl, w, grad) on the same inputs."""
    adaptive = kw.pop("adaptive")
    common = dict(temperature=kw["temperature"], kl_form=kw["kl_form"], block=kw.get("block"))
    s1 = s.detach().clone().requires_grad_()
    if adaptive:
        loss, stats = proreg_loss(s1, t, y, alpha=kw["alpha"], detach_weight=kw["detach_weight"],
                                  return_stats=True, **common)
    else:
        loss, stats = fused_kl_ce(s1, t, y, ce_weight=kw["ce_weight"], kl_weight=kw["kl_weight"],
                                  return_stats=True, **common)
    (grad,) = torch.autograd.grad(loss, s1)
    s2 = s.detach().clone().requires_grad_()
    ref = kl_ce_reference(s2, t, y, temperature=kw["temperature"], ce_weight=kw["ce_weight"],
                          kl_weight=kw["kl_weight"], alpha=kw["alpha"], adaptive=adaptive,
                          detach_weight=kw["detach_weight"], kl_form=kw["kl_form"])
    (ref_grad,) = torch.autograd.grad(ref[0], s2)
    return (loss, stats, grad), (*ref, ref_grad)


def assert_matches(mine, ref, *, dtype, scale, T, weight):
    (loss, stats, grad), (r_loss, r_ce, r_kl, r_w, r_grad) = mine, ref
    # fp32 log-sum-exp of logits of size ~scale carries an error ~scale * eps; T^2 * weight scales the KL
    v_atol = 2e-5 * (1 + scale) * (1 + T * T * weight)
    torch.testing.assert_close(stats.ce.cpu(), r_ce.cpu(), atol=2e-5 * (1 + scale), rtol=1e-4)
    torch.testing.assert_close(stats.kl.cpu(), r_kl.cpu(), atol=2e-5 * (1 + scale / T), rtol=1e-4)
    torch.testing.assert_close(stats.weight.cpu(), r_w.cpu(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loss.cpu(), r_loss.cpu(), atol=v_atol, rtol=1e-4)
    assert grad.dtype == r_grad.dtype and grad.shape == r_grad.shape
    atol, rtol = GRAD_TOL[dtype]
    torch.testing.assert_close(grad.float().cpu(), r_grad.float().cpu(), atol=atol * (1 + T * weight),
                               rtol=rtol)


# ------------------------------------------------------------------------------------------------
# fused CE + KL: property tests
# ------------------------------------------------------------------------------------------------
@needs_kernels
@settings(max_examples=60)
@given(B=st.integers(1, 16), C=st.integers(2, 160), dtype=st.sampled_from(list(DTYPES)),
       teacher_dtype=st.sampled_from(list(DTYPES)), T=st.floats(0.25, 8.0), scale=st.floats(0.1, 30.0),
       shift=st.floats(-50.0, 50.0), margin=st.floats(0.0, 12.0), adaptive=st.booleans(),
       detach_weight=st.booleans(), kl_form=st.sampled_from(["kl", "soft_ce"]),
       ce_weight=st.floats(0.0, 2.0), kl_weight=st.floats(0.0, 2.0), alpha=st.floats(0.0, 3.0),
       block=st.sampled_from([None, None, 16, 32]), label_dtype=st.sampled_from([torch.int64, torch.int32]),
       seed=st.integers(0, 2**31 - 1))
# explicit cases: several chunks with a rising maximum (the online rescale must act), and T = 1
@example(B=3, C=150, dtype="fp32", teacher_dtype="fp32", T=2.0, scale=20.0, shift=0.0, margin=4.0,
         adaptive=False, detach_weight=True, kl_form="kl", ce_weight=1.0, kl_weight=1.0, alpha=1.0,
         block=16, label_dtype=torch.int64, seed=1)
@example(B=5, C=100, dtype="fp16", teacher_dtype="fp16", T=1.0, scale=5.0, shift=3.0, margin=6.0,
         adaptive=True, detach_weight=False, kl_form="soft_ce", ce_weight=0.0, kl_weight=0.0, alpha=2.0,
         block=16, label_dtype=torch.int64, seed=2)
def test_kl_ce_matches_reference(B, C, dtype, teacher_dtype, T, scale, shift, margin, adaptive,
                                 detach_weight, kl_form, ce_weight, kl_weight, alpha, block,
                                 label_dtype, seed):
    dtype = DTYPES[dtype]
    s, t, y = make_logits(B, C, seed=seed, scale=scale, shift=shift, margin=margin, dtype=dtype,
                          teacher_dtype=DTYPES[teacher_dtype], label_dtype=label_dtype)
    mine, ref = run_both(s, t, y, temperature=T, adaptive=adaptive, detach_weight=detach_weight,
                         kl_form=kl_form, ce_weight=ce_weight, kl_weight=kl_weight, alpha=alpha,
                         block=block)
    weight = max(kl_weight, alpha) if not adaptive else alpha + scale  # non-detached w's slope ~ ce
    assert_matches(mine, ref, dtype=dtype, scale=scale + abs(shift), T=T, weight=weight)


@needs_kernels
@pytest.mark.parametrize("T", [1.0, 3.0])
@pytest.mark.parametrize("adaptive", [False, True])
def test_multi_chunk_rising_maximum(T, adaptive):
    """Logits rise along C, so every chunk of 16 has a new maximum: without the online-softmax
    rescale the sums are wrong."""
    B, C = 4, 300
    s, t, y = make_logits(B, C, seed=7, scale=1.0, margin=3.0)
    ramp = torch.linspace(0, 12, C, device=DEV)
    s, t = s + ramp, t + ramp.flip(0) * 0.5 + ramp * 0.5
    mine, ref = run_both(s, t, y, temperature=T, adaptive=adaptive, detach_weight=False, kl_form="kl",
                         ce_weight=0.5, kl_weight=1.5, alpha=1.5, block=16)
    assert_matches(mine, ref, dtype=torch.float32, scale=13.0, T=T, weight=1.5 + 13)


@needs_kernels
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("evict", [("", ""), ("evict_last", "evict_first")])
def test_pass2_order_variants(reverse, evict, monkeypatch):
    monkeypatch.setattr(kernels.kl_ce, "PASS2_ORDER", dict(REVERSE=reverse, EVICT1=evict[0], EVICT2=evict[1]))
    monkeypatch.setattr(kernels.kl_ce, "_TUNED", {})
    s, t, y = make_logits(3, 70, seed=11, scale=6.0, margin=4.0)
    mine, ref = run_both(s, t, y, temperature=1.7, adaptive=True, detach_weight=False, kl_form="kl",
                         ce_weight=0.0, kl_weight=0.0, alpha=1.2, block=16)
    assert_matches(mine, ref, dtype=torch.float32, scale=6.0, T=1.7, weight=1.2 + 6)


@needs_kernels
@pytest.mark.parametrize("C", [2, 50_000])
def test_extreme_class_counts(C):
    s, t, y = make_logits(2, C, seed=3, scale=4.0, margin=5.0, dtype=torch.bfloat16)
    mine, ref = run_both(s, t, y, temperature=2.0, adaptive=True, detach_weight=True, kl_form="kl",
                         ce_weight=0.0, kl_weight=0.0, alpha=2.0)
    assert_matches(mine, ref, dtype=torch.bfloat16, scale=4.0, T=2.0, weight=2.0)


# ------------------------------------------------------------------------------------------------
# fused CE + KL: behaviour of the wrapper
# ------------------------------------------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("scale_in_kernel", [False, True])
def test_upstream_gradient_and_inputs_untouched(scale_in_kernel, monkeypatch):
    if scale_in_kernel:  # the Triton path of backward, normally taken only for large gradients
        monkeypatch.setattr(kernels.kl_ce, "SCALE_IN_KERNEL_MIN", 0)
    s, t, y = make_logits(6, 33, seed=4, dtype=torch.float16)
    s0, t0 = s.clone(), t.clone()
    for upstream in (1.0, -2.5):
        a = s.clone().requires_grad_()
        (fused_kl_ce(a, t, y, temperature=1.5, kl_weight=0.5) * upstream).backward()
        b = s.clone().requires_grad_()
        (kl_ce_reference(b, t, y, temperature=1.5, kl_weight=0.5)[0] * upstream).backward()
        torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=2e-3, rtol=2e-3)
    assert torch.equal(s, s0) and torch.equal(t, t0)  # the caller's logits are never written


@needs_kernels
def test_strided_rows_and_columns():
    s, t, y = make_logits(5, 40, seed=5)
    wide = torch.cat([s, torch.randn_like(s)], 1)[:, :40]        # row stride 80
    transposed = t.t().contiguous().t()                           # column stride != 1: copied
    y_strided = torch.stack([y, torch.zeros_like(y)], 1)[:, 0]    # label stride 2: copied
    a = wide.clone().requires_grad_()
    g_mine = torch.autograd.grad(proreg_loss(a[:, :40], transposed, y_strided, alpha=1.0), a)[0]
    b = wide.clone().requires_grad_()
    g_ref = torch.autograd.grad(proreg_loss_reference(b[:, :40], t, y, alpha=1.0), b)[0]
    torch.testing.assert_close(g_mine, g_ref, atol=1e-6, rtol=1e-5)


@needs_kernels
def test_no_grad_forward_and_double_backward_refused():
    s, t, y = make_logits(3, 20, seed=6)
    with torch.no_grad():
        v = proreg_loss(s, t, y, alpha=1.0)
    torch.testing.assert_close(v, proreg_loss_reference(s, t, y, alpha=1.0))
    a = s.clone().requires_grad_()
    loss = fused_kl_ce(a, t, y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()


@needs_kernels
@pytest.mark.parametrize("detach_weight", [True, False])
@pytest.mark.parametrize("kl_form", ["soft_ce", "kl"])
def test_proreg_drop_in(detach_weight, kl_form):
    """proreg_loss equals the plain-PyTorch ProReg loss a method file would write, value and grad."""
    s, t, y = make_logits(8, 50, seed=8, scale=4.0, margin=6.0)
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    kw = dict(alpha=2.0, temperature=2.0, detach_weight=detach_weight, kl_form=kl_form)
    mine = proreg_loss(a, t, y, **kw)
    ref = proreg_loss_reference(b, t, y, **kw)
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-5)
    mine.backward(), ref.backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)
    weights = proreg_loss(s, t, y, return_stats=True, **kw)[1].weight
    assert 0.05 < weights.mean() < 0.95  # the test exercises both terms


@needs_kernels
@pytest.mark.parametrize("with_labels", [False, True])
def test_promptsrc_drop_in(with_labels):
    """promptsrc_logit_loss equals F.kl_div(..., log_target=True, reduction='sum') / (B*C) (+ CE),
    with fp16 frozen logits as PromptSRC computes them."""
    s, t, y = make_logits(4, 37, seed=9, scale=10.0, teacher_dtype=torch.float16)
    labels = y if with_labels else None
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    mine, ref = promptsrc_logit_loss(a, t, labels), promptsrc_logit_loss_reference(b, t, labels)
    torch.testing.assert_close(mine, ref, atol=1e-6, rtol=1e-5)
    mine.backward(), ref.backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-7, rtol=1e-5)


@needs_kernels
def test_errors():
    s, t, y = make_logits(3, 10, seed=10)
    other = torch.device("meta") if DEV.type == "cpu" else torch.device("cpu")
    cases = [
        (lambda: fused_kl_ce(s[0], t[0], y), ValueError, "2-D"),
        (lambda: fused_kl_ce(s, t[:, :9], y), ValueError, "differ in shape"),
        (lambda: fused_kl_ce(s.double(), t, y), TypeError, "float32, float16 or bfloat16"),
        (lambda: fused_kl_ce(s, t.to(other), y), ValueError, "teacher on"),
        (lambda: fused_kl_ce(s, t, y.to(other)), ValueError, "labels on"),
        (lambda: fused_kl_ce(s, t, y.float()), TypeError, "integer"),
        (lambda: fused_kl_ce(s, t, y[:2]), ValueError, "shape"),
        (lambda: fused_kl_ce(s, t, torch.tensor([0, 10, 1], device=DEV)), ValueError, r"\[0, 10\)"),
        (lambda: proreg_loss(s, t, torch.tensor([0, -1, 1], device=DEV), alpha=1.0), ValueError,
         r"\[0, 10\)"),
        (lambda: proreg_loss(s, t, None, alpha=1.0), ValueError, "labels are needed"),
        (lambda: fused_kl_ce(s, t, y, temperature=float("nan")), ValueError, "finite"),
        (lambda: fused_kl_ce(s, t, y, temperature=float("inf")), ValueError, "finite"),
        (lambda: fused_kl_ce(s, t, y, temperature=0.0), ValueError, "> 0"),
        (lambda: proreg_loss(s, t, y, alpha=float("nan")), ValueError, "alpha"),
        (lambda: fused_kl_ce(s, t.requires_grad_(), y), ValueError, "teacher.detach"),
        (lambda: fused_kl_ce(s, t.detach(), y, kl_form="js"), ValueError, "kl_form"),
        (lambda: fused_kl_ce(s, t.detach(), y, block=24), ValueError, "power of two"),
        (lambda: fused_kl_ce(s[:0], t.detach()[:0], y[:0]), ValueError, "non-empty"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


def test_importable_without_triton():
    """With triton missing, kernels still imports, says so, and the references work."""
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None\n"
        "import torch, kernels\n"
        "assert kernels.HAS_TRITON is False and not kernels.kernel_available('cpu')\n"
        "s = torch.randn(2, 5); y = torch.tensor([1, 2])\n"
        "kernels.proreg_loss_reference(s, s.flip(1), y, alpha=1.0)\n"
        "try:\n    kernels.proreg_loss(s, s.flip(1), y, alpha=1.0)\n"
        "except RuntimeError as e:\n    assert 'triton is not installed' in str(e)\n"
        "else:\n    raise SystemExit('no error')\n")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr


# ------------------------------------------------------------------------------------------------
# GPA
# ------------------------------------------------------------------------------------------------
def test_gpa_weights_promptsrc_base_to_novel():
    w = gpa_weights(20, mu=15, sigma=1)
    assert math.isclose(sum(w), 1.0, rel_tol=1e-12)
    assert [round(v, 3) for v in w[12:17]] == [0.054, 0.242, 0.399, 0.242, 0.054]


@needs_kernels
@settings(max_examples=25)
@given(shapes=st.lists(st.lists(st.integers(1, 9), min_size=1, max_size=3), min_size=1, max_size=5),
       dtypes=st.lists(st.sampled_from(list(DTYPES)), min_size=5, max_size=5),
       n_epochs=st.integers(1, 8), mu=st.floats(0.0, 10.0), sigma=st.floats(0.3, 10.0),
       block=st.sampled_from([16, 64, 1024]), seed=st.integers(0, 2**31 - 1))
def test_gpa_matches_references(shapes, dtypes, n_epochs, mu, sigma, block, seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(DTYPES[d]).to(DEV) for s, d in zip(shapes, dtypes)]
    gpa = GaussianPromptAverage(params, n_epochs, mu, sigma, block=block)
    ref = [torch.zeros(p.shape, device=DEV) for p in params]
    history = []
    for epoch in range(1, n_epochs + 1):
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g).to(p.dtype))
        history.append([p.clone() for p in params])
        factor = gpa.update(epoch, params)
        gpa_update_reference(ref, params, factor)
        for a, r in zip(gpa.averages, ref):
            torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-6)
    # at the end: PromptSRC's sum form sum_e g_e theta_e
    for a, r in zip(gpa.averages, gpa_sum_reference(history, gpa.weights)):
        torch.testing.assert_close(a.double().cpu(), r, atol=1e-5, rtol=1e-5)
    gpa.copy_to(params)
    for p, a in zip(params, gpa.averages):
        assert torch.equal(p, a.to(p.dtype))


@needs_kernels
def test_gpa_one_launch_follows_moved_storage_and_errors():
    params = [torch.randn(3, 4, device=DEV), torch.randn(5, device=DEV).half()]
    gpa = GaussianPromptAverage(params, n_epochs=3, mu=2, sigma=1)
    gpa.update(1, params)
    moved = [torch.randn(3, 4, device=DEV), params[1].clone()]   # new storage, e.g. after .to()
    gpa.update(2, moved)
    ref = [params[0].float().clone(), params[1].float().clone()]
    gpa_update_reference(ref, moved, gpa.weights[1] / (gpa.weights[0] + gpa.weights[1]))
    for a, r in zip(gpa.averages, ref):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="epoch"):
        gpa.update(4, params)
    with pytest.raises(ValueError, match="shape"):
        gpa.update(3, [params[0]])
    with pytest.raises(TypeError, match="dtype"):
        gpa.update(3, [params[0].double(), params[1]])
    with pytest.raises(ValueError, match="contiguous"):
        gpa.update(3, [params[0].t(), params[1]])
    with pytest.raises(ValueError, match="sigma"):
        GaussianPromptAverage(params, n_epochs=3, mu=2, sigma=0.0)
    with pytest.raises(ValueError, match="factor"):
        gpa_update_(gpa.flat, params, float("nan"))
    with pytest.raises(ValueError, match="elements"):
        gpa_update_(gpa.flat[:-1], params, 0.5)
