"""`python -m world pretrain` (the tiny CLIP's pretraining; its defaults made the shipped checkpoint),
`python -m world zero-shot` (the zero-shot table of world/README.md) and `python -m world prompts`
(the untrained-prompt check of world/README.md), `python -m world export-folder DIR` (the task's images
as a folder of class folders, for --dataset DIR). Run from the folder that holds data.py and world/."""
import argparse
import sys
from pathlib import Path

from PIL import Image

from world.shapes import (WORLD_DEFAULT_STYLE, WORLD_STYLES, world_classname, world_combo_split, world_images,
                          world_task_classes)
from world.tiny_clip import (TINY_CHECKPOINT, load_tiny_clip, world_pretrain, world_prompt_sensitivity,
                             world_zero_shot)


def _cmd_zero_shot(argv) -> None:
    parser = argparse.ArgumentParser(prog="python -m world zero-shot", description=(
        "Zero-shot accuracy of the tiny CLIP per class set and rendering style of the offline world "
        "(template 'a photo of a {}.', each set classified among its own names)."))
    parser.add_argument("--checkpoint", default=str(TINY_CHECKPOINT), help="tiny CLIP checkpoint")
    parser.add_argument("--per-class", type=int, default=100, help="test images per class (default 100)")
    args = parser.parse_args(argv)
    model = load_tiny_clip(args.checkpoint)
    task, (seen, heldout) = world_task_classes(), world_combo_split()
    half = len(task) // 2
    sets = {f"task base ({half})": task[:half], f"task new ({len(task) - half})": task[half:],
            f"pretraining pairs ({len(seen)})": seen, f"held-out pairs ({len(heldout)})": heldout}
    print("| class set | chance | " + " | ".join(WORLD_STYLES) + " |")
    print("|---|---:|" + "---:|" * len(WORLD_STYLES))
    for name, pairs in sets.items():
        accs = [100 * world_zero_shot(model, pairs, style, args.per_class) for style in WORLD_STYLES]
        print(f"| {name} | {100 / len(pairs):.1f} | " + " | ".join(f"{a:.1f}" for a in accs) + " |")


def _cmd_pretrain(argv) -> None:
    parser = argparse.ArgumentParser(prog="python -m world pretrain", description=(
        "Pretrain the offline world's tiny CLIP (contrastive, clean photos of 48 colour-shape pairs). "
        "The shipped world/tiny_clip_shapes.pt is this command with its defaults."))
    parser.add_argument("--steps", type=int, default=1500, help="optimiser steps (default 1500; shape is learnt after ~500)")
    parser.add_argument("--batch-size", type=int, default=128, help="images (and captions) per step (default 128)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the rendered data (default 0)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads; bit-identical results need the same count (default 1)")
    parser.add_argument("--log-every", type=int, default=100, help="print and record the loss every N steps (default 100)")
    parser.add_argument("--check-per-class", type=int, default=50, help="fresh images per pair in the final zero-shot check (default 50)")
    parser.add_argument("--out", default=str(TINY_CHECKPOINT), help=f"checkpoint path, written atomically (default {TINY_CHECKPOINT})")
    args = parser.parse_args(argv)
    world_pretrain(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                   out=args.out, threads=args.threads, log_every=args.log_every,
                   check_per_class=args.check_per_class)


def _cmd_prompts(argv) -> None:
    parser = argparse.ArgumentParser(prog="python -m world prompts", description=(
        "How much untrained deep vision prompts (N(0, 0.02^2), appended before ln_pre and replaced before "
        "every block, as PromptSRC starts) move zero-shot accuracy on the 'shapes' task's test set."))
    parser.add_argument("--checkpoint", default=str(TINY_CHECKPOINT), help="tiny CLIP checkpoint")
    parser.add_argument("--n-prompts", type=int, default=4, help="prompt tokens per layer (default 4)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="prompt draws (default 1 2 3)")
    args = parser.parse_args(argv)
    result = world_prompt_sensitivity(load_tiny_clip(args.checkpoint), args.n_prompts, tuple(args.seeds))
    print(f"| prompts | seed | base | new | change base | change new |\n|---|---|---:|---:|---:|---:|")
    print(f"| none | - | {100 * result['base']:.2f} | {100 * result['new']:.2f} | | |")
    for seed, acc in result["prompted"].items():
        print(f"| {args.n_prompts} | {seed} | {100 * acc['base']:.2f} | {100 * acc['new']:.2f} | "
              f"{100 * (acc['base'] - result['base']):+.2f} | {100 * (acc['new'] - result['new']):+.2f} |")


def _cmd_export_folder(argv) -> None:
    parser = argparse.ArgumentParser(prog="python -m world export-folder", description=(
        "Write images of the 'shapes' task's 24 classes as PNG files in class folders (DIR/red_star/0000.png "
        "...): a folder of your own images as --dataset DIR takes it."))
    parser.add_argument("dir", help="the folder to create (must not exist)")
    parser.add_argument("--per-class", type=int, default=40, help="images per class (default 40)")
    parser.add_argument("--style", default=WORLD_DEFAULT_STYLE, choices=WORLD_STYLES, help="rendering style")
    args = parser.parse_args(argv)
    out = Path(args.dir)
    if out.exists() or args.per_class < 1:
        sys.exit(f"error: {out} exists (give a new folder)" if out.exists() else "error: --per-class must be >= 1")
    pairs = world_task_classes()
    images, labels = world_images(pairs, args.per_class, args.style, 0, "export")
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        folder = out / world_classname(*pairs[label]).replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i % args.per_class:04d}.png")
    print(f"wrote {len(images)} images of {len(pairs)} classes to {out}")


COMMANDS = {"pretrain": _cmd_pretrain, "zero-shot": _cmd_zero_shot, "prompts": _cmd_prompts,
            "export-folder": _cmd_export_folder}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        sys.exit(f"usage: python -m world {{{','.join(COMMANDS)}}} ...")
    COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    main()
