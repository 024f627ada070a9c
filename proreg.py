"""ProReg: fine-tuning CLIP's image encoder, regularised by CLIP's own zero-shot prompt prediction, in one file.

ProReg Zhu, Niu, Lee, Hur, Zhang. "Debiased Fine-Tuning for Vision-language Models by Prompt
       Regularization." AAAI 2023. https://arxiv.org/abs/2301.12429 (code: BeierZhu/ProReg)

Fine-tuning CLIP on a downstream training set that is biased (each class mostly in one context) learns
the bias. ProReg fine-tunes the whole image encoder with a linear head initialised from the zero-shot
prompt features ("a photo of a [CLASS].") and a trainable logit scale, and regularises it by the frozen
model's prompt prediction, which knows nothing of the task's bias: per sample, cross-entropy to the
label and KL to the prompt prediction, mixed by a sample-wise weight that moves towards the KL term
where the zero-shot prediction is confident about the true class:

    w = stopgrad( p_zs(y|x)^10 / (p_ft(y|x) + p_zs(y|x)^10 + 1e-5) )           (official losses.py: xERM)
    L = mean_i (1 - w_i) CE(z_ft_i, y_i)  +  alpha * mean_i w_i KL(p_zs_i || p_ft_i)

  python proreg.py                                      # offline world, biased task (shapes_biased)
  python proreg.py --method finetune                    # baselines: finetune, fixed, ensemble, zeroshot
  python proreg.py --dataset caltech101 --root ~/data   # ViT-B/16 openai, the whole training split
  torchrun --nproc_per_node 4 proreg.py --dataset caltech101 --root ~/data   # 4 GPUs, same global batch
  python proreg.py --resume runs/proreg-...             # continue a killed run
  python proreg.py --evaluate runs/proreg-...           # re-evaluate a finished run

Methods (--method): proreg (the paper); finetune (CE only, the same prompt-initialised head: the official
prompt_finetune); fixed ((1 - a) CE + a KL with one global a = --fixed-alpha: the official
knowledge_distill); ensemble (fine-tune, then predict with (1 - a) z_ft + a z_zs, a = --ensemble-alpha:
the official ensemble_test); zeroshot (no training: the initial model is zero-shot CLIP). Every run
also records zero-shot CLIP and the output ensemble of its own model on every test set.

Protocols (--protocol): all (default, the paper's: train and test on every class; the shifted test sets
each in its own label space); base2new (train on the base half; new classes are scored with their
zero-shot prompt features and the fine-tuned image encoder); cross (as all, then other datasets, scored
as new classes).

Differs from the official code (BeierZhu/ProReg, a ViLT/Lightning scaffold around OpenAI's clip) in:
- open_clip instead of OpenAI's clip package (QuickGELU forced for the `openai` weights, data.py);
  bf16 autocast on CUDA with fp32 weights, where the official code trains in fp16 (Lightning precision 16).
- the frozen teacher is not a second model: where the training transform is deterministic (the offline
  world), the teacher's logits of every training image are computed once before training, with the
  very weights that are then fine-tuned; zero-shot features of every test set likewise. Only with
  random augmentation (real data), and only for the objectives that read the teacher (proreg, fixed), is
  a frozen copy of the image encoder kept (no text tower copy: its class features are a fixed [C, D]
  tensor).
- the weight formula: --weight code (default) is the active form of the official losses.py, quoted
  above. The paper's printed formula could not be read here (only its abstract was reachable), so
  --weight xerm offers the form left commented out beside it, w = CE_ft / (CE_ft + CE_zs + 1e-5)
  (the xERM paper's weight, gamma = 1), without a claim that the paper prints it; the code's form is the
  default because it is the one the authors ran.
- weight decay 0.01 spares biases and every LayerNorm parameter (the intent of the official no_decay
  list; its names, 'norm.weight' etc., do not match CLIP's 'ln_1.weight', so there LayerNorm weights
  do decay); the head (class embeddings, logit scale) decays as in the official code.
- RandAugment is torchvision's RandAugment(2, 9) where the official code ships its own port; each image's
  draw comes from a generator seeded by (seed, epoch, image index), so that the augmentation does not
  depend on worker or process layout (exact resume, DistributedDataParallel = one process). The offline
  world is not augmented (data.Benchmark.augment: a colour or geometric op would change its classes).
- the global batch is one seeded permutation per epoch, cut into batches of --batch-size (the last
  incomplete one dropped, as Dassl does) and split evenly over processes and accumulation steps, so
  that N processes x K steps of B / (N K) give the update of one process with B (DDP averages).
- the last epoch is evaluated (the official code keeps the best validation checkpoint, every half epoch).
- alpha per dataset: the official configs cover DomainNet, PACS, NICO, BAR (2, 2, 2 / 1.5, 1); the
  CoOp datasets have none, so they take 2, the value of most of them (DATASET_SETTINGS).
- the offline world: batch 32 instead of 256 (576 training images: 256 would give 20 steps in all); its
  tiny CLIP's pretraining patch dropout is switched off for fine-tuning (OpenAI CLIP has none).
"""
import argparse
import contextlib
import copy
import functools
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data

try:  # the fused Triton loss; the readable PyTorch form below is used where it cannot run
    import kernels
except ImportError:  # a copy of this file without kernels/ beside it
    kernels = None


