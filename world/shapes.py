"""The offline world's images and task: a procedural shapes renderer, the pretraining captions, and
the downstream 'shapes' benchmarks (data.load_dataset reaches them through world_benchmark).

Why the world exists and how it was chosen: world/README.md. Every draw comes from a torch.Generator
seeded from a key, so the same key gives the same pixels on every run."""
from __future__ import annotations

import functools
import hashlib
import math

import torch
import torch.nn.functional as F
from PIL import Image

from data import Benchmark, Item


WORLD_SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "hexagon", "diamond")
WORLD_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "pink", "white")
WORLD_RGB = torch.tensor([  # [8, 3] the nominal colour of each name, jittered when rendered
    [0.90, 0.10, 0.10], [0.10, 0.72, 0.15], [0.15, 0.25, 0.95], [0.95, 0.88, 0.10],
    [0.58, 0.15, 0.75], [1.00, 0.55, 0.05], [1.00, 0.52, 0.76], [0.97, 0.97, 0.97]])
WORLD_SIZES = ("small", "large")
WORLD_BACKGROUNDS = ("plain", "striped", "checkered", "dotted", "gradient")
WORLD_STYLES = ("photo", "noisy", "outline", "vivid", "lowcontrast")
WORLD_DEFAULT_STYLE = "outline"  # the downstream domain of --dataset shapes
WORLD_RES = 48  # image side in pixels (World v2; v1 was 32): 144 patch tokens at the tiny CLIP's patch 4
WORLD_RIM = 0.75  # outline style: the shape minus a copy shrunk to 75 % (a rim 1/4 of its radius)

# Colour-shape pairs never rendered during pretraining: (shape - colour) mod 8 in {0, 4}. Each colour
# and each shape is held out twice, so every word is still seen.
def world_combo_split():
    """-> (seen, heldout): lists of (colour, shape) index pairs of pretraining. seen: the 24 pairs
    with (s - c) mod 8 in {1, 2, 3}, then the 24 with {5, 6, 7} (the pretraining report's two
    halves); this order fixes how the pretraining draws map to pairs, so it is part of the recipe."""
    pairs = [(c, s) for c in range(8) for s in range(8)]
    first = [p for p in pairs if (p[1] - p[0]) % 8 in (1, 2, 3)]
    second = [p for p in pairs if (p[1] - p[0]) % 8 in (5, 6, 7)]
    heldout = [p for p in pairs if (p[1] - p[0]) % 8 in (0, 4)]
    return first + second, heldout


def _shape_mask(shape, u, v):
    """Shape `shape` (index into WORLD_SHAPES) in shape-local coordinates u, v ([n, H, W], radius 1,
    v pointing up) -> [n, H, W] bool."""
    name = WORLD_SHAPES[shape]
    if name in ("triangle", "hexagon"):  # a regular k-gon: the intersection of k half-planes
        k, apothem, phase = (3, 0.5, -math.pi / 2) if name == "triangle" else (6, 0.87, 0.0)
        angles = phase + torch.arange(k) * (2 * math.pi / k)
        return (u[..., None] * torch.cos(angles) + v[..., None] * torch.sin(angles) <= apothem).all(-1)
    if name == "circle":
        return u * u + v * v <= 1.0
    if name == "square":
        return (u.abs() <= 0.8) & (v.abs() <= 0.8)
    if name == "star":  # 5 points, one pointing up: radius follows a triangle wave in the angle
        phase = ((torch.atan2(v, u) - math.pi / 2) * 5 / (2 * math.pi)) % 1.0
        return torch.sqrt(u * u + v * v) <= 0.42 + 0.58 * (1 - 2 * torch.minimum(phase, 1 - phase))
    if name == "cross":
        return ((u.abs() <= 0.3) & (v.abs() <= 0.95)) | ((v.abs() <= 0.3) & (u.abs() <= 0.95))
    if name == "heart":  # the curve (x^2 + y^2 - 1)^3 <= x^2 y^3, scaled and lifted to fit radius 1
        x, y = u * 1.25, v * 1.25 + 0.25
        return (x * x + y * y - 1) ** 3 - x * x * y ** 3 <= 0
    return u.abs() + v.abs() <= 1.0  # diamond


def _shape_masks(shape, u, v):
    """Per-image shape index [n] -> [n, H, W] float masks (each shape computed for its images only)."""
    mask = torch.zeros(u.shape)
    for s in shape.unique().tolist():
        pick = shape == s
        mask[pick] = _shape_mask(s, u[pick], v[pick]).float()
    return mask


def _hsv_to_rgb(h, s, v):  # all [n] in [0, 1] -> [n, 3]
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], -1)
    return v[:, None] - (v * s)[:, None] * torch.clamp(torch.minimum(k, 4 - k), 0, 1)


