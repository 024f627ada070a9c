"""Benchmark of the fused CE+KL loss: forward + backward, Triton kernel vs eager PyTorch and
torch.compile of the readable reference.

    python3 kernels/bench.py                                  # ProReg loss, fp32, T = 1, full grid
    python3 kernels/bench.py --dtype bf16 --temperature 2 --mode promptsrc
    python3 kernels/bench.py steps ...                        # a method file's training step (bench_steps.py)
    python3 kernels/bench.py loader --root DIR                # training images/s: DataLoader vs
                                                              # data.train_batches (bench_loader.py)

On CUDA: triton.testing.do_bench (median ms) per (B, C); GB/s counts the least traffic a fused loss
must move (read student and teacher, write the student gradient, read labels) and is set against the
device's copy bandwidth measured here (a 1 GiB device-to-device copy). On CPU: says so and times
eager vs compile of the reference only (the Triton kernels run on CPU only in the interpreter)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kernels import (proreg_loss, proreg_loss_reference, promptsrc_logit_loss,  # noqa: E402
                     promptsrc_logit_loss_reference)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--B", default="32,256,1024", help="batch sizes, comma-separated")
    p.add_argument("--C", default="10,100,1000,32000", help="class counts, comma-separated")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="dtype of both logit tensors")
    p.add_argument("--mode", default="proreg", choices=["proreg", "promptsrc"],
                   help="proreg: adaptive-weight loss (alpha=1); promptsrc: CE + KL/(B*C) at T=1")
    p.add_argument("--temperature", type=float, default=1.0, help="KL temperature (proreg mode)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--pass2-variants", action="store_true",
                   help="with --cuda-graph: time each pass-2 order and eviction-hint variant "
                        "(kl_ce.PASS2_ORDER)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="time fused and eager inside a CUDA graph (device time, without host launch cost)")
    return p.parse_args()


def losses(mode, T):
    """(fused, reference) loss functions of (student, teacher, labels)."""
    if mode == "proreg":
        # check_labels=False: the default range check costs one host sync per call on CUDA
        return (lambda s, t, y: proreg_loss(s, t, y, alpha=1.0, temperature=T, check_labels=False),
                lambda s, t, y: proreg_loss_reference(s, t, y, alpha=1.0, temperature=T))
    return (lambda s, t, y: promptsrc_logit_loss(s, t, y, check_labels=False),
            promptsrc_logit_loss_reference)


def fwd_bwd(loss_fn, s, t, y):
    def step():
        return torch.autograd.grad(loss_fn(s, t, y), s)[0]
    return step


def copy_bandwidth_gbs():
    import triton.testing
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200)
    return 2 * src.numel() * 4 / ms / 1e6


def main(args):
    dtype = DTYPES[args.dtype]
    Bs = [int(b) for b in args.B.split(",")]
    Cs = [int(c) for c in args.C.split(",")]
    fused, ref = losses(args.mode, args.temperature)
    torch._dynamo.config.cache_size_limit = 64  # one static graph per shape
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    compiled = None if args.no_compile else torch.compile(ref, dynamic=False)
    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}, mode={args.mode}, dtype={args.dtype}, T={args.temperature}")
    if not cuda:
        print("No CUDA device: timing eager vs torch.compile of the PyTorch reference only "
              "(forward + backward, CPU, median of repeats); the Triton kernels are not timed.")
        cpu_bench(Bs, Cs, dtype, ref, compiled)
        return
    import triton
    import triton.testing
    from kernels.kl_ce import _kl_ce_kernel_tuned
    bw = copy_bandwidth_gbs()
    if args.cuda_graph and args.pass2_variants:
        import kernels.kl_ce as kl_ce
        tuner = kl_ce._kl_ce_kernel_tuned  # the configs that won at C = 32000 before, to keep tuning short
        tuner.configs = [c for c in tuner.configs if c.kwargs["BLOCK"] in (4096, 8192) and c.num_warps >= 8]
        for rev in (False, True):
            for ev in (("", ""), ("evict_last", "evict_first")):
                kl_ce.PASS2_ORDER = dict(REVERSE=rev, EVICT1=ev[0], EVICT2=ev[1])
                kl_ce._TUNED.clear()
                kl_ce._kl_ce_kernel_tuned.cache.clear()  # tune each variant afresh
                print(f"PASS2_ORDER = {kl_ce.PASS2_ORDER}")
                graph_bench(Bs, Cs, dtype, fused, ref, bw)
        return
    if args.cuda_graph:
        graph_bench(Bs, Cs, dtype, fused, ref, bw)
        return
    print(f"device: {torch.cuda.get_device_name()}, triton {triton.__version__}, "
          f"measured copy bandwidth {bw:.0f} GB/s")
    head = (f"{'B':>5} {'C':>6} | {'fused ms':>9} {'eager ms':>9} {'compile ms':>10} | {'x eager':>7} "
            f"{'x compile':>9} | {'GB/s':>6} {'% copy':>6} | {'max |dgrad|':>11} config")
    print(head)
    print("-" * len(head))
    for B in Bs:
        for C in Cs:
            s, t, y = _inputs(B, C, dtype)
            step = fwd_bwd(fused, s, t, y)
            err = (step().float() - fwd_bwd(ref, s, t, y)().float()).abs().max().item()
            ms = triton.testing.do_bench(step, warmup=25, rep=100)
            ms_eager = triton.testing.do_bench(fwd_bwd(ref, s, t, y), warmup=25, rep=100)
            if compiled is not None:
                c_step = fwd_bwd(compiled, s, t, y)
                c_step()  # compile outside the timing
                ms_comp = triton.testing.do_bench(c_step, warmup=25, rep=100)
            else:
                ms_comp = float("nan")
            nbytes = B * C * (2 * s.element_size() + t.element_size()) + B * y.element_size()
            gbs = nbytes / ms / 1e6
            cfg = _kl_ce_kernel_tuned.best_config
            cfg = f"BLOCK={cfg.kwargs['BLOCK']} warps={cfg.num_warps}" if cfg is not None else "?"
            print(f"{B:>5} {C:>6} | {ms:>9.4f} {ms_eager:>9.4f} {ms_comp:>10.4f} | "
                  f"{ms_eager / ms:>7.2f} {ms_comp / ms:>9.2f} | {gbs:>6.0f} {100 * gbs / bw:>5.1f}% | "
                  f"{err:>11.2e} {cfg}", flush=True)


def _inputs(B, C, dtype):
    """Seeded student (requires grad), teacher and labels on the GPU, logits of scale ~4."""
    g = torch.Generator(device="cuda").manual_seed(0)
    s = (torch.randn(B, C, device="cuda", generator=g) * 4).to(dtype).requires_grad_()
    t = (torch.randn(B, C, device="cuda", generator=g) * 4).to(dtype)
    return s, t, torch.randint(0, C, (B,), device="cuda", generator=g)


def graph_bench(Bs, Cs, dtype, fused, ref, bw):
    import triton.testing
    print("fwd+bwd steps captured in one CUDA graph and replayed (triton.testing.do_bench_cudagraph, "
          "median): device time without host launch cost; no L2 flush, so small shapes run from L2")
    head = f"{'B':>5} {'C':>6} | {'fused ms':>9} {'eager ms':>9} | {'x eager':>7} | {'GB/s':>6} {'% copy':>6}"
    print(head)
    print("-" * len(head))
    for B in Bs:
        for C in Cs:
            s, t, y = _inputs(B, C, dtype)
            step, eager = fwd_bwd(fused, s, t, y), fwd_bwd(ref, s, t, y)
            step(), eager()  # tune and warm up outside the capture
            ms = triton.testing.do_bench_cudagraph(step, rep=100, return_mode="median")
            ms_eager = triton.testing.do_bench_cudagraph(eager, rep=100, return_mode="median")
            nbytes = B * C * (2 * s.element_size() + t.element_size()) + B * y.element_size()
            gbs = nbytes / ms / 1e6
            print(f"{B:>5} {C:>6} | {ms:>9.4f} {ms_eager:>9.4f} | {ms_eager / ms:>7.2f} | {gbs:>6.0f} "
                  f"{100 * gbs / bw:>5.1f}%", flush=True)


def cpu_bench(Bs, Cs, dtype, ref, compiled, repeats=5):
    def median_ms(fn):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[len(times) // 2]

    print(f"{'B':>5} {'C':>6} | {'eager ms':>9} {'compile ms':>10} | {'compile speed-up':>16}")
    for B in Bs:
        for C in Cs:
            g = torch.Generator().manual_seed(0)
            s = (torch.randn(B, C, generator=g) * 4).to(dtype).requires_grad_()
            t = (torch.randn(B, C, generator=g) * 4).to(dtype)
            y = torch.randint(0, C, (B,), generator=g)
            ms_eager = median_ms(fwd_bwd(ref, s, t, y))
            ms_comp = median_ms(fwd_bwd(compiled, s, t, y)) if compiled is not None else float("nan")
            print(f"{B:>5} {C:>6} | {ms_eager:>9.3f} {ms_comp:>10.3f} | {ms_eager / ms_comp:>16.2f}",
                  flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["steps"]:
        from kernels import bench_steps
        bench_steps.main(sys.argv[2:])
    elif sys.argv[1:2] == ["loader"]:
        from kernels import bench_loader
        bench_loader.main(sys.argv[2:])
    else:
        main(parse_args())