# ------------------------------------------------------------------------------------------ settings
# Paper defaults (vilt/config.py task_finetune_*, the xERM configs), then per-dataset exceptions; a flag
# given on the command line wins over both.
PAPER = dict(epochs=10, batch_size=256, lr=1e-5, head_lr_mult=100.0, weight_decay=0.01, warmup=0.1,
             alpha=2.0, fixed_alpha=0.5, ensemble_alpha=0.5)
DATASET_SETTINGS = {
    # The offline world (every 'shapes...' benchmark): 576 training images on the biased task; at the
    # paper's batch of 256 ten epochs are 20 steps, too few to move the image encoder at lr 1e-5.
    "shapes": dict(batch_size=32),
}
PROTOCOLS = {"all": dict(train_classes="all"), "base2new": dict(train_classes="base"),
             "cross": dict(train_classes="all")}
METHODS = ("proreg", "finetune", "fixed", "ensemble", "zeroshot")
# Settings of a run that may change when it is resumed or re-evaluated elsewhere (nothing numeric).
LOCAL_SETTINGS = ("resume", "evaluate", "root", "device", "workers", "test_batch_size", "eager", "results_file",
                  "loss_impl")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset", default="shapes_biased",
      help="benchmark name for data.load_dataset (shapes_biased = the offline world's biased task; "
           "paper: DomainNet, PACS, NICO, BAR; here also the 11 CoOp datasets, e.g. caltech101)")
    a("--root", default="~/data", help="folder holding the datasets in CoOp's layout")
    a("--download", action="store_true", help="let data.py download what torchvision can download")
    a("--model", default=None, help="open_clip model name; default: data.default_backbone(dataset) (ViT-B-16)")
    a("--pretrained", default=None,
      help="open_clip pretrained tag, 'none' for random init; required with --model (paper: openai)")
    a("--method", default="proreg", choices=METHODS,
      help="proreg; finetune (CE only); fixed ((1-a) CE + a KL); ensemble (finetune, then (1-a) z_ft + a z_zs); "
           "zeroshot (no training)")
    a("--weight", default="code", choices=["code", "xerm"],
      help="ProReg's sample weight: code = p_zs^10 / (p_ft + p_zs^10 + 1e-5) (official, active); "
           "xerm = CE_ft / (CE_ft + CE_zs + 1e-5) (official, commented out)")
    a("--alpha", type=float, default=None, help="ProReg's KL weight alpha (official configs: 1 to 2; default 2)")
    a("--fixed-alpha", type=float, default=None,
      help="--method fixed: a in (1-a) CE + a KL (official configs: 0.5, NICO-animal 0.9)")
    a("--ensemble-alpha", type=float, default=None,
      help="output ensemble (1-a) z_ft + a z_zs (official configs: 0.9 BAR, 0.1 NICO-animal; here 0.5)")
    a("--protocol", default="all", choices=list(PROTOCOLS),
      help="all: train and test on every class (the paper); base2new: train on the base half, new classes "
           "scored with their zero-shot prompt features; cross: as all, then --eval-datasets")
    a("--eval-datasets", default=None, metavar="A,B,C",
      help="other datasets to test on after training, each in its own label space (default for --protocol "
           "cross: data.transfer_targets)")
    a("--shots", type=int, default=0, help="training images per class; 0 = the whole training split (paper)")
    a("--epochs", type=int, default=None, help="training epochs (paper: 10)")
    a("--batch-size", type=int, default=None,
      help="global batch over all processes and accumulation steps (paper: 256 = 4 GPUs x 16 x accumulation; "
           "the world: 32)")
    a("--grad-accum", type=int, default=1,
      help="split each process's share of a batch into this many sequential steps (same update, less memory)")
    a("--checkpointing", action="store_true",
      help="activation checkpointing in the image encoder (same update, less memory, ~30%% more compute)")
    a("--lr", type=float, default=None, help="AdamW lr of the image encoder (paper: 1e-5)")
    a("--head-lr-mult", type=float, default=None, help="lr multiplier of the head and the logit scale (paper: 100)")
    a("--weight-decay", type=float, default=None, help="AdamW weight decay, not on biases and norms (paper: 0.01)")
    a("--warmup", type=float, default=None, help="linear warm-up over this fraction of the steps, then "
                                                 "linear decay to 0 (paper: 0.1)")
    a("--test-batch-size", type=int, default=100, help="evaluation batch size")
    a("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loader worker processes")
    a("--seed", type=int, default=1, help="seed for sampling, shuffling and augmentation (here: 1, 2, 3)")
    a("--loss-impl", default="auto", choices=["auto", "kernel", "torch"],
      help="auto: the fused Triton loss where kernels.kernel_available(device), else the PyTorch form")
    a("--eager", action="store_true",
      help="CUDA: run each training step op by op instead of replaying its CUDA graph (same numbers)")
    a("--output-dir", default=None, help="run folder; default runs/proreg-<method>-<dataset>-seed<seed>-<time>")
    a("--overwrite", action="store_true", help="replace a run folder that already holds a checkpoint")
    a("--results-file", default=None, help="JSON-lines file that gets one line per run; default "
                                           "<output-dir>/../results.jsonl")
    a("--resume", default=None, metavar="RUN_DIR", help="continue a run from its last completed epoch")
    a("--evaluate", default=None, metavar="RUN_DIR",
      help="re-evaluate a finished run with its saved settings; writes RUN_DIR/eval.json")
    a("--device", default=None, help="torch device; default cuda if available, else cpu")
    return p.parse_args(argv)


