"""PromptSRC: self-regulating deep vision and language prompts, in one file.

PromptSRC Khattak, Wasim, Naseer, Khan, Yang, Khan. "Self-regulating Prompts: Foundational Model
          Adaptation without Forgetting." ICCV 2023. https://arxiv.org/abs/2307.06948
IVLP      the same deep prompts trained with cross-entropy alone: the paper's baseline (--ivlp).

Both encoders of CLIP stay frozen and get deep prompts (IVLP): 4 learned text tokens replace the context
words of "a photo of a {class}." at the input and again, with a new set, at the input of each of the next
blocks up to depth 9; 4 learned image tokens are appended after the patch tokens and replaced by a new set
in each of the next blocks. Prompts fitted with cross-entropy alone forget what CLIP knew, so PromptSRC
regularises them towards the frozen model: L1 between prompted and frozen text features and between
prompted and frozen image features, and a KL from the frozen to the prompted logits (mutual agreement).
The frozen text features average 60 templates (textual diversity), and the prompts used at test time are a
Gaussian-weighted average of each epoch's prompts (GPA), which favours the later, not the last, epochs.

  python promptsrc.py                                     # offline world (shapes, tiny CLIP), PromptSRC
  python promptsrc.py --ivlp                              # offline world, the IVLP baseline (CE only)
  python promptsrc.py --dataset caltech101 --root ~/data  # paper setting: ViT-B/16 openai, 16 shots
  python promptsrc.py --resume runs/promptsrc-caltech101-16shot-seed1-...     # continue a killed run
  python promptsrc.py --evaluate runs/promptsrc-caltech101-16shot-seed1-...   # re-evaluate a finished run
  python promptsrc.py --protocol all --shots 4            # few-shot on all classes (supplement, 50 epochs)
  python promptsrc.py --protocol cross --dataset imagenet --root ~/data  # cross-dataset, domain generalisation

Evaluation protocols (--protocol), each with the official config's settings (PROTOCOLS, DATASET_SETTINGS):
- base2new (default): train on the base half, test base and new each in its own label space, their harmonic
  mean, and the benchmark's shifted test sets on the base classes (vit_b16_c2_ep20_batch4_4+4ctx).
- all: few-shot on every class, 50 epochs, GPA mu 30 sigma 30 (45 / 5 for Cars, Flowers, Aircraft, DTD,
  EuroSAT), plus the shifted test sets each in its own label space (..._ep50_batch4_4+4ctx_few_shot).
- cross: as all but 20 epochs, prompt depth 3, GPA mu 6 sigma 10; then the other datasets, each in its own
  label space (--eval-datasets; default: ImageNet -> the other ten; the world -> shapes2) (..._cross_datasets).

Differs from coop.py in: deep prompts on both encoders (TextEncoder / ImageEncoder below run open_clip's
blocks and replace the prompt tokens between them; coop's shared TextEncoder has no deep prompts), the
loss, GPA, SGD lr 0.0025 with batch 4 for 20 epochs, and a training batch that carries the frozen image
features where they are cached.

Differs from the official code (muzairkhattak/PromptSRC) in:
- open_clip instead of OpenAI's clip package (QuickGELU forced for the `openai` weights, as theirs), and
  fp32 learned prompts with bf16 autocast on CUDA where the official code runs everything in fp16.
- the frozen model is the prompted model with its prompts switched off (the same weights run without
  prompt tokens), not a second copy of CLIP (ZS_image_encoder and a vanilla fp32 CLIP for the text).
- frozen image features are computed once per training image where no random augmentation applies (the
  offline world), else once per batch without gradients as the official code does; frozen text features
  once per class set. Evaluation runs the text side once per evaluation, not per test batch.
- the text transformer runs only up to the longest prompt's end-of-text token (exact: causal mask).
- a prompt depth above the encoder's number of blocks means every block (the tiny CLIP of the world has
  3 text and 6 image blocks; the paper's depth is 9 of ViT-B/16's 12).
- the text context length counts BPE tokens of --ctx-init (4 for "a photo of a", as the official config).
- GPA averages only the prompts (the official code averages the whole state dict, a no-op for the frozen
  weights up to fp16 rounding), in fp32, as a running average: after epoch e it holds
  sum_{k<=e} g_k theta_k / sum_{k<=e} g_k, which at the last epoch is the official sum_e g_e theta_e.
- on the offline world the frozen text features average the captions the tiny CLIP was pretrained with
  (world/shapes.py WORLD_CAPTIONS, those that name only colour and shape: 7), not the 60 ImageNet
  templates: most of the 60 use words the tiny CLIP never saw.
- on CUDA the training step is recorded once as a CUDA graph and replayed (CapturedStep); the logit loss
  and GPA run as fused Triton kernels (kernels/) where kernels.kernel_available(device), else as the
  PyTorch code below (the same numbers to fp32 rounding; tested).
- a checkpoint is written after every epoch, with the GPA state and what the next epoch needs (--resume).
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import data

try:  # fused Triton kernels (kernels/); the readable PyTorch forms below run where they cannot
    import kernels
except ImportError:
    kernels = None


# ------------------------------------------------------------------------------------------ settings
# Paper defaults (configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml), then per-protocol and
# per-dataset settings of the official configs; a flag given on the command line wins over all of them.
PAPER = dict(epochs=20, batch_size=4, prompt_depth_text=9, prompt_depth_vision=9, gpa_mean=15.0, gpa_std=1.0)
PROTOCOLS = {
    "base2new": dict(train_classes="base"),
    "all": dict(train_classes="all", epochs=50, gpa_mean=30.0, gpa_std=30.0),  # ..._ep50_..._few_shot.yaml
    "cross": dict(train_classes="all", prompt_depth_text=3, prompt_depth_vision=3, gpa_mean=6.0, gpa_std=10.0),
}
FEW_SHOT_GPA_45_5 = ("stanford_cars", "oxford_flowers", "fgvc_aircraft", "dtd", "eurosat")  # the few-shot yaml
DATASET_SETTINGS = {
    **{name: {"all": dict(gpa_mean=45.0, gpa_std=5.0)} for name in FEW_SHOT_GPA_45_5},
    # The offline world (every 'shapes...' benchmark) runs the paper settings as they are.
    "shapes": {},
}
# PromptSRC's textual diversity (trainers/imagenet_templates.py): "a photo of a {}." and the first 60 of
# OpenAI's 80 ImageNet templates without that duplicate; the same 60 for every dataset.
PROMPTSRC_TEMPLATES = ["a photo of a {}."] + [t for t in data.IMAGENET_TEMPLATES[:60]
                                               if t != "a photo of a {}."]
PROMPTS_PER_PASS = 4096  # frozen text features: at most this many template prompts in one text pass
# Settings of a run that may change when it is resumed or re-evaluated elsewhere (nothing numeric).
LOCAL_SETTINGS = ("resume", "evaluate", "root", "device", "workers", "test_batch_size", "eager", "results_file")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset", default="shapes",
      help="benchmark name for data.load_dataset (shapes = the built-in offline world; paper: 11 datasets, "
           "e.g. caltech101)")
    a("--root", default="~/data", help="folder holding the datasets in CoOp's layout, as DATASET.ROOT")
    a("--download", action="store_true",
      help="let data.py download what torchvision can download (the papers: manual download)")
    a("--model", default=None,
      help="open_clip model name (a ViT); default: data.default_backbone(dataset) (paper: ViT-B-16)")
    a("--pretrained", default=None,
      help="open_clip pretrained tag, 'none' for random init; required with --model (paper: openai)")
    a("--ivlp", action="store_true",
      help="IVLP, the paper's baseline: the same deep prompts, cross-entropy only, no GPA (official: "
           "--trainer IVLP)")
    a("--ctx-init", default="a photo of a",
      help="words that initialise the input-level text context (M = their BPE token count); '' = random "
           "N(0, 0.02^2) with --n-ctx-text tokens (paper: a photo of a)")
    a("--n-ctx-text", type=int, default=4,
      help="text prompt tokens per block when --ctx-init is empty (paper: 4)")
    a("--n-ctx-vision", type=int, default=4, help="image prompt tokens per block (paper: 4)")
    a("--prompt-depth-text", type=int, default=None,
      help="text blocks that get prompts, from the first (paper: 9; cross-dataset 3); capped at the model's")
    a("--prompt-depth-vision", type=int, default=None,
      help="image blocks that get prompts, from the first (paper: 9; cross-dataset 3; 0: none); capped at "
           "the model's")
    a("--text-loss-weight", type=float, default=25.0, help="weight of L_SCL-text (paper: 25)")
    a("--image-loss-weight", type=float, default=10.0, help="weight of L_SCL-image (paper: 10)")
    a("--gpa-mean", type=float, default=None,
      help="GPA: mean of the Gaussian over epochs 1..E (paper: 15; few-shot 30 or 45; cross-dataset 6)")
    a("--gpa-std", type=float, default=None,
      help="GPA: its standard deviation (paper: 1; few-shot 30 or 5; cross-dataset 10)")
    a("--protocol", default="base2new", choices=list(PROTOCOLS),
      help="base2new: train on the base half, test base/new (CoCoOp); all: train and test on every class "
           "(few-shot); cross: as all, then test on --eval-datasets (cross-dataset transfer)")
    a("--eval-datasets", default=None, metavar="A,B,C",
      help="other datasets to test on after training, each in its own label space; default for --protocol "
           "cross: imagenet -> the other ten CoOp datasets, shapes -> shapes2 (the world's second task). "
           "With --evaluate: test a saved run on these")
    a("--shots", type=int, default=16,
      help="training images per class, sampled on all classes before the base/new split (paper: 16)")
    a("--epochs", type=int, default=None, help="default: 20 (few-shot protocol 'all': 50), as the configs")
    a("--batch-size", type=int, default=None, help="default: 4, the paper value")
    a("--lr", type=float, default=0.0025,
      help="SGD learning rate after warm-up, cosine-annealed per epoch (paper: 0.0025)")
    a("--momentum", type=float, default=0.9, help="SGD momentum (Dassl default: 0.9)")
    a("--weight-decay", type=float, default=5e-4, help="SGD weight decay (Dassl default: 5e-4)")
    a("--warmup-epochs", type=int, default=1, help="constant warm-up epochs before the cosine (paper: 1)")
    a("--warmup-lr", type=float, default=1e-5, help="learning rate during warm-up (paper: 1e-5)")
    a("--test-batch-size", type=int, default=100, help="evaluation batch size (Dassl: 100)")
    a("--workers", type=int, default=min(4, os.cpu_count() or 1),
      help="data-loader worker processes (Dassl: 8, here capped at the CPU count and 4)")
    a("--seed", type=int, default=1, help="seed for sampling, initialisation and shuffling (papers: 1, 2, 3)")
    a("--no-truncate", action="store_true",
      help="run the text transformer over all context positions (slower, same result; the official code does)")
    a("--eager", action="store_true",
      help="CUDA: run each training step op by op instead of replaying its CUDA graph (same numbers, slower)")
    a("--output-dir", default=None,
      help="run folder; default runs/<method>-<dataset>-<shots>shot-seed<seed>-<time> (official: --output-dir)")
    a("--overwrite", action="store_true",
      help="replace a run folder that already holds a checkpoint, all of it (the official scripts skip a "
           "folder that exists)")
    a("--results-file", default=None,
      help="JSON-lines file that gets one line per run; default <output-dir>/../results.jsonl")
    a("--resume", default=None, metavar="RUN_DIR",
      help="continue a run from its last completed epoch with its saved settings (or finish its evaluation)")
    a("--evaluate", default=None, metavar="RUN_DIR",
      help="re-evaluate a finished run with its saved settings, without training; writes RUN_DIR/eval.json "
           "(official: --eval-only --model-dir)")
    a("--device", default=None, help="torch device; default cuda if available, else cpu (papers: one GPU)")
    return p.parse_args(argv)


def resolve_settings(args):
    """Fill the settings left at None: command line > DATASET_SETTINGS > PROTOCOLS > paper default; then
    check them."""
    dataset = "shapes" if args.dataset.startswith(data.WORLD_PREFIX) else args.dataset
    protocol = {k: v for k, v in PROTOCOLS[args.protocol].items() if k != "train_classes"}
    for key, value in {**PAPER, **protocol, **DATASET_SETTINGS.get(dataset, {}).get(args.protocol, {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model is None:
        args.model, default_pretrained = data.default_backbone(args.dataset)
        args.pretrained = default_pretrained if args.pretrained is None else args.pretrained
    else:  # never fall back to random weights silently
        data.require(args.pretrained is not None, "--model needs --pretrained (an open_clip tag, a weights "
                     "file, or 'none' for random init)")
    if args.pretrained in ("none", "None", ""):
        args.pretrained = None
    if args.eval_datasets is None and args.protocol == "cross":
        args.eval_datasets = ",".join(data.transfer_targets(args.dataset))
    check_settings(args)
    return args


def check_settings(args):
    """Refuse, before anything is written, a setting that would run and give wrong numbers (a
    data.UsageError: one line that names the value). The prompt's length is checked where it is
    tokenized (PromptLearner), the backbone where it is wrapped (ImageEncoder)."""
    for name in ("epochs", "batch_size", "shots", "test_batch_size", "prompt_depth_text", "n_ctx_vision"):
        data.check_int(f"--{name.replace('_', '-')}", getattr(args, name), 1)
    for name in ("warmup_epochs", "workers", "prompt_depth_vision"):
        data.check_int(f"--{name.replace('_', '-')}", getattr(args, name), 0)
    data.check_float("--lr", args.lr, above=0)
    for name in ("momentum", "weight_decay", "warmup_lr", "text_loss_weight", "image_loss_weight"):
        data.check_float(f"--{name.replace('_', '-')}", getattr(args, name), minimum=0)
    data.check_float("--gpa-mean", args.gpa_mean)
    data.check_float("--gpa-std", args.gpa_std, above=0)
    data.require(sum(gaussian_pdf(args.epochs, args.gpa_mean, args.gpa_std)) > 0,
                 f"--gpa-mean {args.gpa_mean} with --gpa-std {args.gpa_std} gives every epoch 1..{args.epochs} "
                 "zero weight (the Gaussian underflows): put the mean within the epochs")
    data.require(args.ctx_init.strip() or args.n_ctx_text >= 1,
                 f"--n-ctx-text {args.n_ctx_text} with an empty --ctx-init: the prompt needs at least one "
                 "token")
    data.require(args.protocol != "cross" or eval_datasets(args), f"--protocol cross names no default "
                 f"targets for {args.dataset}: list them with --eval-datasets")


def eval_datasets(args):
    """The other datasets a run is tested on (--eval-datasets), as a list."""
    return [name.strip() for name in (getattr(args, "eval_datasets", None) or "").split(",") if name.strip()]


def learning_rate(epoch, args):
    """Dassl's schedule, stepped once per epoch: constant warm-up, then cosine over all epochs.
    eta_0 = warmup_lr; eta_e = lr/2 (1 + cos(pi (e - W) / E)) for e >= W (never reaches 0)."""
    if epoch < args.warmup_epochs:
        return args.warmup_lr
    return 0.5 * args.lr * (1 + math.cos(math.pi * (epoch - args.warmup_epochs) / args.epochs))


def gaussian_pdf(epochs, mu, sigma):
    """N(e; mu, sigma) for epochs e = 1..E (sigma a standard deviation), as the official get_gauss."""
    return [math.exp(-0.5 * ((e - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
            for e in range(1, epochs + 1)]


def gpa_weights(epochs, mu, sigma):
    """GPA's epoch weights g_1..g_E: the Gaussian normalised to sum 1 over the epochs (mu 15, sigma 1, 20
    epochs: 0.054, 0.242, 0.399, 0.242, 0.054 on epochs 13-17, nearly nothing elsewhere)."""
    pdf = gaussian_pdf(epochs, mu, sigma)
    return [g / sum(pdf) for g in pdf]


def frozen_templates(dataset):
    """The templates whose mean frozen text feature the text prompts are pulled towards (textual diversity).
    Real data: PromptSRC's 60. The offline world: the tiny CLIP's own pretraining captions that name only
    the colour and the shape ("a drawing of a {c} {s}." -> "a drawing of a {}."), the words it learned."""
    if not dataset.startswith(data.WORLD_PREFIX):
        return PROMPTSRC_TEMPLATES
    from world.shapes import WORLD_CAPTIONS  # data.load_dataset has imported world/ for this dataset
    templates = [t.replace("{c} {s}", "{}") for t in WORLD_CAPTIONS if "{c} {s}" in t and t.count("{") == 2]
    data.require(templates, "no world caption names only colour and shape: the frozen text features need one")
    return templates


# ------------------------------------------------------------------------------------------ the method
class TextEncoder(nn.Module):
    """CLIP's text tower fed prompt embeddings, with deep prompts (IVLP): before block i = 1..J-1 the tokens
    at positions 1..M are replaced by the learned set of that block, so each block sees new prompt tokens
    (what the previous block made of the old ones is dropped); blocks from J on carry them along.
    deep=None runs the blocks as they are: CLIP's own encode_text on the given embeddings. The causal mask
    keeps the end-of-text (EOT) feature independent of later positions, so prompts cut after the longest
    EOT give exactly the features of the full context."""

    def __init__(self, clip):
        super().__init__()
        assert clip.transformer.batch_first and clip.text_pool_type == "argmax", "needs open_clip's text tower"
        self.resblocks = clip.transformer.resblocks
        self.positional_embedding = clip.positional_embedding  # [L, d]
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection  # [d, D]
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)  # [L, L], -inf above the diagonal

    def forward(self, prompts, eot, deep=None):
        """prompts: [N, n, d] token embeddings (n <= L); eot: [N] EOT positions; deep: [J-1, M, d] the
        prompts of blocks 1..J-1, or None. Returns features [N, D]."""
        n = prompts.shape[1]
        x = prompts + self.positional_embedding[:n]  # [N, n, d]
        for i, block in enumerate(self.resblocks):
            if deep is not None and 1 <= i <= len(deep):  # replace positions 1..M: [SOS][P_i][CLASS . EOT]
                m = deep.shape[1]
                x = torch.cat([x[:, :1], deep[i - 1].expand(len(x), -1, -1).to(x.dtype), x[:, 1 + m:]], dim=1)
            x = block(x, attn_mask=self.attn_mask[:n, :n])
        x = self.ln_final(x)
        return x[torch.arange(len(x), device=x.device), eot] @ self.text_projection  # [N, D]


class ImageEncoder(nn.Module):
    """CLIP's ViT with deep prompts (IVLP): M learned tokens appended after the patch tokens, before ln_pre;
    before block i = 1..J-1 the last M tokens are replaced by that block's set. prompts=None (or J = 0)
    runs the ViT as it is: CLIP's own encode_image, the frozen model. Output: ln_post(CLS) @ proj."""

    def __init__(self, visual):
        super().__init__()
        ok = (getattr(visual, "transformer", None) is not None and visual.transformer.batch_first
              and visual.attn_pool is None and visual.pool_type == "tok" and not visual.final_ln_after_pool)
        data.require(ok, f"{type(visual).__name__}: PromptSRC prompts a ViT whose feature is its class token "
                     "(open_clip VisionTransformer, e.g. ViT-B-16); this image tower is not one")
        self.visual = visual

    def forward(self, images, prompts=None):
        """images: [B, 3, H, W]; prompts: [J, M, w] (block 0's set first) or None. Returns [B, D]."""
        v = self.visual
        x = v.conv1(images.to(v.conv1.weight.dtype))  # [B, w, grid, grid]
        x = x.flatten(2).transpose(1, 2)  # [B, grid^2, w]
        cls = v.class_embedding.to(x.dtype).expand(len(x), 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # [B, 1 + grid^2, w]
        deep = prompts is not None and len(prompts) > 0
        if deep:
            x = torch.cat([x, prompts[0].expand(len(x), -1, -1).to(x.dtype)], dim=1)  # [B, 1 + grid^2 + M, w]
        x = v.ln_pre(x)
        for i, block in enumerate(v.transformer.resblocks):
            if deep and 1 <= i < len(prompts):  # replace the last M tokens with block i's prompts
                x = torch.cat([x[:, :-prompts.shape[1]], prompts[i].expand(len(x), -1, -1).to(x.dtype)], dim=1)
            x = block(x)
        return v.ln_post(x[:, 0]) @ v.proj  # [B, D]


class PromptLearner(nn.Module):
    """The learned prompts (IVLP): the input-level text context ctx [M, d] (from --ctx-init's words), the
    deeper text prompts [J_T - 1, M, d] and the image prompts [J_V, M_V, w] (N(0, 0.02^2)). Builds the
    input embeddings [SOS][ctx][CLASS][.][EOS] of the current class names."""

    def __init__(self, clip, tokenize, classnames, args):
        super().__init__()
        self.tokenize, self.token_embedding = tokenize, clip.token_embedding
        self.truncate = not getattr(args, "no_truncate", False)
        device = clip.token_embedding.weight.device
        ctx_dim, width = clip.ln_final.weight.shape[0], clip.visual.conv1.weight.shape[0]  # d, w
        context_length = tokenize(["x"]).shape[1]  # L: 77 for OpenAI CLIP
        if args.ctx_init:
            ids = tokenize([args.ctx_init]).to(device)  # [1, L]; cut to L by the tokenizer
            self.n_ctx = int(ids.argmax(-1)) - 1  # BPE tokens between SOS and EOT: "a photo of a" -> 4
            data.require(self.n_ctx + 2 < context_length, f"--ctx-init {args.ctx_init!r} does not fit the text "
                         f"context of {context_length} tokens with a class name: use fewer words")
            with torch.no_grad():
                ctx_vectors = self.token_embedding(ids)[0, 1:1 + self.n_ctx].float()  # [M, d]
            self.prefix_words = args.ctx_init
        else:
            self.n_ctx = args.n_ctx_text
            data.require(self.n_ctx + 3 < context_length, f"--n-ctx-text {self.n_ctx} does not fit the text "
                         f"context of {context_length} tokens with a class name: use fewer")
            ctx_vectors = nn.init.normal_(torch.empty(self.n_ctx, ctx_dim, device=device), std=0.02)
            self.prefix_words = " ".join(["X"] * self.n_ctx)  # placeholders whose embeddings ctx replaces
        depth_text = min(args.prompt_depth_text, len(clip.transformer.resblocks))
        depth_vision = min(args.prompt_depth_vision, len(clip.visual.transformer.resblocks))
        self.ctx = nn.Parameter(ctx_vectors)  # fp32 master copies, whatever the backbone's precision
        self.text_prompts = nn.Parameter(nn.init.normal_(
            torch.empty(depth_text - 1, self.n_ctx, ctx_dim, device=device), std=0.02))  # [J_T - 1, M, d]
        self.vision_prompts = nn.Parameter(nn.init.normal_(
            torch.empty(depth_vision, args.n_ctx_vision, width, device=device), std=0.02))  # [J_V, M_V, w]
        self.set_classes(classnames)

    def set_classes(self, classnames):
        """Build the frozen parts of the prompts for these class names (base for training, new for testing)."""
        names = [c.replace("_", " ") for c in classnames]
        device = self.token_embedding.weight.device
        ids = self.tokenize([f"{self.prefix_words} {name}." for name in names]).to(device)  # [C, L]
        eot = ids.argmax(-1)  # [C]: EOT has the largest token id
        too_long = [name for name, e in zip(names, eot.tolist()) if e >= ids.shape[1] - 1]  # cut by tokenizer
        data.require(not too_long, f"the prompt '{self.prefix_words} <class>.' does not fit the text context "
                     f"of {ids.shape[1]} tokens for {len(too_long)} classes (e.g. {(too_long or [''])[0]!r}): "
                     "use a shorter --ctx-init or fewer --n-ctx-text")
        length = int(eot.max()) + 1 if self.truncate else ids.shape[1]  # later positions never reach a feature
        with torch.no_grad():
            emb = self.token_embedding(ids[:, :length]).float()  # [C, n, d]
        self.register_buffer("token_prefix", emb[:, :1], persistent=False)  # SOS [C, 1, d]
        self.register_buffer("token_suffix", emb[:, 1 + self.n_ctx:], persistent=False)  # CLASS . EOS pad
        self.register_buffer("eot", eot, persistent=False)

    def forward(self):
        """Returns the input embeddings [C, n, d] and eot [C]."""
        ctx = self.ctx.expand(len(self.eot), -1, -1)  # [C, M, d]
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1), self.eot


