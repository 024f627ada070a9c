"""Loader benchmark: training images per second delivered to the step by today's DataLoader and by
data.train_batches, in one run on the same folder and the same few-shot items.

    python3 kernels/bench.py loader --root ~/timing   # writes a Caltech101-layout folder if absent
    python3 kernels/bench.py loader --root ~/timing --shots 16 --batch-size 32 --device cpu

DataLoader: data.make_loader(items, ..., train=True, ...) in `--workers` processes (PIL decode,
RandomResizedCrop, flip, ToTensor, Normalize of every image in every epoch), batches moved to the
device. train_batches: the images decoded once, kept on the device as uint8 and augmented there with
tensor ops. The first epoch (worker start-up; train_batches' decoding) is reported apart from the
steady state (the median of the later epochs). An image counts once its batch is on the device
(synchronised on CUDA at the end of each epoch). No model: the loaders read only the backbone's
input size and normalisation, so a stub backbone stands in for ViT-B/16 (--image-size 224)."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
from kernels.bench_steps import write_caltech_layout  # noqa: E402


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True, metavar="DIR",
                   help="a dataset root holding caltech-101/ (written when absent with 85 "
                        "random-pixel 300x200 JPEGs a class, as `bench.py steps --caltech-layout`)")
    p.add_argument("--shots", type=int, default=16, help="training images per class")
    p.add_argument("--classes", default="base", choices=["base", "all"],
                   help="Caltech101's 50 base classes (base-to-new) or all 100")
    p.add_argument("--batch-size", type=int, default=32, help="CoOp's batch")
    p.add_argument("--image-size", type=int, default=224,
                   help="the backbone's input size (ViT-B/16: 224)")
    p.add_argument("--epochs", type=int, default=4,
                   help="epochs per loader (the first is reported apart)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="DataLoader processes and train_batches' decoding threads "
                        "(the method files' default)")
    p.add_argument("--device", default=None, help="default cuda if available, else cpu")
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loader(make, epochs, device):
    """(seconds of construction + first epoch, [seconds of each later epoch], images per epoch)."""
    start = time.perf_counter()
    batches = make()
    times, count = [], 0
    for _ in range(epochs):
        count = sum(len(labels) for _, labels in batches)
        sync(device)
        times.append(time.perf_counter() - start)
        start = time.perf_counter()
    return times[0], times[1:], count


def main(argv):
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not (Path(args.root).expanduser() / "caltech-101").exists():
        write_caltech_layout(args.root)
    benchmark = data.load_dataset("caltech101", Path(args.root).expanduser())
    items, names = data.subsample_classes(benchmark.train, benchmark.classnames, args.classes)
    items = data.fewshot(items, args.shots, seed=1)
    backbone = data.Backbone(model=None, tokenize=None, name="stub", pretrained=None,
                             image_size=args.image_size, mean=data.CLIP_MEAN, std=data.CLIP_STD)
    loaders = {
        "DataLoader (make_loader)": lambda: data.DeviceLoader(data.make_loader(
            items, benchmark, backbone, True, args.batch_size, 1, args.workers), device),
        "train_batches": lambda: data.train_batches(
            items, benchmark, backbone, args.batch_size, 1, args.workers, device),
    }
    print(f"{len(items)} images ({args.shots} shots x {len(names)} classes of {args.root}), "
          f"batch {args.batch_size}, {args.image_size}x{args.image_size}, device {device}, "
          f"{args.workers} workers, {torch.get_num_threads()} torch threads, {args.epochs} epochs "
          f"per loader")
    print(f"{'loader':<26} | {'first epoch s':>13} {'img/s':>7} | "
          f"{'later epoch s':>13} {'img/s':>7}")
    rates = {}
    for name, make in loaders.items():
        first, later, count = time_loader(make, args.epochs, device)
        steady = statistics.median(later)
        rates[name] = (count / first, count / steady)
        print(f"{name:<26} | {first:>13.2f} {count / first:>7.0f} | {steady:>13.2f} "
              f"{count / steady:>7.0f}", flush=True)
    (old_first, old_steady), (new_first, new_steady) = rates.values()
    print(f"train_batches / DataLoader: first epoch {new_first / old_first:.2f}x, "
          f"steady state {new_steady / old_steady:.2f}x")
    return rates


if __name__ == "__main__":
    main(sys.argv[1:])