def resolve_settings(args):
    """Fill the settings left at None: command line > DATASET_SETTINGS > paper default; then check them."""
    dataset = "shapes" if args.dataset.startswith(data.WORLD_PREFIX) else args.dataset
    for key, value in {**PAPER, **DATASET_SETTINGS.get(dataset, {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.method == "zeroshot":
        args.epochs = 0  # nothing is trained: the initial model is zero-shot CLIP
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


def check_settings(args, world_size=1):
    """Refuse, before anything is written, a setting that would run and give wrong numbers (a
    data.UsageError: one line that names the value)."""
    data.check_int("--epochs", args.epochs, 0 if args.method == "zeroshot" else 1)
    for name in ("batch_size", "grad_accum", "test_batch_size"):
        data.check_int(f"--{name.replace('_', '-')}", getattr(args, name), 1)
    for name in ("shots", "workers"):
        data.check_int(f"--{name}", getattr(args, name), 0)
    data.check_float("--lr", args.lr, above=0)
    data.check_float("--head-lr-mult", args.head_lr_mult, above=0)
    data.check_float("--weight-decay", args.weight_decay, minimum=0)
    data.check_float("--warmup", args.warmup, minimum=0, below=1)
    data.check_float("--alpha", args.alpha, minimum=0)
    data.check_float("--fixed-alpha", args.fixed_alpha, minimum=0)
    data.check_float("--ensemble-alpha", args.ensemble_alpha, minimum=0)
    share = world_size * args.grad_accum
    data.require(args.batch_size % share == 0, f"--batch-size {args.batch_size} does not split into {world_size} "
                 f"processes x --grad-accum {args.grad_accum}: use a multiple of {share}")
    data.require(args.loss_impl != "kernel" or args.weight == "code" or args.method != "proreg",
                 "--loss-impl kernel computes the official weight only: use --weight code or --loss-impl torch")
    data.require(args.protocol != "cross" or eval_datasets(args), f"--protocol cross names no default "
                 f"targets for {args.dataset}: list them with --eval-datasets")


def eval_datasets(args):
    """The other datasets a run is tested on (--eval-datasets), as a list."""
    return [name.strip() for name in (getattr(args, "eval_datasets", None) or "").split(",") if name.strip()]


def lr_factor(step, total, warmup):
    """transformers' polynomial schedule with power 1 and end lr 0 (official set_schedule), per step:
    linear warm-up from 0 over int(warmup * total) steps, then linear decay to 0 at `total`."""
    warm = int(warmup * total)
    if step < warm:
        return step / warm
    return max(0.0, (total - step) / max(1, total - warm))


# ==== shared block: text encoder (identical in every method file) ====
class TextEncoder(nn.Module):
    """CLIP's text tower fed prompt embeddings instead of token ids (open_clip CLIP, batch-first).

    The causal mask lets position i attend only to positions <= i, so the end-of-text (EOT) feature,
    which is all CLIP uses, never depends on later positions: prompts cut after the longest prompt's
    EOT (as the prompt learner builds them) give exactly the features of the full context."""

    def __init__(self, clip):
        super().__init__()
        assert clip.transformer.batch_first and clip.text_pool_type == "argmax", "needs open_clip's text tower"
        self.resblocks = clip.transformer.resblocks
        self.positional_embedding = clip.positional_embedding  # [L, d]
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection  # [d, D]
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)  # [L, L], -inf above the diagonal

    def forward(self, prompts, eot):
        """prompts: [N, n, d] token embeddings (n <= L); eot: [N] EOT positions. Returns features [N, D]."""
        n = prompts.shape[1]
        x = prompts + self.positional_embedding[:n]  # [N, n, d]
        for block in self.resblocks:
            x = block(x, attn_mask=self.attn_mask[:n, :n])
        x = self.ln_final(x)
        return x[torch.arange(len(x), device=x.device), eot] @ self.text_projection  # [N, D]
# ==== end shared block ====


# ------------------------------------------------------------------------------------------ the method
@torch.no_grad()
def prompt_features(clip, tokenize, classnames, template):
    """Zero-shot prompt features of the classes, "a photo of a {class}." through the frozen text tower,
    not normalised (the official head starts from these) -> [C, D]."""
    ids = tokenize([template.format(c.replace("_", " ")) for c in classnames]).to(clip.logit_scale.device)
    cut = int(ids.argmax(-1).max()) + 1  # positions after the last EOT never reach a feature
    return TextEncoder(clip)(clip.token_embedding(ids[:, :cut]), ids.argmax(-1)).float()


class FineTunedCLIP(nn.Module):
    """The student: CLIP's image encoder (trained), a head of class embeddings initialised from the zero-shot
    prompt features (trained, L2-normalised in the forward pass), and the logit scale (trained).
    logits = exp(logit_scale) * cos(f_theta(x), t_c), which at step 0 are zero-shot CLIP's logits."""

    def __init__(self, clip, class_embeddings):
        super().__init__()
        if not isinstance(getattr(clip.visual, "patch_dropout", nn.Identity()), nn.Identity):
            # a pretraining device (the world's tiny CLIP has patch dropout 0.5 in its config; OpenAI CLIP none),
            # active in train mode only: fine-tuning sees every patch, as the frozen teacher does
            clip.visual.patch_dropout = nn.Identity()
        self.visual = clip.visual.requires_grad_(True)  # the same module: no copy of the weights
        self.class_embeddings = nn.Parameter(class_embeddings.clone())  # [C, D]
        self.logit_scale = nn.Parameter(clip.logit_scale.detach().clone())  # log 100 for OpenAI CLIP

    def encode_image(self, images):  # [B, 3, H, W] -> L2-normalised [B, D]
        return F.normalize(self.visual(images).float(), dim=-1)

    def class_text_features(self):
        return F.normalize(self.class_embeddings.float(), dim=-1)  # [C, D]

    def forward(self, x, text_features=None):
        """x: images [B, 3, H, W], or image features [B, D] already encoded (evaluation)."""
        image_features = x if x.dim() == 2 else self.encode_image(x)
        text_features = self.class_text_features() if text_features is None else text_features
        return self.logit_scale.exp() * image_features @ text_features.t()  # [B, C]


class Classifier(nn.Module):
    """Fixed class features and logit scale over encoded images: the zero-shot classifier (the frozen
    prompt features, CLIP's scale), or the fine-tuned encoder's scale over new classes' prompt features."""

    def __init__(self, text_features, logit_scale):
        super().__init__()
        self.text_features = nn.Parameter(F.normalize(text_features.float(), dim=-1), requires_grad=False)
        self.logit_scale = nn.Parameter(logit_scale.detach().clone(), requires_grad=False)

    def class_text_features(self):
        return self.text_features

    def forward(self, x, text_features=None):  # x: normalised image features [B, D]
        return self.logit_scale.exp() * x @ (self.text_features if text_features is None else text_features).t()


class OutputEnsemble(nn.Module):
    """(1 - a) z_ft + a z_zs (official ensemble_test). x: [B, 2D], the fine-tuned and the frozen encoder's
    features of the same images side by side."""

    def __init__(self, fine_tuned, zero_shot, a):
        super().__init__()
        self.fine_tuned, self.zero_shot, self.a = fine_tuned, zero_shot, a

    def class_text_features(self):
        return None

    def forward(self, x, text_features=None):
        f_ft, f_zs = x.chunk(2, dim=-1)
        return (1 - self.a) * self.fine_tuned(f_ft) + self.a * self.zero_shot(f_zs)


# --- the objectives (readable PyTorch; kernels.proreg_loss / fused_kl_ce compute the same fused) ---
def proreg_weight(ce_ft, ce_zs, form):
    """ProReg's sample weight w [B] from the per-sample CEs, detached (official: w_t.detach())."""
    ce_ft, ce_zs = ce_ft.detach(), ce_zs.detach()
    if form == "code":  # losses.py xERM (active): p_zs^10 / (p_ft + p_zs^10 + 1e-5)
        p_zs10 = torch.exp(-10 * ce_zs)
        return p_zs10 / (torch.exp(-ce_ft) + p_zs10 + 1e-5)
    return ce_ft / (ce_ft + ce_zs + 1e-5)  # xerm: the commented-out form, gamma = 1


def proreg_terms(logits, zs_logits, labels, form="code"):
    """Per sample: CE to the label, the prompt-regularisation term and the weight -> ([B], [B], [B]).
    The KL term is the official soft-target cross-entropy -sum_c p_zs(c) log p_ft(c) (T = 1): KL(p_zs || p_ft)
    plus the teacher's entropy, a constant, so the same gradient."""
    ce_ft = F.cross_entropy(logits, labels, reduction="none")  # [B]
    ce_zs = F.cross_entropy(zs_logits, labels, reduction="none")  # [B]
    kl = -(F.softmax(zs_logits, dim=-1) * F.log_softmax(logits, dim=-1)).sum(-1)  # [B]
    return ce_ft, kl, proreg_weight(ce_ft, ce_zs, form)


def objective(logits, zs_logits, labels, args, use_kernel):
    """The training loss of --method on fp32 logits [B, C] (student) and zs_logits [B, C] (teacher)."""
    if args.method in ("finetune", "ensemble"):  # CE only (official prompt_finetune)
        return F.cross_entropy(logits, labels)
    if args.method == "fixed":  # (1 - a) CE + a KL, one global a (official knowledge_distill)
        if use_kernel:
            return kernels.fused_kl_ce(logits, zs_logits, labels, ce_weight=1 - args.fixed_alpha,
                                       kl_weight=args.fixed_alpha, kl_form="soft_ce", check_labels=False)
        ce, kl, _ = proreg_terms(logits, zs_logits, labels)
        return (1 - args.fixed_alpha) * ce.mean() + args.fixed_alpha * kl.mean()
    if use_kernel:  # ProReg, fused: one pass over the logits, the gradient written in the forward pass
        # check_labels=False: the labels are the dataset's own, and the check would wait for the device
        # (not allowed inside a CUDA graph)
        return kernels.proreg_loss(logits, zs_logits, labels, alpha=args.alpha, kl_form="soft_ce", check_labels=False)
    ce, kl, w = proreg_terms(logits, zs_logits, labels, args.weight)
    return ((1 - w) * ce).mean() + args.alpha * (w * kl).mean()  # CE, prompt regularisation


def adamw(model, args, device):
    """The official set_schedule: AdamW (0.9, 0.98), eps 1e-8; the head (class embeddings, logit scale)
    at lr x head_lr_mult; weight decay on every matrix and the head, not on biases and norms. On CUDA the
    lrs are tensors (a captured step reads them on the device) and the update is fused."""
    model = model.module if isinstance(model, DistributedDataParallel) else model
    groups = {}
    for name, p in model.named_parameters():
        head = not name.startswith("visual.")
        decay = head or (p.ndim >= 2 and "ln_" not in name) or name.endswith(("class_embedding", "positional_embedding"))
        groups.setdefault((head, decay), []).append(p)
    cuda = device.type == "cuda"
    param_groups = [dict(params=ps, weight_decay=args.weight_decay if decay else 0.0,
                         base_lr=args.lr * (args.head_lr_mult if head else 1.0)) for (head, decay), ps in groups.items()]
    for g in param_groups:
        g["lr"] = torch.tensor(g["base_lr"], device=device) if cuda else g["base_lr"]
    return torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-8,
                             fused=cuda, capturable=cuda)


def set_lr(optimizer, factor):
    for g in optimizer.param_groups:
        if torch.is_tensor(g["lr"]):
            g["lr"].fill_(g["base_lr"] * factor)
        else:
            g["lr"] = g["base_lr"] * factor


def train_step(model, optimizer, x, y, zs_logits, args, use_kernel):
    """One AdamW step on this process's share of a batch (x [b, 3, H, W], y [b], zs_logits [b, C] on the
    device), in --grad-accum sequential parts. Under DDP the gradients are averaged over processes once,
    at the last part. Returns (loss, number correct) as tensors: nothing waits for the device here."""
    optimizer.zero_grad(set_to_none=True)
    parts = args.grad_accum
    loss_sum, correct = 0.0, 0
    for k, (xp, yp, zp) in enumerate(zip(x.chunk(parts), y.chunk(parts), zs_logits.chunk(parts))):
        last = k == parts - 1
        sync = contextlib.nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync()
        with sync:
            with autocast(x.device):
                logits = model(xp)  # [b / parts, C]
            loss = objective(logits.float(), zp.float(), yp, args, use_kernel)
            (loss / parts).backward()
        loss_sum = loss_sum + loss.detach() / parts
        correct = correct + (logits.argmax(-1) == yp).sum()
    optimizer.step()
    return loss_sum, correct


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


@torch.no_grad()
def encode_images(encoder, loader, device):
    """L2-normalised image features of a whole split through `encoder` (an image tower): [N, D], labels [N]."""
    encoder.eval()
    features, labels = [], []
    for images, y in tqdm(loader, desc="image features", leave=False):
        with autocast(device):
            features.append(F.normalize(encoder(images.to(device)).float(), dim=-1))
        labels.append(y)
    return torch.cat(features), torch.cat(labels).to(device)


# ------------------------------------------------------------------------------------------ the data
class IndexedItems(data.ImageItems):
    """(image, label, index) of a list of items; with `augment`, each image's RandAugment draw comes from a
    generator seeded by (seed, epoch, index), whatever process or worker loads it."""

    def __init__(self, items, open_image, transform, seed, augment):
        super().__init__(items, open_image, transform)
        self.seed, self.epoch, self.augment = seed, 0, augment

    def __getitem__(self, i):
        if not self.augment:
            return (*super().__getitem__(i), i)
        with torch.random.fork_rng(devices=[]):  # torchvision's RandAugment draws from torch's global RNG
            torch.manual_seed(hash((self.seed, self.epoch, i)) % 2 ** 63)
            return (*super().__getitem__(i), i)


def train_transform(benchmark, backbone):
    """RandAugment(2, 9) before CLIP's preprocessing where the benchmark is augmented (real data), CLIP's
    preprocessing alone otherwise (the offline world)."""
    from torchvision import transforms as T

    plain = data.make_transform(backbone, train=False)  # shorter side to the input size, centre crop, normalise
    return T.Compose([T.RandAugment(2, 9), *plain.transforms]) if benchmark.augment else plain


def epoch_batches(n, batch_size, seed, epoch, rank=0, world_size=1):
    """This process's share of every global batch of one epoch, as index lists: one permutation seeded by
    (seed, epoch), cut into batches of batch_size (the last incomplete one dropped), each split into
    world_size contiguous shares. Every process, and a resumed run, draws the same permutation."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    share = batch_size // world_size
    return [order[b * batch_size + rank * share: b * batch_size + (rank + 1) * share] for b in range(n // batch_size)]


class TrainingSet:
    """The training images with their teacher logits. Deterministic transform: every image preprocessed once
    ([N, 3, H, W]) and its zero-shot logits computed once with the frozen encoder, before any update. Random
    augmentation: a loader, and a frozen copy of the image encoder that scores each augmented batch, for the
    objectives that read the teacher (proreg, fixed); the others (cross-entropy only) get zeros in its place."""

    def __init__(self, items, benchmark, backbone, zs_text, args, device):
        self.args, self.device, self.n = args, device, len(items)
        self.labels = torch.tensor([it.label for it in items])
        self.dataset = IndexedItems(items, benchmark.open_image, train_transform(benchmark, backbone), args.seed,
                                    benchmark.augment)
        self.zs_text, self.zs_scale = F.normalize(zs_text, dim=-1), backbone.model.logit_scale.exp().detach()
        if benchmark.augment:
            self.images = self.teacher_logits = None
            needs_teacher = args.method in ("proreg", "fixed")  # finetune / ensemble: CE only, no second encoder
            self.teacher = copy.deepcopy(backbone.model.visual).eval().requires_grad_(False) if needs_teacher else None
        else:
            print(f"no training augmentation on {args.dataset}: the teacher's logits of the {self.n} training "
                  f"images are computed once, before training (exact)")
            self.images = torch.stack([self.dataset[i][0] for i in range(self.n)])  # [N, 3, H, W]
            self.teacher, logits = backbone.model.visual, []
            for chunk in self.images.split(args.test_batch_size):
                logits.append(self.zero_shot_logits(chunk.to(device)))
            self.teacher_logits, self.teacher = torch.cat(logits), None  # [N, C]; no reference to the encoder

    @torch.no_grad()
    def zero_shot_logits(self, images):
        self.teacher.eval()
        with autocast(images.device):
            features = F.normalize(self.teacher(images).float(), dim=-1)
        return self.zs_scale * features @ self.zs_text.t()  # [b, C]

    def batches(self, epoch, rank, world_size):
        """(images, labels, teacher logits) on the device, this process's share of each batch of the epoch."""
        index_lists = epoch_batches(self.n, self.args.batch_size, self.args.seed, epoch, rank, world_size)
        if self.images is not None:
            for idx in index_lists:
                idx = torch.tensor(idx)
                yield (self.images[idx].to(self.device), self.labels[idx].to(self.device),
                       self.teacher_logits[idx].to(self.device))
            return
        self.dataset.epoch = epoch
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=index_lists, num_workers=self.args.workers,
                                             pin_memory=self.device.type == "cuda")
        for x, y, _ in loader:
            x = x.to(self.device, non_blocking=True)
            zs_logits = self.zero_shot_logits(x) if self.teacher is not None else x.new_zeros(len(x), len(self.zs_text))
            yield x, y.to(self.device, non_blocking=True), zs_logits