class PromptedCLIP(nn.Module):
    """Frozen CLIP + deep prompts. logits = s * cos(f_p(x), g_p(t_c)), s = CLIP's frozen exp(logit_scale).
    The frozen model is the same CLIP with its prompts off (prompted=False)."""

    def __init__(self, clip, tokenize, classnames, args):
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self.image_encoder = ImageEncoder(clip.visual)  # first: it refuses an image tower that is not a ViT
        self.text_encoder = TextEncoder(clip)
        self.prompt_learner = PromptLearner(clip, tokenize, classnames, args)
        self.ivlp = args.ivlp
        self.text_loss_weight, self.image_loss_weight = args.text_loss_weight, args.image_loss_weight
        self.register_buffer("frozen_text_features", torch.empty(0), persistent=False)  # see below

    def encode_image(self, images, prompted=True):  # [B, 3, H, W] -> L2-normalised [B, D]
        prompts = self.prompt_learner.vision_prompts if prompted else None
        return F.normalize(self.image_encoder(images, prompts).float(), dim=-1)

    def class_text_features(self):
        """[C, D] normalised prompted text features of the current classes (once per evaluation)."""
        prompts, eot = self.prompt_learner()
        return F.normalize(self.text_encoder(prompts, eot, self.prompt_learner.text_prompts).float(), dim=-1)

    @torch.no_grad()
    def set_frozen_text_features(self, classnames, templates):
        """The frozen text features of L_SCL-text (textual diversity): for each class the mean of the frozen
        model's unnormalised features over the templates, then normalised; once per class set. [C, D]"""
        names = [c.replace("_", " ") for c in classnames]
        texts = [t.format(name) for name in names for t in templates]  # class-major: [C * T]
        ids = self.prompt_learner.tokenize(texts).to(self.clip.logit_scale.device)  # [C * T, L]
        eot = ids.argmax(-1)
        too_long = [text for text, e in zip(texts, eot.tolist()) if e >= ids.shape[1] - 1]
        data.require(not too_long, f"the template prompt {(too_long or [''])[0]!r} does not fit the text "
                     f"context of {ids.shape[1]} tokens: a class name is too long for the frozen text features")
        features = []
        for chunk, chunk_eot in zip(ids.split(PROMPTS_PER_PASS), eot.split(PROMPTS_PER_PASS)):
            chunk = chunk[:, :int(chunk_eot.max()) + 1]  # exact (causal mask), as the prompted pass
            with autocast(ids.device):
                features.append(self.text_encoder(self.clip.token_embedding(chunk), chunk_eot).float())
        mean = torch.cat(features).view(len(names), len(templates), -1).mean(1)  # [C, D], unnormalised
        self.frozen_text_features = F.normalize(mean, dim=-1)

    def forward(self, x, text_features=None):
        """x: images [B, 3, H, W]. Returns the prompted logits [B, C]."""
        text_features = self.class_text_features() if text_features is None else text_features
        return self.clip.logit_scale.exp() * self.encode_image(x) @ text_features.t()


