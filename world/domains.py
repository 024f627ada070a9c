"""The offline world's domain-shift task ('shapes_domains'): the counterpart of DomainNet's protocol in
ProReg's paper (train on sketch, validate on sketch, test on clipart, painting and real).

The classes are the 8 shapes ("a photo of a star."); each image's colour, size and background are
drawn uniformly, independent of the class, so the shape is the only cue. Every rendering style has
its own train / val / test split; a run trains and validates on one style (--train-domain, default
DOMAINS_TRAIN_STYLE) and is tested on that style's test split (in-distribution, the record's "all")
and on the test split of each other style (out-of-distribution: benchmark.shifts, with their mean).

The default training style follows a rule fixed before any method ran on this task: DomainNet's
protocol trains on sketch, a line drawing with no fill or texture; the world's line drawing is
'outline'. The pretraining style ('photo', DomainNet's 'real') is then one of the test domains.
Why, and the sizes: world/README.md, section "The domain-shift task"."""
from __future__ import annotations

import functools

import torch
from PIL import Image

from data import WORLD_DOMAINS as DOMAINS_TASK  # the task's name, defined once in data.py
from data import Benchmark, Item, require
from world.shapes import WORLD_BACKGROUNDS, WORLD_COLOURS, WORLD_SHAPES, WORLD_SIZES, WORLD_STYLES
from world.shapes import world_generator, world_render

DOMAINS_TRAIN_STYLE = "outline"  # DomainNet trains on sketch: the world's line drawing
# Per-class counts: training as the biased task (within its time budget), a validation split twice
# its size (model selection every half epoch reads it), 100 test images per class and style.
DOMAINS_SPLIT_SIZES = {"train": 72, "val": 16, "test": 100}


def domain_images(per_class, style, seed, split):
    """`per_class` images of every shape in `style`, colour, size and background drawn uniformly
    -> (uint8 [N, 3, H, W], labels [N] = shape index, colours [N])."""
    gen = world_generator(seed, split, style, DOMAINS_TASK)  # the task's own draws
    labels = torch.arange(len(WORLD_SHAPES)).repeat_interleave(per_class)
    colour = torch.randint(0, len(WORLD_COLOURS), labels.shape, generator=gen)
    size = torch.randint(0, len(WORLD_SIZES), labels.shape, generator=gen)
    background = torch.randint(0, len(WORLD_BACKGROUNDS), labels.shape, generator=gen)
    images, _ = world_render(colour, labels, size, background, style, gen)
    return images, labels, colour


def domains_benchmark(train_style=None, test_style=None, seed=0):
    """'shapes_domains' trained on `train_style` (None: DOMAINS_TRAIN_STYLE); a wrong style is refused
    with one line naming the valid ones. The colour of every item is in benchmark.colours."""
    require(train_style in (None, *WORLD_STYLES), f"--train-domain {train_style!r} is not a style of "
            f"{DOMAINS_TASK}: one of {', '.join(WORLD_STYLES)}")
    require(test_style is None, f"--test-domain {test_style!r}: {DOMAINS_TASK} tests on every style other "
            "than --train-domain (each reported, and their mean): leave --test-domain out")
    return _benchmark(train_style or DOMAINS_TRAIN_STYLE, seed)


@functools.lru_cache(maxsize=2)
def _benchmark(style, seed):
    classnames = list(WORLD_SHAPES)
    pools, colours, count = [], {}, 0

    def render(split, size_of, split_style):
        nonlocal count
        images, labels, colour = domain_images(DOMAINS_SPLIT_SIZES[size_of], split_style, seed, size_of)
        pools.append(images)
        colours[split] = colour
        items = [Item(count + i, label, classnames[label]) for i, label in enumerate(labels.tolist())]
        count += len(items)
        return items

    train, val, test = (render(split, split, style) for split in ("train", "val", "test"))
    shifts = {other: render(other, "test", other) for other in WORLD_STYLES if other != style}
    pool = torch.cat(pools)  # [N, 3, H, W] uint8; an item's source is its row

    def open_image(index):
        return Image.fromarray(pool[index].permute(1, 2, 0).numpy())

    benchmark = Benchmark(name=DOMAINS_TASK, classnames=classnames, train=train, val=val, test=test,
                          template="a photo of a {}.", shifts=shifts, open_image=open_image,
                          augment=False, mean_of=tuple(shifts))
    benchmark.colours = colours  # each split's colours (the tests check them independent of the label)
    return benchmark