# ------------------------------------------------------------------------------------------ the run
def main(args):
    start_time = time.time()
    if args.evaluate:
        return reevaluate(args)
    rank, world_size = setup_distributed()
    saved = load_run(args.resume) if args.resume else None
    if saved:  # the run's own settings; only where its data and device live may change
        args = argparse.Namespace(**{**saved["args"], **{k: getattr(args, k) for k in LOCAL_SETTINGS}})
    else:
        args = resolve_settings(args)
    check_settings(args, world_size)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if world_size > 1 and torch.cuda.is_available()
                          else args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    protocol = "" if args.protocol == "all" else f"{args.protocol}-"
    default_dir = f"runs/proreg-{args.method}-{args.dataset}-{protocol}seed{args.seed}-{stamp}"
    out = Path(broadcast(args.resume or args.output_dir or default_dir))  # one folder, whoever's clock
    master = rank == 0
    if saved and (out / "results.json").exists():
        raise SystemExit(f"error: {out} is finished (results.json exists): re-evaluate it with --evaluate {out}")
    if not saved and (out / "checkpoint.pt").exists() and not args.overwrite:
        raise SystemExit(f"error: {out} already holds a checkpoint: pass --overwrite to replace the run, "
                         "--resume to continue it, or another --output-dir")
    say = print if master else (lambda *a, **k: None)
    say(f"proreg --method {args.method} on {args.dataset} ({args.protocol}): {args.model}/{args.pretrained}, "
        f"seed {args.seed}, {args.epochs} epochs, batch {args.batch_size} ({world_size} process(es) x "
        f"{args.grad_accum} part(s)), device {device} -> {out}")

    # Seeding: everything random below (few-shot sampling, shuffling, augmentation) follows args.seed.
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    # Data and the frozen model's share: prompt features of the training classes (the head's start and the
    # teacher's classifier); zero-shot image features of every test set (before any update).
    benchmark = data.load_dataset(args.dataset, args.root, download=args.download)
    targets = {name: data.load_dataset(name, args.root, download=args.download) for name in eval_datasets(args)}
    backbone = data.load_backbone(args.model, args.pretrained, device)
    train_classes = PROTOCOLS[args.protocol]["train_classes"]
    _, train_names = data.subsample_classes(benchmark.test, benchmark.classnames, train_classes)
    zs_text = prompt_features(backbone.model, backbone.tokenize, train_names, benchmark.template)  # [C, D]
    if not saved and master:  # only once data and weights are there: a run that cannot start leaves no folder
        if args.overwrite and (out / "checkpoint.pt").exists():
            shutil.rmtree(out)  # the whole old run goes, so no file of it is left beside the new results
        out.mkdir(parents=True, exist_ok=True)
        data.atomic_write_text(json.dumps(vars(args), indent=2), out / "args.json")
    barrier()
    train_items = benchmark.train
    if args.shots:
        train_items = data.fewshot(train_items, args.shots, args.seed, cache=out / "fewshot.json" if master else None)
    train_items, _ = data.subsample_classes(train_items, benchmark.classnames, train_classes)
    splits = evaluation_sets(benchmark, targets, train_names, args.protocol)
    frozen = zero_shot_features(splits, backbone, args, device) if master else None
    train_set = TrainingSet(train_items, benchmark, backbone, zs_text, args, device)

    # The student: the same image encoder, the prompt-initialised head, the logit scale; AdamW, two lrs.
    model = FineTunedCLIP(backbone.model, zs_text).to(device)
    if args.checkpointing:
        model.visual.set_grad_checkpointing(True)
    if world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = adamw(model, args, device)
    use_kernel = args.loss_impl == "kernel" or (args.loss_impl == "auto" and kernels is not None
                                                and kernels.kernel_available(device) and args.weight == "code")
    step_fn = functools.partial(train_step, args=args, use_kernel=use_kernel)
    if device.type == "cuda" and not args.eager and world_size == 1 and args.grad_accum == 1:
        step = CapturedStep(step_fn, model, optimizer)  # same step, replayed as one CUDA graph
    else:
        step = lambda x, y, z: step_fn(model, optimizer, x, y, z)  # noqa: E731
    steps_per_epoch = train_set.n // args.batch_size
    data.require(args.epochs == 0 or steps_per_epoch > 0, f"--batch-size {args.batch_size} is larger than the "
                 f"{train_set.n} training images: use a smaller one")
    learned = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"fine-tuning {learned:,} parameters on {train_set.n} images of {len(train_names)} classes, "
        f"{steps_per_epoch} steps an epoch, loss {'fused (kernels)' if use_kernel else 'PyTorch'}")
    start_epoch = restore_training(saved, model, optimizer) if saved else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    total_steps = args.epochs * steps_per_epoch
    epochs_bar = tqdm(range(start_epoch, args.epochs), desc="train", initial=start_epoch, total=args.epochs,
                      disable=not master)
    for epoch in epochs_bar:
        model.train()
        step_losses, correct, seen = [], 0, 0
        for i, (x, y, zs_logits) in enumerate(train_set.batches(epoch, rank, world_size)):
            set_lr(optimizer, lr_factor(epoch * steps_per_epoch + i, total_steps, args.warmup))  # per step
            loss, n_correct = step(x, y, zs_logits)
            step_losses.append(loss)
            correct, seen = correct + n_correct, seen + len(y)
        step_losses = torch.stack(step_losses).cpu()  # one wait for the device per epoch
        if not torch.isfinite(step_losses).all():
            bad = int((~torch.isfinite(step_losses)).nonzero()[0])
            raise SystemExit(f"error: the loss became {step_losses[bad].item()} at epoch {epoch + 1}, step "
                             f"{bad + 1}; nothing was recorded as a result. Lower --lr.")
        epochs_bar.set_postfix(loss=f"{step_losses.mean():.3f}", acc=f"{float(correct) / seen:.3f}")
        if master:
            save_training(out / "checkpoint.pt", args, epoch + 1, model, optimizer)
    if args.epochs == 0 and master:  # zeroshot: the initial model is the result
        save_training(out / "checkpoint.pt", args, 0, model, optimizer)
    memory = peak_memory(device)
    if world_size > 1:
        model = model.module
        barrier()
        dist.destroy_process_group()
    if not master:
        return None

    record = evaluate_run(model, frozen, splits, benchmark, targets, backbone, train_names, args, device)
    record.update(wall_s=round(time.time() - start_time, 1), processes=world_size, **memory)
    data.atomic_write_text(json.dumps(record, indent=2), out / "results.json")
    checkpoint = data.load_checkpoint(out / "checkpoint.pt")
    data.atomic_save({**checkpoint, "metrics": record}, out / "checkpoint.pt")
    data.append_result(Path(args.results_file or out.parent / "results.jsonl"), record)
    print(f"wrote {out / 'results.json'}, {out / 'checkpoint.pt'} (peak memory {memory['peak_memory_mb']} MB, "
          f"{memory['peak_memory_of']})")
    return record