def use_kernels(device):
    """The fused Triton kernels run where they can (CUDA, or the CPU under TRITON_INTERPRET=1)."""
    return kernels is not None and kernels.kernel_available(device)


def logit_loss(logits, frozen_logits, labels):
    """CE(z_p, y) + L_SCL-logits: the KL from the frozen model's to the prompted model's class distribution,
    KL(softmax(z) || softmax(z_p)) summed over the batch and divided by B*C (the official normalisation, so
    a small weight), at temperature 1 on logits that already carry CLIP's scale. One fused kernel where
    possible; the same in PyTorch otherwise."""
    if use_kernels(logits.device):
        # labels come from the loader; checking them would wait for the device (and break a CUDA graph)
        return kernels.promptsrc_logit_loss(logits, frozen_logits, labels, check_labels=False)
    scl_logits = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(frozen_logits, dim=1), reduction="sum",
                          log_target=True) / logits.numel()
    return F.cross_entropy(logits, labels) + scl_logits


def promptsrc_loss(logits, labels, frozen_logits, text_features, frozen_text_features, image_features,
                   frozen_image_features, text_loss_weight, image_loss_weight):
    """The paper's L = L_CE + L_SCL, L_SCL = L_SCL-logits + lambda_1 L_SCL-image + lambda_2 L_SCL-text
    (the official forward_backward). All features are L2-normalised; everything in fp32."""
    # CE + SCL-logits (mutual agreement of the logits)
    loss = logit_loss(logits, frozen_logits, labels)
    # SCL-text: mean |g_p - g| over the C*D entries of the prompted and the frozen (template mean) text features
    loss = loss + text_loss_weight * F.l1_loss(text_features, frozen_text_features)
    # SCL-image: mean |f_p - f| over the B*D entries of the prompted and the frozen image features
    return loss + image_loss_weight * F.l1_loss(image_features, frozen_image_features)


