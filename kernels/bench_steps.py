"""Training-step benchmark of a method file: one batch, timed in one run on one device.

    python3 kernels/bench.py steps                           # CoOp b32 + CoCoOp b1, ViT-B-16, 50 classes
    python3 kernels/bench.py steps --method coop --model tiny --pretrained shapes --classes world
    python3 kernels/bench.py steps --method coop,promptsrc --batch-size 4   # PromptSRC against CoOp, same batch
    python3 kernels/bench.py steps --caltech-layout ~/timing  # write a Caltech101-layout folder (timing)
    python3 kernels/bench.py steps --method vprompt,vprompt-conditional   # vprompt.py's steps beside coop.py's

Variants, all on the same batch and the same starting prompts:
  official  the official compute pattern: the whole model in fp16 (prompts too), the text encoder
            over all 77 positions, the image features recomputed each step, loss.item() each step
            (Dassl's per-step summary); CUDA only.
  full      this file's eager step without truncation (--no-truncate).
  eager     this file's eager step (bf16 autocast on CUDA, truncated text pass).
  captured  the eager step recorded once as a CUDA graph and replayed (CapturedStep); CUDA only.
Also, on CUDA: the summed GPU kernel time of one step (torch.profiler) and the kernel count, and the
losses of 20 eager and 20 captured steps from the same start on 20 different batches (they must
agree to bf16 rounding). Step times are medians over repeats; ratios are against `official` (CUDA)
or `full` (CPU) measured in the same run. vprompt.py's steps (standard and conditional, L samples of
the prompts per step) have no `official` variant here; beside them, coop.py's eager step of the method
they build on (CoOp, CoCoOp) at the same batch size, in the same run, and the ratio of the two."""
from __future__ import annotations

import argparse
import copy
import importlib
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import kernels  # noqa: E402

# Caltech101's first 50 classes in CoOp's label order (its split file sorts the folder names, so the
# capitalised Faces, Leopards and Motorbikes come first): the base classes of the base-to-new protocol.
CALTECH101_FOLDERS = (
    "Faces Leopards Motorbikes accordion airplanes anchor ant barrel bass beaver binocular bonsai brain "
    "brontosaurus buddha butterfly camera cannon car_side ceiling_fan cellphone chair chandelier cougar_body "
    "cougar_face crab crayfish crocodile crocodile_head cup dalmatian dollar_bill dolphin dragonfly "
    "electric_guitar elephant emu euphonium ewer ferry flamingo flamingo_head garfield gerenuk gramophone "
    "grand_piano hawksbill headphone hedgehog helicopter ibis inline_skate joshua_tree kangaroo ketch lamp "
    "laptop llama lobster lotus mandolin mayfly menorah metronome minaret nautilus octopus okapi pagoda "
    "panda pigeon pizza platypus pyramid revolver rhino rooster saxophone schooner scissors scorpion "
    "sea_horse snoopy soccer_ball stapler starfish stegosaurus stop_sign strawberry sunflower tick "
    "trilobite umbrella watch water_lilly wheelchair wild_cat windsor_chair wrench yin_yang").split()