def setup_distributed():
    """(rank, world size): torchrun sets RANK and WORLD_SIZE; one process per GPU (nccl), or gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return 0, 1
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size()


def broadcast(value):
    """Rank 0's value on every process (the run folder, whose default name holds the time)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier():
    if dist.is_initialized():
        dist.barrier()


def peak_memory(device) -> dict:
    """The training's peak memory: CUDA's allocator peak on a GPU, else the process's peak resident set."""
    if device.type == "cuda":
        return dict(peak_memory_mb=round(torch.cuda.max_memory_allocated(device) / 2 ** 20),
                    peak_memory_of="cuda max_memory_allocated")
    return dict(peak_memory_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                peak_memory_of="process peak RSS (CPU)")


def evaluation_sets(benchmark, targets, train_names, protocol) -> dict:
    """{split: (items, classnames, benchmark they come from)}, each split in the label space it is tested in.
    all, cross: the whole test set, and each shifted set in its own label space. base2new: the base and new
    halves, and the shifted sets restricted to the base classes. Then the other datasets (targets)."""
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


def split_loader(split, backbone, args):
    items, _, source = split
    return data.make_loader(items, source, backbone, False, args.test_batch_size, args.seed, args.workers)


def zero_shot_features(splits, backbone, args, device) -> dict:
    """{split: (features [N, D], labels [N], prompt features [C, D])} of the frozen model, before any update."""
    out = {}
    for name, split in splits.items():
        features, labels = encode_images(backbone.model.visual, split_loader(split, backbone, args), device)
        out[name] = (features, labels, prompt_features(backbone.model, backbone.tokenize, split[1], split[2].template))
    return out