def _texture(name, x, y, along, freq):
    """Background texture in [0, 1] ([n, H, W]) from pixel coordinates, the coordinate along a
    random direction, and a random frequency."""
    if name == "plain":
        return torch.zeros_like(x)
    if name == "striped":
        return (torch.sin(along * freq * 2) > 0).float()
    if name == "gradient":
        return (along + 1) / 2
    gx, gy = (x + 1) * freq / 2, (y + 1) * freq / 2
    if name == "checkered":
        return (gx.floor() + gy.floor()) % 2
    return ((gx - gx.floor() - 0.5) ** 2 + (gy - gy.floor() - 0.5) ** 2 < 0.08).float()  # dotted


def world_render(colour, shape, size, background, style, gen, res=WORLD_RES):
    """Render one image per entry of the index tensors colour/shape/size/background ([n] long).

    Drawn at 2x resolution and average-pooled (anti-aliased). Position, rotation (+-15 deg),
    colour jitter and texture parameters come from `gen`, so a seeded generator gives the same
    pixels every time. Returns (images [n, 3, res, res] uint8, shape_mask [n, res, res] float in
    [0, 1], the fraction of each pixel covered by the shape's painted region)."""
    n, hi = colour.shape[0], 2 * res
    rnd = lambda *s: torch.rand(*s, generator=gen)
    axis = (torch.arange(hi) + 0.5) / hi * 2 - 1
    y, x = torch.meshgrid(-axis, axis, indexing="ij")  # [hi, hi]; y up
    x, y = x.expand(n, hi, hi), y.expand(n, hi, hi)

    # --- background: two dull colours mixed by a texture t in [0, 1] ---
    c1 = _hsv_to_rgb(rnd(n), 0.1 + 0.25 * rnd(n), 0.2 + 0.35 * rnd(n))
    c2 = _hsv_to_rgb(rnd(n), 0.1 + 0.25 * rnd(n), 0.2 + 0.35 * rnd(n))
    ang = (rnd(n) * math.pi)[:, None, None]
    along = x * torch.cos(ang) + y * torch.sin(ang)
    freq = (4 + 6 * rnd(n))[:, None, None]
    t = torch.zeros(n, 1, hi, hi)
    for b in background.unique().tolist():  # each texture computed for its own images only
        k = background == b
        t[k, 0] = _texture(WORLD_BACKGROUNDS[b], x[k], y[k], along[k], freq[k])
    img = c1[:, :, None, None] * (1 - t) + c2[:, :, None, None] * t
    if style == "vivid":  # unseen saturated blotches replace the dull texture
        img = torch.zeros(n, 3, hi, hi)
        for _ in range(4):
            centre = rnd(n, 2) * 2 - 1
            width = (0.3 + 0.5 * rnd(n))[:, None, None]
            blob = torch.exp(-((x - centre[:, 0, None, None]) ** 2 + (y - centre[:, 1, None, None]) ** 2) / width ** 2)
            hue = _hsv_to_rgb(rnd(n), torch.ones(n), 0.8 + 0.2 * rnd(n))
            img = img + blob[:, None] * hue[:, :, None, None]
        img = img.clamp(0, 1)

    # --- the shape ---
    radius = torch.where(size == 0, 0.3 + 0.1 * rnd(n), 0.58 + 0.15 * rnd(n))
    cx = (rnd(n) * 2 - 1) * (0.92 - radius)
    cy = (rnd(n) * 2 - 1) * (0.92 - radius)
    rot = (rnd(n) * 2 - 1) * math.radians(15)
    dx, dy = x - cx[:, None, None], y - cy[:, None, None]
    cos, sin = torch.cos(rot)[:, None, None], torch.sin(rot)[:, None, None]
    u = (dx * cos + dy * sin) / radius[:, None, None]
    v = (-dx * sin + dy * cos) / radius[:, None, None]
    mask = _shape_masks(shape, u, v)  # [n, hi, hi]
    if style == "outline":  # keep a rim: the shape minus a shrunk copy of itself
        mask = mask * (1 - _shape_masks(shape, u / WORLD_RIM, v / WORLD_RIM))
    fill = (WORLD_RGB[colour] + (rnd(n, 3) - 0.5) * 0.12).clamp(0, 1)  # [n, 3]
    img = img * (1 - mask[:, None]) + fill[:, :, None, None] * mask[:, None]

    img = F.avg_pool2d(img, 2)  # anti-alias to res
    mask = F.avg_pool2d(mask[:, None], 2)[:, 0]
    if style == "lowcontrast":
        img = 0.5 + 0.3 * (img - 0.5)
    sigma = {"noisy": 0.25}.get(style, 0.03)
    img = img + sigma * torch.randn(img.shape, generator=gen)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), mask