CALTECH101_RENAMES = {"Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike", "airplanes": "airplane"}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="coop,cocoop", help="comma-separated: coop (batch 32), cocoop (batch 1), "
                   "vprompt, vprompt-conditional (batch 1), promptsrc (batch 4)")
    p.add_argument("--model", default="ViT-B-16", help="open_clip model (weights do not change the timing)")
    p.add_argument("--pretrained", default="none", help="open_clip tag, or 'none' for random weights")
    p.add_argument("--classes", default="caltech101", choices=["caltech101", "world"],
                   help="class names: Caltech101's 50 base classes, or the world's 12 base classes")
    p.add_argument("--batch-size", type=int, default=None, help="default: the method's paper batch")
    p.add_argument("--ctx-init", default="a photo of a", help="as in coop.py ('' with --n-ctx for random)")
    p.add_argument("--n-ctx", type=int, default=4, help="as in coop.py")
    p.add_argument("--samples", type=int, default=None,
                   help="vprompt: L, the samples per step (default: vprompt.py's for the dataset)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=3, help="repeats per variant (median reported)")
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    p.add_argument("--caltech-layout", default=None, metavar="DIR",
                   help="instead: write DIR/caltech-101/101_ObjectCategories/ with Caltech101's 102 folder names "
                        "and 85 random-pixel JPEGs each (for timing whole runs; the pixels mean nothing)")
    return p.parse_args(argv)


def class_names(which):
    if which == "world":
        benchmark = data.load_dataset("shapes", None)
        return data.subsample_classes(benchmark.test, benchmark.classnames, "base")[1]
    return [CALTECH101_RENAMES.get(f, f) for f in CALTECH101_FOLDERS[:50]]


# method -> (method file, its flags): the benchmark builds each step only through what the method
# file's own main uses (parse_args, resolve_settings, build, train_step), with its paper settings.
METHODS = {"coop": ("coop", []), "cocoop": ("coop", ["--conditional"]), "promptsrc": ("promptsrc", []),
           "vprompt": ("vprompt", []), "vprompt-conditional": ("vprompt", ["--conditional"])}
# the coop.py step another method's step is set against (same batch, same run)
BUILDS_ON = {"vprompt": "coop", "vprompt-conditional": "cocoop", "promptsrc": "coop"}


def settings(method, backbone, args, truncate=True):
    """The method file's resolved settings for `method` (its paper defaults on the benchmark's dataset)."""
    name, flags = METHODS[method]
    module = importlib.import_module(name)
    argv = [*flags, "--dataset", "shapes" if args.classes == "world" else "caltech101",
            "--model", backbone.name, "--pretrained", str(backbone.pretrained or "none"),
            "--ctx-init", args.ctx_init, *([] if truncate else ["--no-truncate"])]
    argv += ["--n-ctx-text" if name == "promptsrc" else "--n-ctx", str(args.n_ctx)]
    if name == "vprompt" and args.samples:
        argv += ["--samples", str(args.samples)]
    return module, module.resolve_settings(module.parse_args(argv))


def build(method, backbone, names, args, device, truncate=True):
    """(method file, model, optimiser, settings) as the method file's main builds them."""
    module, resolved = settings(method, backbone, args, truncate)
    torch.manual_seed(0)
    model, optimizer = module.build(backbone, names, resolved, device)
    return module, model, optimizer, resolved


def official_step(model, optimizer, x, y):
    """The official pattern: fp16 weights and prompts (fp16 autocast only reconciles the fp32 feature
    normalisation of the shared model code with the fp16 weights), a host sync per step."""
    with torch.autocast("cuda", dtype=torch.float16):
        logits = model(x.half())
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, batch, device, steps, repeats):
    """Median seconds per step over `repeats` runs of `steps` steps (after 3 warm-up steps)."""
    for _ in range(3):
        step(*batch)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step(*batch)
        sync(device)
        times.append((time.perf_counter() - start) / steps)
    return sorted(times)[len(times) // 2]


def kernel_time(step, batch, device):
    """(summed GPU kernel time in s, kernel count) of one step, from torch.profiler over 5 steps."""
    from torch.profiler import ProfilerActivity, profile
    step(*batch)
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            step(*batch)
        sync(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.device_time for e in kernels)
    return total_us / 5 / 1e6, len(kernels) / 5


def bench_method(backbone, names, method, args, device):
    module, model, optimizer, resolved = build(method, backbone, names, args, device, truncate=False)
    batch_size = args.batch_size or resolved.batch_size  # default: the method's paper batch
    size = backbone.image_size
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch_size, 3, size, size, generator=gen).to(device),
                torch.randint(0, len(names), (batch_size,), generator=gen).to(device)) for _ in range(20)]
    rows = {}

    def run(model, optimizer):
        return lambda x, y: module.train_step(model, optimizer, x, y)

    rows["full"] = time_steps(run(model, optimizer), batches[0], device, args.steps, args.repeats)
    _, model, optimizer, _ = build(method, backbone, names, args, device)
    rows["eager"] = time_steps(run(model, optimizer), batches[0], device, args.steps, args.repeats)
    out = {"method": method, "batch": batch_size, "classes": len(names)}
    if method in BUILDS_ON:  # coop.py's step of the method this one builds on, same batch, same run
        base, model_b, optimizer_b, _ = build(BUILDS_ON[method], backbone, names, args, device)
        out["builds_on"] = BUILDS_ON[method], time_steps(lambda x, y: base.train_step(model_b, optimizer_b, x, y),
                                                         batches[0], device, args.steps, args.repeats)
    if device.type == "cuda":
        out["kernel_s"], out["kernels"] = kernel_time(run(model, optimizer), batches[0], device)
        _, model, optimizer, _ = build(method, backbone, names, args, device)
        captured = kernels.CapturedStep(module.train_step, model, optimizer)
        rows["captured"] = time_steps(captured, batches[0], device, args.steps, args.repeats)
        out["captured_kernel_s"], _ = kernel_time(captured, batches[0], device)
    if device.type == "cuda" and not method.startswith("vprompt"):  # vprompt's draws differ between the two
        # the same 20 steps, eager and captured, from the same start
        losses = {}
        for name in ("eager", "captured"):
            _, model, optimizer, _ = build(method, backbone, names, args, device)
            step = run(model, optimizer) if name == "eager" else kernels.CapturedStep(module.train_step, model,
                                                                                      optimizer)
            losses[name] = torch.stack([step(x, y)[0]["loss"] for x, y in batches]).float().cpu()
        out["loss_max_diff"] = float((losses["eager"] - losses["captured"]).abs().max())
        out["losses"] = losses["eager"].tolist(), losses["captured"].tolist()
    if device.type == "cuda" and method in ("coop", "cocoop"):  # the only methods with an official pattern here
        # the official pattern: a separate fp16 copy of CLIP (prompts in fp16 too), all 77 positions
        fp16 = data.Backbone(**{**backbone.__dict__, "model": copy.deepcopy(backbone.model).half()})
        _, model, optimizer, _ = build(method, fp16, names, args, device, truncate=False)
        model.half()
        rows["official"] = time_steps(lambda x, y: official_step(model, optimizer, x, y), batches[0], device,
                                      args.steps, args.repeats)
        out["official_kernel_s"], out["official_kernels"] = kernel_time(
            lambda x, y: official_step(model, optimizer, x, y), batches[0], device)
        del fp16, model
    out["times"] = rows
    return out