def evaluate_run(model, frozen, splits, benchmark, targets, backbone, train_names, args, device) -> dict:
    """Accuracy of the fine-tuned model, of zero-shot CLIP and of their output ensemble on every test set
    (evaluation_sets); prints the table, returns the record. Classes that were not trained (new, other
    datasets) are scored with their zero-shot prompt features and the fine-tuned encoder."""
    rows, test_loss = {"zero-shot CLIP": {}, "fine-tuned": {}, "ensemble": {}}, {}
    for split, (items, names, source) in splits.items():
        zs_features, labels, zs_text = frozen[split]
        ft_features, _ = encode_images(model.visual, split_loader((items, names, source), backbone, args), device)
        fine_tuned = model if names == train_names else Classifier(zs_text, model.logit_scale)
        zero_shot = Classifier(zs_text, backbone.model.logit_scale)
        batches = lambda x: list(zip(x.split(args.test_batch_size), labels.split(args.test_batch_size)))  # noqa: E731
        metrics = evaluate(fine_tuned, batches(ft_features))
        rows["fine-tuned"][split], test_loss[split] = metrics["acc"], metrics["loss"]
        rows["zero-shot CLIP"][split] = evaluate(zero_shot, batches(zs_features))["acc"]
        ensemble = OutputEnsemble(fine_tuned, zero_shot, args.ensemble_alpha)
        rows["ensemble"][split] = evaluate(ensemble, batches(torch.cat([ft_features, zs_features], -1)))["acc"]
    ours = rows["ensemble" if args.method == "ensemble" else "fine-tuned"]
    for row in rows.values():
        row["hm"] = data.harmonic_mean(row["base"], row["new"]) if "new" in row else None

    head = ["base", "new", "hm"] if args.protocol == "base2new" else ["all"]
    columns = [*head, *benchmark.shifts, *targets]
    print(f"\n{args.dataset} ({args.protocol}), method {args.method}, seed {args.seed}, epoch {args.epochs}, "
          f"{backbone.name}/{backbone.pretrained}")
    width = {c: max(12, len(c) + 1) for c in columns}
    print(f"{'':16}" + "".join(f"{c:>{width[c]}}" for c in columns))
    shown = {"zero-shot CLIP": rows["zero-shot CLIP"], args.method: ours}
    if args.method not in ("ensemble", "zeroshot"):
        shown[f"{args.method}+ensemble"] = rows["ensemble"]
    for name, row in shown.items():
        cells = [f"{row[c]:{width[c]}.2f}" if row.get(c) is not None else f"{'-':>{width[c]}}" for c in columns]
        print(f"{name:16}" + "".join(cells))
    return dict(method=args.method, protocol=args.protocol, dataset=args.dataset, backbone=backbone.name,
                pretrained=backbone.pretrained, shots=args.shots, seed=args.seed, epoch=args.epochs,
                base=ours.get("base"), new=ours.get("new"), hm=ours["hm"], all=ours.get("all"),
                shifts={s: ours[s] for s in benchmark.shifts if s in ours},
                transfer={t: ours[t] for t in targets if t in ours}, zero_shot=rows["zero-shot CLIP"],
                ensemble=rows["ensemble"], test_loss=test_loss,
                classes={split: len(names) for split, (_, names, _) in splits.items()}, args=vars(args))


