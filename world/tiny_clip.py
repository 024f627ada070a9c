"""The offline world's tiny CLIP: an open_clip config small enough to pretrain on 2 CPU cores, its
contrastive pretraining on rendered photos (`python -m world pretrain`), the loader of the shipped
checkpoint (world/tiny_clip_shapes.pt), the Backbone data.load_backbone('tiny', ...) returns, and a
zero-shot check (`python -m world zero-shot`). How the recipe was chosen: world/README.md."""
from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from data import CLIP_MEAN, CLIP_STD, Backbone, atomic_save
from world.shapes import (WORLD_RES, world_caption_batch, world_classname, world_combo_split, world_generator,
                          world_images, world_positive_mask, world_render)

# An open_clip CLIP small enough to pretrain on 2 CPU cores: ViT patch 4 on 48 px (144 patches + CLS, so
# that 4 prompt tokens are a small share of the sequence, as in ViT-B/16's 196 + 1), 6 layers of width
# 128, trained with half the patches dropped (FLIP-style patch dropout, which halves the cost; eval
# uses all of them); text transformer of width 128, 3 layers, 24 positions. World v2: world/README.md.
TINY_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": WORLD_RES, "layers": 6, "width": 128, "patch_size": 4, "head_width": 32,
                   "mlp_ratio": 4.0, "patch_dropout": 0.5},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3},
}
TINY_CHECKPOINT = Path(__file__).resolve().parent / "tiny_clip_shapes.pt"


def register_tiny():
    """Register the tiny config with open_clip (public add_model_config), so that
    open_clip.create_model("tiny") builds it like any other architecture."""
    import open_clip

    if "tiny" not in open_clip.list_models():
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "tiny.json"
            path.write_text(json.dumps(TINY_CONFIG))
            open_clip.add_model_config(path)


def build_tiny_clip(config=None):
    """A tiny CLIP through open_clip, random init from torch's global RNG, fp32, train mode.
    config: an open_clip model config (default TINY_CONFIG, registered as 'tiny'); a checkpoint
    pretrained with another config (e.g. an experiment's) is built from the config it carries."""
    import open_clip

    register_tiny()  # also what open_clip.get_tokenizer("tiny") reads its context length from
    if config is None or config == TINY_CONFIG:
        return open_clip.create_model("tiny")
    return open_clip.CLIP(**config)