def print_table(results, device):
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    baseline = "official" if device.type == "cuda" else "full"
    print(f"\ndevice: {name}, torch {torch.__version__}; median ms per training step, ratio = {baseline} / variant "
          "(full / variant where a method has no official pattern here)")
    head = f"{'method':>19} {'batch':>5} {'cls':>4} | " + " | ".join(
        f"{v:>17}" for v in ("official", "full", "eager", "captured"))
    print(head + " | kernel ms (count); then coop.py's eager step the method builds on, and method / coop")
    for r in results:
        base = r["times"].get(baseline) or r["times"]["full"]
        cells = []
        for v in ("official", "full", "eager", "captured"):
            t = r["times"].get(v)
            cells.append(f"{'-':>17}" if not t else f"{1e3 * t:8.2f} ({base / t:5.2f}x)" if base else f"{1e3 * t:17.2f}")
        kernel = ""
        if "kernel_s" in r:
            kernel = (f" | eager {1e3 * r['kernel_s']:.2f} ({r['kernels']:.0f}), captured {1e3 * r['captured_kernel_s']:.2f};"
                      f" captured/kernel {r['times']['captured'] / r['kernel_s']:.2f}x")
        if "official_kernel_s" in r:
            kernel += f"; official {1e3 * r['official_kernel_s']:.2f} ({r['official_kernels']:.0f})"
        if "loss_max_diff" in r:
            kernel += f"; 20-step loss max |eager - captured| {r['loss_max_diff']:.2e}"
        if "builds_on" in r:
            other, t = r["builds_on"]
            kernel += f" | {other} eager {1e3 * t:.2f} ms, {r['method']} / {other} {r['times']['eager'] / t:.2f}x"
        print(f"{r['method']:>19} {r['batch']:>5} {r['classes']:>4} | " + " | ".join(cells) + kernel)


def write_caltech_layout(root):
    """Caltech101's folders with 85 smooth random-colour JPEGs of 300x200 each (timing only)."""
    from PIL import Image
    rng = random.Random(0)
    for folder in ["BACKGROUND_Google", "Faces_easy"] + list(CALTECH101_FOLDERS):
        path = Path(root).expanduser() / "caltech-101" / "101_ObjectCategories" / folder
        path.mkdir(parents=True, exist_ok=True)
        for i in range(85):
            small = Image.new("RGB", (6, 4))
            small.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(24)])
            small.resize((300, 200), Image.BILINEAR).save(path / f"image_{i + 1:04d}.jpg", quality=90)
    print(f"wrote {root}/caltech-101/101_ObjectCategories (102 folders x 85 images)")


def main(argv):
    args = parse_args(argv)
    if args.caltech_layout:
        return write_caltech_layout(args.caltech_layout)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone = data.load_backbone(args.model, None if args.pretrained == "none" else args.pretrained, device)
    names = class_names(args.classes)
    results = [bench_method(backbone, names, m, args, device) for m in args.method.split(",")]
    print_table(results, device)
    return results