# ------------------------------------------------------------------------------------------ saved runs
def save_training(path, args, epoch, model, optimizer):
    """After each epoch, atomically: the learned tensors and everything the next epoch depends on (the
    optimiser state, the random states of Python, NumPy and torch; the batches and the augmentation
    follow from (seed, epoch)). Plain tensors, numbers and strings only (weights_only=True loads it)."""
    model = model.module if isinstance(model, DistributedDataParallel) else model
    python_state, numpy_state = random.getstate(), np.random.get_state()
    data.atomic_save({
        "learned": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "args": vars(args), "epoch": epoch, "metrics": None,
        "optimizer": optimizer.state_dict(),
        "rng": {"python": [python_state[0], list(python_state[1]), python_state[2]],
                "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }, path)


def load_run(run_dir):
    """The checkpoint of a run folder, read as tensors only; a missing or damaged file is a UsageError."""
    return data.load_checkpoint(Path(run_dir) / "checkpoint.pt")


@torch.no_grad()
def load_learned(model, learned):
    """Copy saved learned tensors ({parameter name: tensor}, as save_training writes them) into the model."""
    model = model.module if isinstance(model, DistributedDataParallel) else model
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.copy_(learned[name])


def restore_training(saved, model, optimizer):
    """Put a saved epoch back (see save_training); returns the number of epochs already done."""
    load_learned(model, saved["learned"])
    lrs = [g["lr"] for g in optimizer.param_groups]
    optimizer.load_state_dict(saved["optimizer"])
    for group, lr in zip(optimizer.param_groups, lrs):  # keep the lr tensors a captured step reads
        group["lr"] = lr
    rng = saved["rng"]
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy().astype(np.uint32), *rng["numpy"][2:]))
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    print(f"resuming after epoch {saved['epoch']} of {saved['args']['epochs']}")
    return saved["epoch"]


def reevaluate(args):
    """Evaluate a finished run's learned tensors again with its saved settings (on --eval-datasets when
    given); writes RUN_DIR/eval.json and nothing else."""
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
    _, train_names = data.subsample_classes(benchmark.test, benchmark.classnames,
                                            PROTOCOLS[args.protocol]["train_classes"])
    zs_text = prompt_features(backbone.model, backbone.tokenize, train_names, benchmark.template)
    splits = evaluation_sets(benchmark, targets, train_names, args.protocol)
    frozen = zero_shot_features(splits, backbone, args, device)  # before the learned weights replace them
    model = FineTunedCLIP(backbone.model, zs_text).to(device)
    load_learned(model, saved["learned"])
    record = evaluate_run(model, frozen, splits, benchmark, targets, backbone, train_names, args, device)
    data.atomic_write_text(json.dumps(record, indent=2), run_dir / "eval.json")
    return record


if __name__ == "__main__":
    try:
        main(parse_args())
    except data.UsageError as error:  # a mistake the user can fix: one line that says what to do, no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
