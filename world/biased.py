"""The offline world's biased-data task ('shapes_biased'), for ProReg's claim: fine-tuning on a training
set that carries a spurious cue learns the cue, and loses accuracy where the cue is absent.

The classes are the 8 shapes ("a photo of a star."), drawn as photos (the pretraining domain, where
zero-shot CLIP names shapes well). The cue is the shape's colour: in the training and validation splits
(and the in-bias test) a shape has its class's colour with probability BIAS_ON_CUE, else one of the
other seven; in the off-bias test the colour is drawn uniformly, independent of the class. Colour is
far easier to read off an image than shape, so a fine-tuned encoder leans on it. The other rendering
styles (colours drawn uniformly too) are the shifted test sets. How the bias was chosen (measured):
world/README.md, section "The biased task".

The images come from world/shapes.py's renderer with its own generators; only the draw of the colour
differs from the other world tasks."""
from __future__ import annotations

import functools

import torch
from PIL import Image

from data import WORLD_BIASED as BIAS_TASK  # the task's name, defined once in data.py
from data import Benchmark, Item
from world.shapes import (WORLD_BACKGROUNDS, WORLD_COLOURS, WORLD_SHAPES, WORLD_SIZES, WORLD_STYLES,
                          world_generator, world_render)

BIAS_STYLE = "photo"  # the task's own style (the pretraining domain: zero-shot is strong there)
BIAS_ON_CUE = 0.99  # P(a shape has its class's colour) in the biased splits
# Per-class counts: the training split is small enough for the default run's time budget.
BIAS_SPLIT_SIZES = {"train": 72, "val": 8, "test": 100}


def bias_cue_colour(shape):
    """The colour of shape `shape`'s cue: the next colour in WORLD_COLOURS' order ((shape - colour) mod 8
    = 7: a pair that pretraining saw, so an on-cue image is never one of its held-out pairs)."""
    return (shape + 1) % len(WORLD_COLOURS)


def bias_cues(labels, n_classes, p_on_cue, gen):
    """The cue (a class index) of each image: its own class's with probability p_on_cue, else one of the
    other classes' uniformly; p_on_cue=None draws it uniformly over all classes (no bias)."""
    if p_on_cue is None:
        return torch.randint(0, n_classes, labels.shape, generator=gen)
    other = (labels + torch.randint(1, n_classes, labels.shape, generator=gen)) % n_classes
    return torch.where(torch.rand(labels.shape, generator=gen) < p_on_cue, labels, other)


def bias_images(per_class, style, seed, split, p_on_cue):
    """`per_class` images of every shape, coloured by cue -> (uint8 [N, 3, H, W], labels [N], cues [N])."""
    gen = world_generator(seed, split, style, BIAS_TASK)
    labels = torch.arange(len(WORLD_SHAPES)).repeat_interleave(per_class)  # label = shape index
    cues = bias_cues(labels, len(WORLD_SHAPES), p_on_cue, gen)
    size = torch.randint(0, len(WORLD_SIZES), labels.shape, generator=gen)
    background = torch.randint(0, len(WORLD_BACKGROUNDS), labels.shape, generator=gen)
    images, _ = world_render(bias_cue_colour(cues), labels, size, background, style, gen)
    return images, labels, cues


@functools.lru_cache(maxsize=2)
def biased_benchmark(name=BIAS_TASK, seed=0):
    """'shapes_biased': train/val/test (in-bias) with P(own cue) = BIAS_ON_CUE; shifts: 'offbias' (the
    colour independent of the class) and the other styles, also without bias. The cue of every item is
    kept in benchmark.cues ({split: [N] long}) for the tests that check the bias."""
    if name != BIAS_TASK:
        raise ValueError(f"unknown biased world dataset {name!r}; the biased task is {BIAS_TASK!r}")
    classnames = list(WORLD_SHAPES)
    pools, cues, count = [], {}, 0

    def render(split, size_of, style, p_on_cue):
        nonlocal count
        images, labels, cue = bias_images(BIAS_SPLIT_SIZES[size_of], style, seed, split, p_on_cue)
        pools.append(images)
        cues[split] = cue
        items = [Item(count + i, label, classnames[label]) for i, label in enumerate(labels.tolist())]
        count += len(items)
        return items

    train = render("train", "train", BIAS_STYLE, BIAS_ON_CUE)
    val = render("val", "val", BIAS_STYLE, BIAS_ON_CUE)
    test = render("test", "test", BIAS_STYLE, BIAS_ON_CUE)
    shifts = {"offbias": render("offbias", "test", BIAS_STYLE, None)}
    shifts.update({style: render(style, "test", style, None) for style in WORLD_STYLES if style != BIAS_STYLE})
    pool = torch.cat(pools)  # [N, 3, H, W] uint8; an item's source is its row

    def open_image(index):
        return Image.fromarray(pool[index].permute(1, 2, 0).numpy())

    benchmark = Benchmark(name=name, classnames=classnames, train=train, val=val, test=test,
                          template="a photo of a {}.", shifts=shifts, open_image=open_image, augment=False)
    benchmark.cues = cues
    return benchmark