def world_generator(*key):
    """A torch.Generator seeded from a tuple key (seed, split, style...), stable across runs."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


def world_classname(colour, shape):
    return f"{WORLD_COLOURS[colour]} {WORLD_SHAPES[shape]}"



def world_attributes(pairs, pick, gen):
    """Attributes of the images of pair indices `pick` ([n] long): colour and shape from the pairs,
    then size and background drawn from `gen` (in that order) -> (colour, shape, size, background),
    [n] long each."""
    colour = torch.tensor([pairs[i][0] for i in pick.tolist()])
    shape = torch.tensor([pairs[i][1] for i in pick.tolist()])
    size = torch.randint(0, len(WORLD_SIZES), (len(pick),), generator=gen)
    background = torch.randint(0, len(WORLD_BACKGROUNDS), (len(pick),), generator=gen)
    return colour, shape, size, background


def world_images(pairs, per_class, style, seed, split, task="shapes"):
    """Render `per_class` images of every (colour, shape) pair -> (uint8 [N, 3, WORLD_RES, WORLD_RES], labels [N]).
    A task other than the first draws from its own generators (the first task's keys are unchanged)."""
    gen = world_generator(seed, split, style) if task == "shapes" else world_generator(seed, split, style, task)
    labels = torch.arange(len(pairs)).repeat_interleave(per_class)
    images, _ = world_render(*world_attributes(pairs, labels, gen), style, gen)
    return images, labels


# Per-class image counts of the downstream splits; >= 50 test images per class so that differences
# of a few points are not noise.
WORLD_SPLIT_SIZES = {"train": 32, "val": 8, "test": 100}


# --- captions for pretraining -------------------------------------------------------------------
# Full captions name colour and shape (some also size or background); long ones train positions
# that a 16-token context later uses. 30 % name only the colour or only the shape, so each word is
# grounded on its own. Each caption records which attributes it names, for the multi-positive loss.
WORLD_CAPTIONS = (
    "a photo of a {c} {s}.", "a {c} {s}.", "a photo of a {z} {c} {s}.",
    "a {c} {s} on a {b} background.", "a drawing of a {c} {s}.", "an image showing a {c} {s}.",
    "a picture of a {z} {c} {s} on a {b} background.", "there is a {c} {s} in the picture.",
    "a close-up photo of the {c} {s}.", "a {z} {s} that is {c}.",
    "this is a {c} {s}, a simple shape.", "a rendering of one {c} {s} in front of a {b} background.",
)
WORLD_COLOUR_ONLY = ("a {c} object.", "a photo of something {c}.")
WORLD_SHAPE_ONLY = ("a {s}.", "a photo of a {s}.", "a {s} shape.")


def world_class_templates():
    """The captions that name only the colour and the shape, as class-name templates ("a drawing of
    a {c} {s}." -> "a drawing of a {}."): the world's counterpart of a dataset's prompt templates."""
    return [t.replace("{c} {s}", "{}") for t in WORLD_CAPTIONS if "{c} {s}" in t and t.count("{") == 2]


def world_caption_batch(n, gen, pairs, p_attribute_only=0.3):
    """Sample n images' attributes from `pairs` and one caption each.

    -> (colour, shape, size, background) [n] long each, captions list[str], named [n, 4] bool:
    which of (colour, shape, size, background) each caption names."""
    pick = torch.randint(0, len(pairs), (n,), generator=gen)
    colour, shape, size, background = world_attributes(pairs, pick, gen)
    kind, which = torch.rand(n, generator=gen), torch.rand(n, generator=gen)
    captions, named = [], torch.zeros(n, 4, dtype=torch.bool)
    for i in range(n):
        words = dict(c=WORLD_COLOURS[colour[i]], s=WORLD_SHAPES[shape[i]],
                     z=WORLD_SIZES[size[i]], b=WORLD_BACKGROUNDS[background[i]])
        if kind[i] < p_attribute_only / 3:
            pool = WORLD_COLOUR_ONLY
        elif kind[i] < p_attribute_only:
            pool = WORLD_SHAPE_ONLY
        else:
            pool = WORLD_CAPTIONS
        template = pool[int(which[i] * len(pool))]
        captions.append(template.format(**words))
        named[i] = torch.tensor(["{c}" in template, "{s}" in template, "{z}" in template, "{b}" in template])
    return (colour, shape, size, background), captions, named


def world_positive_mask(attributes, named):
    """M[i, j] = 1 when image i fits every attribute that caption j names -> [n, n] float.
    A batch holds many images of one class; counting them all as positives stops the loss from
    pushing identical classes apart."""
    attrs = torch.stack(attributes, 1)  # [n, 4]
    agree = attrs[:, None, :] == attrs[None, :, :]  # [i, j, 4]
    return (agree | ~named[None, :, :]).all(-1).float()


# --- downstream benchmarks ----------------------------------------------------------------------
# "shapes" is the default benchmark of every method script: 24 colour-shape classes drawn as
# outlines (zero-shot is weaker there: the colour is a thin rim). "shapes_<style>" puts the same task
# in another style. The other styles' test sets are the shifted domains; clean photos measure how
# much of the pretrained skill a prompt forgets. "shapes2" (and "shapes2_<style>") is a second task
# whose classes the first never has: the target of the cross-dataset protocol.
WORLD_TASKS = ("shapes", "shapes2")
WORLD_DATASETS = tuple(f"{task}{suffix}" for task in WORLD_TASKS
                       for suffix in ("", *(f"_{style}" for style in WORLD_STYLES)))


# World v3: the downstream task is one colour x shape grid cut into blocks. Colours 0-3 (red, green,
# blue, yellow) and 4-7 (purple, orange, pink, white); shapes 2-4 (triangle, star, cross) and 0, 1, 5
# (circle, square, heart). 'shapes' is the diagonal: base = the first colours x the first shapes, new =
# the other colours x the other shapes, so base and new share no word, are drawn alike and need both
# cues. 'shapes2' (the cross-dataset target) is the off-diagonal: the same words in pairs 'shapes'
# never shows. Why these blocks (the criteria, measured): world/README.md.
WORLD_COLOUR_BLOCKS = ((0, 1, 2, 3), (4, 5, 6, 7))
WORLD_SHAPE_BLOCKS = ((2, 3, 4), (0, 1, 5))


def world_block(colours, shapes):
    """The (colour, shape) pairs of one block of the grid, colour-major."""
    return [(c, s) for c in colours for s in shapes]


def world_task_classes():
    """The 24 (colour, shape) classes of the downstream task, base half first.

    base (labels 0-11): {red, green, blue, yellow} x {triangle, star, cross}; new (labels 12-23):
    {purple, orange, pink, white} x {circle, square, heart}. Both halves are a 4 x 3 grid of the same
    rendering, so each needs colour and shape; they share no word, as a real dataset's new class names
    are new to its base training. 3 pairs of each half were held out of pretraining (world_combo_split:
    blue triangle, yellow star, red cross; purple circle, orange square, orange heart)."""
    (cb, cn), (sb, sn) = WORLD_COLOUR_BLOCKS, WORLD_SHAPE_BLOCKS
    return world_block(cb, sb) + world_block(cn, sn)


def world_task2_classes():
    """The 24 classes of the second task ('shapes2'): the grid's other two blocks, {red, green, blue,
    yellow} x {circle, square, heart} and {purple, orange, pink, white} x {triangle, star, cross}: the
    first task's words in pairs it never uses."""
    (cb, cn), (sb, sn) = WORLD_COLOUR_BLOCKS, WORLD_SHAPE_BLOCKS
    return world_block(cb, sn) + world_block(cn, sb)


def world_other_task(name):
    """The cross-dataset target of a world benchmark: the other task in the same style
    ('shapes' -> 'shapes2', 'shapes_noisy' -> 'shapes2_noisy', 'shapes2' -> 'shapes')."""
    task, _, style = name.partition("_")
    return WORLD_TASKS[1 - WORLD_TASKS.index(task)] + (f"_{style}" if style else "")


@functools.lru_cache(maxsize=4)
def world_benchmark(name, seed=0):
    """The benchmark `name` ('shapes', 'shapes2', or either + '_<style>'), rendered once per process."""
    task, _, style = name.partition("_")
    style = style or WORLD_DEFAULT_STYLE
    if task not in WORLD_TASKS or style not in WORLD_STYLES:
        raise ValueError(f"unknown world dataset {name!r}; world datasets: {', '.join(WORLD_DATASETS)}")
    pairs = world_task_classes() if task == "shapes" else world_task2_classes()
    classnames = [world_classname(*pair) for pair in pairs]
    pools, count = [], 0

    def render(split, split_style):
        nonlocal count
        images, labels = world_images(pairs, WORLD_SPLIT_SIZES[split], split_style, seed, split, task)
        pools.append(images)
        items = [Item(count + i, label, classnames[label]) for i, label in enumerate(labels.tolist())]
        count += len(items)
        return items

    train, val, test = render("train", style), render("val", style), render("test", style)
    shifts = {other: render("test", other) for other in WORLD_STYLES if other != style}
    pool = torch.cat(pools)  # [N, 3, WORLD_RES, WORLD_RES] uint8; an item's source is its row

    def open_image(index):
        return Image.fromarray(pool[index].permute(1, 2, 0).numpy())

    return Benchmark(name=name, classnames=classnames, train=train, val=val, test=test,
                     template="a photo of a {}.", shifts=shifts, open_image=open_image, augment=False)