def to_clip_input(images):
    """uint8 [n, 3, H, W] -> float [n, 3, H, W] normalised with CLIP's mean and std."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def world_pretrain(steps=1500, batch_size=128, lr=1e-3, seed=0, out=TINY_CHECKPOINT, threads=1,
                   log_every=100, check_per_class=50):
    """Contrastive pretraining of the tiny CLIP on clean photos of the 48 seen colour-shape pairs.

    AdamW (wd 0.1), 5 % linear warm-up then cosine, grad-norm clip 1.0, multi-positive InfoNCE in
    both directions. Bit-identical reruns for a given seed and thread count on a quiet CPU. Then a
    zero-shot check on `check_per_class` fresh images of each pair, kept in the checkpoint's meta."""
    import open_clip

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build_tiny_clip()
    tokenizer = open_clip.get_tokenizer("tiny")
    seen, _ = world_combo_split()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))
    warmup = max(1, int(0.05 * steps))
    schedule = lambda s: (s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
    gen = world_generator(seed, "pretrain")
    used_tokens = torch.zeros(TINY_CONFIG["text_cfg"]["vocab_size"], dtype=torch.bool)
    start, history = time.time(), []
    model.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * schedule(step)
        attributes, captions, named = world_caption_batch(batch_size, gen, seen)
        images, _ = world_render(*attributes, "photo", gen)
        images = to_clip_input(images)
        tokens = tokenizer(captions)
        used_tokens[tokens.flatten()] = True
        image_features, text_features, scale = model(images, tokens)  # normalised [n, 128] each
        logits = scale * image_features @ text_features.T  # [n images, n captions]
        positives = world_positive_mask(attributes, named)
        loss = 0.5 * (-(positives / positives.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
                      - (positives / positives.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % log_every == 0 or step == steps - 1:
            history.append({"step": step, "loss": round(loss.item(), 4), "s": round(time.time() - start, 1)})
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:.0f}s", flush=True)
    wall = time.time() - start
    model.eval()
    seen, heldout = world_combo_split()  # base/new below: the halves of the pretraining pairs
    zero_shot = {"photo_base": world_zero_shot(model, seen[:24], "photo", check_per_class),
                 "photo_new": world_zero_shot(model, seen[24:], "photo", check_per_class),
                 "photo_heldout": world_zero_shot(model, heldout, "photo", check_per_class),
                 "noisy_base": world_zero_shot(model, seen[:24], "noisy", check_per_class)}
    print("zero-shot accuracy:", json.dumps(zero_shot), flush=True)
    state = {k: v.detach().to(torch.float16).clone() for k, v in model.state_dict().items()}
    table = state.pop("token_embedding.weight")
    token_ids = used_tokens.nonzero()[:, 0]
    checkpoint = {"config": TINY_CONFIG, "state_dict": state, "token_ids": token_ids,
                  "token_rows": table[token_ids].clone(),
                  "meta": {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr,
                           "threads": threads, "wall_s": round(wall, 1), "loss_history": history, "zero_shot": zero_shot,
                           "torch": str(torch.__version__), "open_clip": str(open_clip.__version__)}}
    if out is not None:
        atomic_save(checkpoint, out)
    return model, history, wall


@torch.no_grad()
def world_zero_shot(model, pairs, style, per_class=50, seed=12345, template="a photo of a {}."):
    """Zero-shot accuracy of `model` on freshly rendered images of `pairs` in `style`, classifying
    among those pairs' names only. A quick check used while pretraining and by the tests."""
    import open_clip

    images, labels = world_images(pairs, per_class, style, seed, "zero-shot-check")
    tokenizer = open_clip.get_tokenizer("tiny")
    text = F.normalize(model.encode_text(tokenizer([template.format(world_classname(*p)) for p in pairs])), dim=-1)
    image = F.normalize(model.encode_image(to_clip_input(images)), dim=-1)
    return round((image @ text.T).argmax(1).eq(labels).float().mean().item(), 4)


def load_tiny_clip(path=TINY_CHECKPOINT):
    """Build the tiny CLIP through open_clip and load the shipped weights (fp16 on disk -> fp32).
    Token rows the world never used are zero (they were never trained)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tiny CLIP checkpoint not found at {path}. It ships with the "
                                f"repository (world/); rebuild it with `python -m world pretrain`.")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = build_tiny_clip(checkpoint["config"])
    state = {k: v.float() for k, v in checkpoint["state_dict"].items()}
    table = torch.zeros_like(model.token_embedding.weight)
    table[checkpoint["token_ids"]] = checkpoint["token_rows"].float()
    state["token_embedding.weight"] = table
    model.load_state_dict(state)
    return model.eval()


def tiny_backbone(pretrained: Optional[str], device) -> Backbone:
    """The world's tiny CLIP as a Backbone (data.load_backbone('tiny', ...)). pretrained: 'shapes'
    (the shipped checkpoint), a path to a checkpoint written by `python -m world pretrain`, or None
    (random weights)."""
    import open_clip

    if pretrained is None:
        model = build_tiny_clip()
    elif pretrained == "shapes" or str(pretrained).endswith(".pt"):
        model = load_tiny_clip(TINY_CHECKPOINT if pretrained == "shapes" else pretrained)
    else:
        raise ValueError(f"unknown pretrained tag {pretrained!r} for 'tiny'. Valid: 'shapes' (the shipped "
                         f"checkpoint), a path to a .pt written by `python -m world pretrain`, or None")
    model = model.to(device).eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer("tiny")  # CLIP's BPE, 24 positions
    return Backbone(model=model, tokenize=lambda texts: tokenizer(list(texts)), name="tiny",
                    pretrained=pretrained, image_size=model.visual.image_size[0],
                    mean=CLIP_MEAN, std=CLIP_STD)


# --- the untrained-prompt check (World v2's criterion) ---------------------------------------------
@torch.no_grad()
def encode_image_with_random_prompts(model, images, n_prompts, gen, std=0.02):
    """The image features with `n_prompts` untrained deep vision prompts, as PromptSRC/IVLP start
    training: N(0, std^2) tokens appended after the patch tokens before ln_pre, and a fresh set
    replacing them before every later block. n_prompts=0 gives model.encode_image (tested).
    images: CLIP input [n, 3, H, W] -> unnormalised features [n, D]."""
    visual = model.visual
    x = visual.conv1(images).flatten(2).transpose(1, 2)  # [n, patches, width]
    cls = visual.class_embedding.expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + visual.positional_embedding
    blocks = visual.transformer.resblocks
    prompts = std * torch.randn(len(blocks), n_prompts, x.shape[-1], generator=gen)
    x = visual.ln_pre(torch.cat([x, prompts[0].expand(x.shape[0], -1, -1)], 1))
    for depth, block in enumerate(blocks):
        if depth > 0 and n_prompts > 0:
            x = torch.cat([x[:, :-n_prompts], prompts[depth].expand(x.shape[0], -1, -1)], 1)
        x = block(x)
    return visual.ln_post(x[:, 0]) @ visual.proj


@torch.no_grad()
def world_prompt_sensitivity(model, n_prompts=4, seeds=(1, 2, 3), std=0.02):
    """How much untrained deep vision prompts move zero-shot accuracy on the downstream task's test
    set ('shapes': base and new, each among its own names, template 'a photo of a {}.').
    -> {"base": acc, "new": acc, "prompted": {seed: {"base": acc, "new": acc}}} (fractions)."""
    import open_clip

    from world.shapes import WORLD_DEFAULT_STYLE, WORLD_SPLIT_SIZES, world_task_classes

    pairs = world_task_classes()
    images, labels = world_images(pairs, WORLD_SPLIT_SIZES["test"], WORLD_DEFAULT_STYLE, 0, "test")
    images = to_clip_input(images)
    tokenizer = open_clip.get_tokenizer("tiny")
    text = F.normalize(model.encode_text(tokenizer([f"a photo of a {world_classname(*p)}." for p in pairs])), dim=-1)
    n_base = len(pairs) // 2  # base: the first half of the task's classes
    halves = {"base": (0, n_base), "new": (n_base, len(pairs))}

    def accuracies(features):
        features = F.normalize(features, dim=-1)
        out = {}
        for half, (offset, end) in halves.items():
            pick = (labels >= offset) & (labels < end)
            logits = features[pick] @ text[offset:end].T
            out[half] = round(logits.argmax(1).add(offset).eq(labels[pick]).float().mean().item(), 4)
        return out

    result = accuracies(model.encode_image(images))
    result["prompted"] = {seed: accuracies(encode_image_with_random_prompts(
        model, images, n_prompts, torch.Generator().manual_seed(seed), std)) for seed in seeds}
    return result