def sgd(learned, args, device):
    """Dassl's SGD, with the lr in a tensor that the schedule fills in place, so that a captured step
    reads each epoch's value (fused SGD reads it on the GPU; float64 on the CPU is the update of a
    Python float, bit for bit)."""
    lr = torch.tensor(args.lr, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    return torch.optim.SGD(learned, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay,
                           fused=device.type == "cuda")


def train_step(model, optimizer, x, y, frozen_image_features=None):
    """One SGD step on a batch already on the device: images x [B, 3, H, W], labels y [B] and, where they
    were computed once (no random augmentation), the frozen image features [B, D]. Returns (loss, number
    correct) as tensors, so that nothing waits for the device here."""
    with autocast(x.device):
        text_features = model.class_text_features()  # [C, D] prompted
        image_features = model.encode_image(x)  # [B, D] prompted
        logits = (model.clip.logit_scale.exp() * image_features @ text_features.t()).float()  # [B, C]
        if not model.ivlp and frozen_image_features is None:  # this batch's random view, through frozen CLIP
            with torch.no_grad():
                frozen_image_features = model.encode_image(x, prompted=False)
    if model.ivlp:  # IVLP: cross-entropy is the whole objective
        loss = F.cross_entropy(logits, y)
    else:
        frozen_image_features = frozen_image_features.float()
        frozen_logits = model.clip.logit_scale.exp() * frozen_image_features @ model.frozen_text_features.t()
        loss = promptsrc_loss(logits, y, frozen_logits, text_features, model.frozen_text_features,
                              image_features, frozen_image_features, model.text_loss_weight,
                              model.image_loss_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.argmax(-1) == y).sum()


class PromptAverage:
    """Gaussian prompt aggregation (GPA), the readable form of kernels.GaussianPromptAverage (same
    attributes, same numbers): fp32 running averages, after epoch e avg <- lerp(avg, theta_e, g_e / S_e) with
    S_e = g_1 + ... + g_e, so that at the last epoch (S_E = 1) avg = sum_e g_e theta_e, the official sum."""

    def __init__(self, params, n_epochs, mu, sigma):
        self.weights = gpa_weights(n_epochs, mu, sigma)
        self.averages = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
        self.weight_seen = 0.0  # S_e

    @torch.no_grad()
    def update(self, epoch, params):
        """Fold in the prompts at the end of `epoch` (1-based)."""
        g = self.weights[epoch - 1]
        self.weight_seen += g
        factor = g / self.weight_seen if self.weight_seen > 0 else 0.0  # far epochs' weights may underflow to 0
        torch._foreach_lerp_(self.averages, [p.detach().float() for p in params], factor)

    @torch.no_grad()
    def copy_to(self, params):
        torch._foreach_copy_([p.data for p in params], self.averages)


def prompt_average(params, args, device):
    """GPA over the learned prompts: one fused kernel launch per epoch where possible."""
    if use_kernels(device):
        return kernels.GaussianPromptAverage(params, args.epochs, args.gpa_mean, args.gpa_std)
    return PromptAverage(params, args.epochs, args.gpa_mean, args.gpa_std)


# ==== shared block: captured step (identical in every method file) ====
class CapturedStep:
    """A training step recorded once as a CUDA graph and replayed (CUDA only).

    The step's shapes never change (fixed batch size and class set), so its ~1,000 kernels can be
    launched as one graph instead of one by one from Python: the step then takes about its GPU time.
    The optimiser's lr must be a device tensor (the schedule fills it in place), and the update must
    read no host values; recording runs three warm-up steps, after which the learned tensors and the
    optimiser state are put back as they were (state created by the warm-up is zeroed, which is the
    fresh state of SGD with dampening 0 and of Adam with capturable=True). One graph per batch shape."""

    def __init__(self, step, model, optimizer):
        self.step, self.model, self.optimizer, self.graphs = step, model, optimizer, {}

    def __call__(self, *batch):
        shapes = tuple(t.shape for t in batch)
        if shapes not in self.graphs:
            self.graphs[shapes] = self._record(batch)
        graph, inputs, outputs = self.graphs[shapes]
        for static, t in zip(inputs, batch):
            static.copy_(t, non_blocking=True)
        graph.replay()
        return tuple(t.clone() for t in outputs)

    def warm_up(self, inputs, steps=3):
        """Run `steps` steps on `inputs` (the kernels pick their algorithms, the optimiser makes its
        state), then put the learned tensors and the optimiser state back as they were."""
        learned = [p for p in self.model.parameters() if p.requires_grad]
        state = self.optimizer.state
        saved = [(p.detach().clone(), {k: v.clone() for k, v in state[p].items() if torch.is_tensor(v)})
                 for p in learned]
        for _ in range(steps):
            self.step(self.model, self.optimizer, *inputs)
        with torch.no_grad():
            for p, (value, state) in zip(learned, saved):
                p.copy_(value)
                for key, tensor in self.optimizer.state[p].items():
                    if torch.is_tensor(tensor):
                        tensor.copy_(state[key]) if key in state else tensor.zero_()

    def _record(self, batch):
        inputs = [t.clone() for t in batch]  # the graph's own input buffers
        side = torch.cuda.Stream()  # warm-up on a side stream, as CUDA graph capture asks
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.warm_up(inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the graph's memory
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.step(self.model, self.optimizer, *inputs)
        return graph, inputs, outputs
# ==== end shared block ====


# ==== shared block: evaluate (identical in every method file) ====
def autocast(device):
    """The one precision switch: bf16 autocast on CUDA (learned tensors stay fp32), fp32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model, loader) -> dict:
    """Top-1 accuracy in %, micro-averaged over the test items (Dassl's evaluator), and the mean
    cross-entropy (a continuous number: two evaluations that agree on it used the same model).
    model(x, text_features) -> logits [B, C]; model.class_text_features() -> [C, D], or None when
    the text side depends on the image. loader: batches of (images or frozen features, labels)."""
    model.eval()
    device = next(model.parameters()).device
    correct = total = loss = 0
    with autocast(device):
        text_features = model.class_text_features()  # once per evaluation, not per test batch
        for x, labels in tqdm(loader, desc="eval", leave=False):
            logits = model(x.to(device), text_features)
            correct += (logits.argmax(-1) == labels.to(device)).sum().item()
            loss += F.cross_entropy(logits.float(), labels.to(device), reduction="sum").item()
            total += len(labels)
    return {"acc": 100.0 * correct / max(total, 1), "loss": loss / max(total, 1), "n": total}
# ==== end shared block ====


class ZeroShotCLIP(nn.Module):
    """The baseline: CLIP's own text path on the benchmark's hand-written template, e.g. "a photo of a {}."."""

    def __init__(self, clip, tokenize, classnames, template):
        super().__init__()
        self.clip, self.tokenize, self.classnames, self.template = clip, tokenize, classnames, template

    def class_text_features(self):
        ids = self.tokenize([self.template.format(c.replace("_", " ")) for c in self.classnames])
        return F.normalize(self.clip.encode_text(ids.to(self.clip.logit_scale.device)).float(), dim=-1)

    def forward(self, x, text_features=None):
        image_features = F.normalize(self.clip.encode_image(x).float(), dim=-1)
        text_features = self.class_text_features() if text_features is None else text_features
        return self.clip.logit_scale.exp() * image_features @ text_features.t()


# ------------------------------------------------------------------------------------------ the run
def main(args):
    start_time = time.time()
    if args.evaluate:
        return reevaluate(args)
    saved = load_run(args.resume) if args.resume else None
    if saved:  # the run's own settings; only where its data and device live may change
        args = argparse.Namespace(**{**saved["args"], **{k: getattr(args, k) for k in LOCAL_SETTINGS}})
    else:
        args = resolve_settings(args)
    method = "ivlp" if args.ivlp else "promptsrc"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stamp, protocol = time.strftime("%Y%m%d-%H%M%S"), "" if args.protocol == "base2new" else f"{args.protocol}-"
    default_dir = f"runs/{method}-{args.dataset}-{protocol}{args.shots}shot-seed{args.seed}-{stamp}"
    out = Path(args.resume or args.output_dir or default_dir)
    if saved and (out / "results.json").exists():
        raise SystemExit(f"error: {out} is finished (results.json exists): re-evaluate it with "
                         f"--evaluate {out}")
    if not saved and (out / "checkpoint.pt").exists() and not args.overwrite:
        raise SystemExit(f"error: {out} already holds a checkpoint: pass --overwrite to replace the run, "
                         "--resume to continue it, or another --output-dir")
    print(f"{method} on {args.dataset} ({args.protocol}): {args.model}/{args.pretrained}, {args.shots} shots, "
          f"seed {args.seed}, {args.epochs} epochs, batch {args.batch_size}, device {device} -> {out}")

    # Seeding: everything random below (few-shot sampling, prompt init, shuffling) follows args.seed.
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # Data: few-shot on all classes first, then the base half for training (base2new: CoCoOp protocol)
    # or every class (all, cross); the other datasets are read now, so that a missing one stops the run here.
    benchmark = data.load_dataset(args.dataset, args.root, download=args.download)
    targets = {name: data.load_dataset(name, args.root, download=args.download) for name in eval_datasets(args)}
    backbone = data.load_backbone(args.model, args.pretrained, device)
    train_classes = PROTOCOLS[args.protocol]["train_classes"]
    _, train_names = data.subsample_classes(benchmark.test, benchmark.classnames, train_classes)
    model = PromptedCLIP(backbone.model, backbone.tokenize, train_names, args).to(device)
    if not args.ivlp:  # the frozen text features of the training classes (textual diversity), once
        model.set_frozen_text_features(train_names, frozen_templates(args.dataset))
    if not saved:  # only once data, weights and prompts are there: a run that cannot start leaves no folder
        if args.overwrite and (out / "checkpoint.pt").exists():
            shutil.rmtree(out)  # the whole old run goes, so no file of it is left beside the new results
        out.mkdir(parents=True, exist_ok=True)
        data.atomic_write_text(json.dumps(vars(args), indent=2), out / "args.json")
    train_items = data.fewshot(benchmark.train, args.shots, args.seed, cache=out / "fewshot.json")
    train_items, _ = data.subsample_classes(train_items, benchmark.classnames, train_classes)
    train_loader = training_batches(model, train_items, benchmark, backbone, args, device)

    # Optimiser: SGD on the prompts, its lr a tensor the schedule fills in place; GPA over the same tensors.
    learned = [p for p in model.parameters() if p.requires_grad]
    optimizer = sgd(learned, args, device)
    gpa = None if args.ivlp else prompt_average(learned, args, device)
    lr = optimizer.param_groups[0]["lr"]
    if device.type == "cuda" and not args.eager:
        step = CapturedStep(train_step, model, optimizer)  # same step, replayed as one CUDA graph
    else:
        step = lambda *batch: train_step(model, optimizer, *batch)  # noqa: E731
    prompts = model.prompt_learner
    print(f"learning {sum(p.numel() for p in learned):,} parameters (text prompts in "
          f"{len(prompts.text_prompts) + 1} of {len(model.text_encoder.resblocks)} blocks, image prompts in "
          f"{len(prompts.vision_prompts)} of {len(model.image_encoder.visual.transformer.resblocks)}) on "
          f"{len(train_items)} images of "
          f"{len(train_names)} {train_classes} classes")
    start_epoch = restore_training(saved, model, optimizer, train_loader, gpa) if saved else 0

    epochs_bar = tqdm(range(start_epoch, args.epochs), desc="train", initial=start_epoch, total=args.epochs)
    for epoch in epochs_bar:
        lr.fill_(learning_rate(epoch, args))  # Dassl steps the scheduler once per epoch
        step_losses, correct, seen = [], 0, 0
        for batch in tqdm(train_loader, desc=f"epoch {epoch + 1}", leave=False):
            loss, n_correct = step(*(t.to(device, non_blocking=True) for t in batch))
            step_losses.append(loss)
            correct, seen = correct + n_correct, seen + len(batch[1])
        step_losses = torch.stack(step_losses).cpu()  # one wait for the device per epoch
        if not torch.isfinite(step_losses).all():
            bad = int((~torch.isfinite(step_losses)).nonzero()[0])
            raise SystemExit(f"error: the loss became {step_losses[bad].item()} at epoch {epoch + 1}, step "
                             f"{bad + 1} (lr {learning_rate(epoch, args):.3g}); nothing was recorded as a "
                             "result. Lower --lr.")
        if gpa is not None:  # GPA: fold in this epoch's prompts; after the last, they become the model
            gpa.update(epoch + 1, learned)
            if epoch + 1 == args.epochs:
                gpa.copy_to(learned)
        epochs_bar.set_postfix(lr=f"{learning_rate(epoch, args):.2e}", loss=f"{step_losses.mean():.3f}",
                               acc=f"{float(correct) / seen:.3f}")
        save_training(out / "checkpoint.pt", args, epoch + 1, model, optimizer, train_loader, gpa)

    record = evaluate_run(model, benchmark, targets, backbone, train_names, args, device)
    record["wall_s"] = round(time.time() - start_time, 1)
    data.atomic_write_text(json.dumps(record, indent=2), out / "results.json")
    checkpoint = data.load_checkpoint(out / "checkpoint.pt")
    data.atomic_save({**checkpoint, "metrics": record}, out / "checkpoint.pt")
    data.append_result(Path(args.results_file or out.parent / "results.jsonl"), record)
    print(f"wrote {out / 'results.json'}, {out / 'checkpoint.pt'}")
    return record


def training_batches(model, items, benchmark, backbone, args, device):
    """Training batches of (images, labels), plus the frozen image features where no random augmentation
    applies: the frozen encoder then gives every image the same feature in every epoch, so it runs once."""
    if benchmark.augment:  # random crops and flips: the frozen features come per batch, in train_step
        return data.make_loader(items, benchmark, backbone, True, args.batch_size, args.seed, args.workers)
    print(f"no training augmentation on {args.dataset}: keeping the {len(items)} training images and their "
          "frozen image features (computed once, exact)")
    plain = data.make_loader(items, benchmark, backbone, False, args.test_batch_size, args.seed, args.workers)
    images, labels = (torch.cat(t) for t in zip(*plain))
    tensors = [images, labels]
    if not args.ivlp:
        with torch.no_grad(), autocast(device):
            tensors.append(torch.cat([model.encode_image(x.to(device), prompted=False).cpu()
                                      for x in images.split(args.test_batch_size)]))
    return DataLoader(TensorDataset(*tensors), batch_size=args.batch_size, shuffle=True,
                      drop_last=len(images) >= args.batch_size,
                      generator=torch.Generator().manual_seed(args.seed))


def evaluate_run(model, benchmark, targets, backbone, train_names, args, device) -> dict:
    """Accuracy of the learned prompts and of zero-shot CLIP on the protocol's test sets (evaluation_sets);
    prints the table, returns the record."""
    splits = evaluation_sets(benchmark, targets, train_names, args.protocol)
    method_name = "IVLP" if args.ivlp else "PromptSRC"
    rows, test_loss = {"zero-shot CLIP": {}, method_name: {}}, {}
    for split, (items, names, source) in splits.items():
        loader = data.make_loader(items, source, backbone, False, args.test_batch_size, args.seed,
                                  args.workers)
        model.prompt_learner.set_classes(names)
        metrics = evaluate(model, loader)  # the prompted image encoder on every test image
        rows[method_name][split], test_loss[split] = metrics["acc"], metrics["loss"]
        zero_shot = ZeroShotCLIP(backbone.model, backbone.tokenize, names, source.template)
        rows["zero-shot CLIP"][split] = evaluate(zero_shot, loader)["acc"]
    model.prompt_learner.set_classes(train_names)
    for row in rows.values():
        row["hm"] = data.harmonic_mean(row["base"], row["new"]) if "new" in row else None

    head = ["base", "new", "hm"] if args.protocol == "base2new" else ["all"]
    columns = [*head, *benchmark.shifts, *targets]
    print(f"\n{args.dataset} ({args.protocol}), {args.shots} shots, seed {args.seed}, epoch {args.epochs}, "
          f"{backbone.name}/{backbone.pretrained}")
    width = {c: max(12, len(c) + 1) for c in columns}
    print(f"{'':16}" + "".join(f"{c:>{width[c]}}" for c in columns))
    for name, row in rows.items():
        cells = [f"{row[c]:{width[c]}.2f}" if row.get(c) is not None else f"{'-':>{width[c]}}"
                 for c in columns]
        print(f"{name:16}" + "".join(cells))
    ours = rows[method_name]
    return dict(method="ivlp" if args.ivlp else "promptsrc", protocol=args.protocol, dataset=args.dataset,
                backbone=backbone.name, pretrained=backbone.pretrained, shots=args.shots, seed=args.seed,
                epoch=args.epochs, base=ours.get("base"), new=ours.get("new"), hm=ours["hm"],
                all=ours.get("all"),
                shifts={s: ours[s] for s in benchmark.shifts if s in ours},
                transfer={t: ours[t] for t in targets if t in ours}, zero_shot=rows["zero-shot CLIP"],
                test_loss=test_loss, classes={split: len(names) for split, (_, names, _) in splits.items()},
                args=vars(args))


def evaluation_sets(benchmark, targets, train_names, protocol) -> dict:
    """{split: (items, classnames, benchmark they come from)}, each split in the label space it is tested in.
    base2new: the base and new halves, and the shifted sets restricted to the base classes. all, cross:
    the whole test set, and each shifted set in its own label space (the classes it holds). Then the
    other datasets (targets), each on its whole test set with all its classes."""
    if protocol == "base2new":
        splits = {half: (*data.subsample_classes(benchmark.test, benchmark.classnames, half), benchmark)
                  for half in ("base", "new")}
        splits.update({name: (data.shift_items(items, train_names), train_names, benchmark)
                       for name, items in benchmark.shifts.items()})
    else:
        splits = {"all": (benchmark.test, benchmark.classnames, benchmark)}
        splits.update({name: (*data.own_classes(items, benchmark.classnames), benchmark)
                       for name, items in benchmark.shifts.items()})
    splits.update({name: (target.test, target.classnames, target) for name, target in targets.items()})
    return splits


# ------------------------------------------------------------------------------------------ saved runs
def save_training(path, args, epoch, model, optimizer, train_loader, gpa):
    """After each epoch, atomically: the learned prompts (after the last epoch: GPA's), the GPA state and
    everything the next epoch depends on (the optimiser state, the random states of Python, NumPy, torch
    and the loader's shuffling). Plain tensors, numbers and strings only, so that it loads with
    weights_only=True."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    data.atomic_save({
        "learned": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "args": vars(args), "epoch": epoch, "metrics": None,
        "optimizer": optimizer.state_dict(),
        "gpa": None if gpa is None else {"averages": [a.detach().cpu() for a in gpa.averages],
                                         "weight_seen": gpa.weight_seen},
        "rng": {"python": [python_state[0], list(python_state[1]), python_state[2]],
                "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
                "torch": torch.get_rng_state(), "loader": train_loader.generator.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }, path)


def load_run(run_dir):
    """The checkpoint of a run folder, read as tensors only (a shared run folder cannot run code); a
    missing or damaged file is a UsageError that names it."""
    return data.load_checkpoint(Path(run_dir) / "checkpoint.pt")


@torch.no_grad()
def load_learned(model, learned):
    """Copy saved learned tensors ({parameter name: tensor}, as save_training writes them) into the model."""
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.copy_(learned[name])


def restore_training(saved, model, optimizer, train_loader, gpa):
    """Put a saved epoch back (see save_training); returns the number of epochs already done."""
    load_learned(model, saved["learned"])
    lr = optimizer.param_groups[0]["lr"]
    optimizer.load_state_dict(saved["optimizer"])
    for group in optimizer.param_groups:  # keep the one lr tensor the schedule fills
        group["lr"] = lr
    if gpa is not None:
        torch._foreach_copy_(gpa.averages, saved["gpa"]["averages"])
        gpa.weight_seen = saved["gpa"]["weight_seen"]
    rng = saved["rng"]
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy().astype(np.uint32), *rng["numpy"][2:]))
    torch.set_rng_state(rng["torch"])
    train_loader.generator.set_state(rng["loader"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    print(f"resuming after epoch {saved['epoch']} of {saved['args']['epochs']}")
    return saved["epoch"]


def reevaluate(args):
    """Evaluate a finished run's learned prompts (GPA's) again with its saved settings, on the datasets of
    --eval-datasets when given (else the run's own); writes RUN_DIR/eval.json and nothing else (the run's
    results and the results file are left as they are)."""
    run_dir = Path(args.evaluate)
    saved = load_run(run_dir)
    if saved["epoch"] < saved["args"]["epochs"]:
        raise SystemExit(f"error: {run_dir} stopped after epoch {saved['epoch']} of {saved['args']['epochs']}: "
                         f"finish it with --resume {run_dir}")
    other_datasets = args.eval_datasets
    args = argparse.Namespace(**{**saved["args"], **{k: getattr(args, k) for k in LOCAL_SETTINGS}})
    args.eval_datasets = other_datasets or args.eval_datasets
    check_settings(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)  # as in main: a random-init backbone ('none') gets the same weights
    benchmark = data.load_dataset(args.dataset, args.root, download=False)
    targets = {name: data.load_dataset(name, args.root, download=False) for name in eval_datasets(args)}
    backbone = data.load_backbone(args.model, args.pretrained, device)
    train_classes = PROTOCOLS[args.protocol]["train_classes"]
    _, train_names = data.subsample_classes(benchmark.test, benchmark.classnames, train_classes)
    model = PromptedCLIP(backbone.model, backbone.tokenize, train_names, args).to(device)
    load_learned(model, saved["learned"])
    record = evaluate_run(model, benchmark, targets, backbone, train_names, args, device)
    data.atomic_write_text(json.dumps(record, indent=2), run_dir / "eval.json")
    return record


if __name__ == "__main__":
    try:
        main(parse_args())
    except data.UsageError as error:  # a mistake the user can fix: one line that says what to do, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
