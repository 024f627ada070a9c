"""ProReg: fine-tuning CLIP's image encoder, regularised by CLIP's own zero-shot prompt prediction.

ProReg Zhu, Niu, Lee, Hur, Zhang. "Debiased Fine-Tuning for Vision-language Models by Prompt
       Regularization." AAAI 2023. https://arxiv.org/abs/2301.12429 (code: BeierZhu/ProReg)

Fine-tuning CLIP on a biased training set (each class mostly in one context) learns the bias. ProReg
fine-tunes the whole image encoder with a head initialised from the zero-shot prompt features and a
trainable logit scale, regularised per sample by the frozen model's prompt prediction, which knows
nothing of the task's bias, with a weight that moves towards it where the zero-shot prediction is
confident about the true class:
    w = stopgrad( p_zs(y|x)^10 / (p_ft(y|x) + p_zs(y|x)^10 + 1e-5) )     (official losses.py: xERM)
    L = mean_i (1 - w_i) CE(z_ft_i, y_i)  +  alpha * mean_i w_i KL(p_zs_i || p_ft_i)

  python proreg.py                                    # offline world, biased task (shapes_biased)
  python proreg.py --method finetune                  # baselines: finetune fixed ensemble zeroshot
  python proreg.py --dataset caltech101 --root ~/data # ViT-B/16 openai, the whole training split
  torchrun --nproc_per_node 4 proreg.py --dataset caltech101 --root ~/data  # 4 GPUs, same batch
  python proreg.py --resume runs/proreg-...           # continue a killed run (--evaluate: re-test)

--method: proreg; finetune (CE, the same head: official prompt_finetune); fixed ((1 - a) CE + a KL:
knowledge_distill); ensemble (finetune, then (1 - a) z_ft + a z_zs: ensemble_test); zeroshot. Every
run also records zero-shot CLIP and its own output ensemble; classes not trained on (--protocol
base2new, cross) are scored with their prompt features and the fine-tuned encoder.

Differs from the official code (BeierZhu/ProReg, a ViLT/Lightning scaffold around OpenAI's clip) in:
- open_clip (QuickGELU for `openai` weights); bf16 autocast on CUDA, fp32 weights (official: fp16).
- the teacher: where the training transform is deterministic (the world) its logits of every
  training image are computed once before training; with random augmentation a frozen copy of the
  image encoder scores each batch, only for the objectives that read it (proreg, fixed).
- --weight xerm offers the form left commented out in losses.py, CE_ft / (CE_ft + CE_zs + 1e-5).
- weight decay spares every LayerNorm parameter (official no_decay names miss CLIP's 'ln_1.weight').
- RandAugment is torchvision's RandAugment(2, 9), not the official port; each image's draw is seeded
  by (seed, epoch, index). The offline world is not augmented (data.Benchmark.augment).
- one seeded permutation per epoch, cut into batches of --batch-size (the last incomplete one
  dropped, as Dassl does), split evenly over processes and accumulation steps.
- the last epoch is evaluated (the official code keeps the best validation checkpoint).
- alpha: the CoOp datasets have no official config; they take 2 (DomainNet's, PACS's).
- the world: batch 32 (576 training images); its tiny CLIP's patch dropout is off for fine-tuning.
"""
import argparse
import contextlib
import copy
import functools
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import data

try:  # kernels/ beside this file: the fused Triton loss and the captured CUDA-graph step
    import kernels
except ImportError:  # a copy of this file alone: the readable loss and the eager step run
    kernels = None

METHODS = ("proreg", "finetune", "fixed", "ensemble", "zeroshot")


# --------------------------------------------------------------------------------------- the method
class FineTunedCLIP(nn.Module):
    """The student: CLIP's image encoder (trained), a head of class embeddings initialised from the
    zero-shot prompt features (trained, L2-normalised in the forward pass), and the logit scale
    (trained). logits = exp(logit_scale) * cos(f_theta(x), t_c): at step 0, zero-shot CLIP's."""

    def __init__(self, clip, class_embeddings):
        super().__init__()
        if not isinstance(getattr(clip.visual, "patch_dropout", nn.Identity()), nn.Identity):
            # the world's tiny CLIP pretrained with patch dropout: fine-tuning sees every patch
            clip.visual.patch_dropout = nn.Identity()
        self.visual = clip.visual.requires_grad_(True)  # the same module: no copy of the weights
        self.class_embeddings = nn.Parameter(class_embeddings.clone())  # [C, D]
        self.logit_scale = nn.Parameter(clip.logit_scale.detach().clone())  # log 100 (OpenAI CLIP)

    def class_text_features(self):
        return F.normalize(self.class_embeddings.float(), dim=-1)  # [C, D]

    def forward(self, x, text_features=None):
        """x: images [B, 3, H, W], or their L2-normalised features [B, D] (evaluation)."""
        image_features = x if x.dim() == 2 else F.normalize(self.visual(x).float(), dim=-1)
        text_features = self.class_text_features() if text_features is None else text_features
        return self.logit_scale.exp() * image_features @ text_features.t()  # [B, C]


@torch.no_grad()
def prompt_features(clip, tokenize, classnames, template):
    """Zero-shot prompt features of the classes, "a photo of a {class}." through the frozen text
    tower, not normalised (the official head starts from these) -> [C, D]."""
    ids = tokenize([template.format(c.replace("_", " ")) for c in classnames]).to(clip.logit_scale.device)
    cut = int(ids.argmax(-1).max()) + 1  # positions after the last EOT never reach a feature
    return TextEncoder(clip)(clip.token_embedding(ids[:, :cut]), ids.argmax(-1)).float()


# --- the objectives (readable PyTorch; kernels.proreg_loss / fused_kl_ce compute the same fused)
def proreg_weight(ce_ft, ce_zs, form):
    """ProReg's sample weight w [B] from the per-sample CEs, detached (official: w_t.detach())."""
    ce_ft, ce_zs = ce_ft.detach(), ce_zs.detach()
    if form == "code":  # losses.py xERM (active): p_zs^10 / (p_ft + p_zs^10 + 1e-5)
        p_zs10 = torch.exp(-10 * ce_zs)
        return p_zs10 / (torch.exp(-ce_ft) + p_zs10 + 1e-5)
    return ce_ft / (ce_ft + ce_zs + 1e-5)  # xerm: the commented-out form, gamma = 1


def proreg_terms(logits, zs_logits, labels, form="code"):
    """Per sample [B]: CE to the label, the "KL" term as the official soft-target cross-entropy
    -sum_c p_zs(c) log p_ft(c) (KL plus the teacher's entropy: the same gradient), the weight."""
    ce_ft = F.cross_entropy(logits, labels, reduction="none")  # [B]
    ce_zs = F.cross_entropy(zs_logits, labels, reduction="none")  # [B]
    kl = -(F.softmax(zs_logits, dim=-1) * F.log_softmax(logits, dim=-1)).sum(-1)  # [B]
    return ce_ft, kl, proreg_weight(ce_ft, ce_zs, form)


def objective(logits, zs_logits, labels, args, use_kernel):
    """The training loss of --method on fp32 logits [B, C] (student) and zs_logits [B, C] (teacher).
    The fused kernels skip their label check (a host sync, not allowed in a CUDA graph)."""
    if args.method in ("finetune", "ensemble"):  # CE only (official prompt_finetune)
        return F.cross_entropy(logits, labels)
    if args.method == "fixed":  # (1 - a) CE + a KL, one global a (official knowledge_distill)
        if use_kernel:
            return kernels.fused_kl_ce(logits, zs_logits, labels, ce_weight=1 - args.fixed_alpha,
                                       kl_weight=args.fixed_alpha, kl_form="soft_ce",
                                       check_labels=False)
        ce, kl, _ = proreg_terms(logits, zs_logits, labels)
        return (1 - args.fixed_alpha) * ce.mean() + args.fixed_alpha * kl.mean()
    if use_kernel:  # ProReg, fused: one pass over the logits, the gradient written in the forward
        return kernels.proreg_loss(logits, zs_logits, labels, alpha=args.alpha, kl_form="soft_ce",
                                   check_labels=False)
    ce, kl, w = proreg_terms(logits, zs_logits, labels, args.weight)
    return ((1 - w) * ce).mean() + args.alpha * (w * kl).mean()  # CE, prompt regularisation


def train_step(model, optimizer, x, y, zs_logits, args, use_kernel):
    """One AdamW step on this process's share of a batch (x [b, 3, H, W], y [b], zs_logits [b, C]),
    in --grad-accum parts (DDP averages the gradients at the last) -> (loss, n correct) tensors."""
    optimizer.zero_grad(set_to_none=True)
    parts, loss_sum, correct = args.grad_accum, 0.0, 0
    for k, (xp, yp, zp) in enumerate(zip(x.chunk(parts), y.chunk(parts), zs_logits.chunk(parts))):
        ddp = isinstance(model, DistributedDataParallel)
        with model.no_sync() if ddp and k < parts - 1 else contextlib.nullcontext():
            with data.autocast(x.device):
                logits = model(xp)  # [b / parts, C]
            loss = objective(logits.float(), zp.float(), yp, args, use_kernel)
            (loss / parts).backward()
        loss_sum = loss_sum + loss.detach() / parts
        correct = correct + (logits.argmax(-1) == yp).sum()
    optimizer.step()
    return loss_sum, correct


def adamw(model, args, device):
    """The official set_schedule: AdamW (0.9, 0.98), eps 1e-8, the head (class embeddings, logit
    scale) at lr x head_lr_mult, weight decay but on biases and norms; CUDA: tensor lrs, fused."""
    groups = {}
    for name, p in model.named_parameters():
        head = not name.startswith("visual.")
        decay = head or p.ndim >= 2 or name.endswith(("class_embedding", "positional_embedding"))
        groups.setdefault((head, decay), []).append(p)
    cuda = device.type == "cuda"
    param_groups = [dict(params=ps, weight_decay=args.weight_decay if decay else 0.0,
                         base_lr=args.lr * (args.head_lr_mult if head else 1.0))
                    for (head, decay), ps in groups.items()]
    for g in param_groups:
        g["lr"] = torch.tensor(g["base_lr"], device=device) if cuda else g["base_lr"]
    return torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-8,
                             fused=cuda, capturable=cuda)


def lr_factor(step, total, warmup):
    """transformers' polynomial schedule with power 1 and end lr 0 (official set_schedule), per
    step: linear warm-up from 0 over int(warmup * total) steps, then linear decay to 0 at total."""
    warm = int(warmup * total)
    if step < warm:
        return step / warm
    return max(0.0, (total - step) / max(1, total - warm))


def set_lr(optimizer, factor):  # a tensor lr (CUDA) is filled in place: a captured step reads it
    for g in optimizer.param_groups:
        lr = g["base_lr"] * factor
        g["lr"] = g["lr"].fill_(lr) if torch.is_tensor(g["lr"]) else lr


# ==== shared block: text encoder (identical in every method file) ====
class TextEncoder(nn.Module):
    """CLIP's text tower fed prompt embeddings instead of token ids (open_clip CLIP, batch-first).

    The causal mask lets position i attend only to positions <= i, so the end-of-text (EOT) feature,
    which is all CLIP uses, never depends on later positions: prompts cut after the longest prompt's
    EOT (as the prompt learner builds them) give exactly the features of the full context."""

    def __init__(self, clip):
        super().__init__()
        assert clip.transformer.batch_first and clip.text_pool_type == "argmax", "needs open_clip's"
        self.resblocks = clip.transformer.resblocks
        self.positional_embedding = clip.positional_embedding  # [L, d]
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection  # [d, D]
        # [L, L], -inf above the diagonal
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)

    def forward(self, prompts, eot):
        """prompts: [N, n, d] token embeddings (n <= L); eot: [N] EOT positions -> [N, D]"""
        n = prompts.shape[1]
        x = prompts + self.positional_embedding[:n]  # [N, n, d]
        for block in self.resblocks:
            x = block(x, attn_mask=self.attn_mask[:n, :n])
        x = self.ln_final(x)
        return x[torch.arange(len(x), device=x.device), eot] @ self.text_projection  # [N, D]
# ==== end shared block ====


# --------------------------------------------------------------------------------------- settings
# Paper defaults (vilt/config.py, the xERM configs), then per-dataset ones; a given flag wins.
PAPER = dict(epochs=10, batch_size=256, lr=1e-5, head_lr_mult=100.0, weight_decay=0.01, warmup=0.1,
             alpha=2.0, fixed_alpha=0.5, ensemble_alpha=0.5)
DATASET_SETTINGS = {
    # the world: 576 training images; at batch 256 ten epochs are 20 steps, too few at lr 1e-5
    "shapes": dict(batch_size=32),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--method", default="proreg", choices=METHODS, help="proreg; finetune (CE only); fixed "
      "((1-a) CE + a KL); ensemble (finetune, then (1-a) z_ft + a z_zs); zeroshot (no training)")
    a("--weight", default="code", choices=["code", "xerm"], help="ProReg's sample weight: code = "
      "the official active form; xerm = CE_ft / (CE_ft + CE_zs + 1e-5) (commented out there)")
    a("--alpha", type=float, help="ProReg's KL weight alpha (official configs: 1 to 2; default 2)")
    a("--fixed-alpha", type=float, help="--method fixed: a in (1-a) CE + a KL (paper: 0.5)")
    a("--ensemble-alpha", type=float, help="output ensemble (1-a) z_ft + a z_zs (here 0.5)")
    a("--grad-accum", type=int, default=1, help="sequential parts of each step (less memory)")
    a("--checkpointing", action="store_true", help="activation checkpointing (less memory)")
    a("--lr", type=float, help="AdamW lr of the image encoder (paper: 1e-5)")
    a("--head-lr-mult", type=float, help="lr multiplier of the head and logit scale (paper: 100)")
    a("--weight-decay", type=float, help="AdamW weight decay, not on biases, norms (paper: 0.01)")
    a("--warmup", type=float, help="fraction of steps warming up, then linear decay (paper: 0.1)")
    a("--loss-impl", default="auto", choices=["auto", "kernel", "torch"], help="the fused Triton "
      "loss (kernels/) or PyTorch's; auto: the kernel where kernels.kernel_available(device)")
    data.add_run_flags(p, dataset="shapes_biased", protocol="all", shots=0,
                       shots_help="training images per class; 0 = the whole training split (paper)",
                       epochs_help="training epochs (paper: 10)", batch_help="global batch over "
                       "processes and accumulation steps (paper: 256 = 4 GPUs x 16 x accumulation)")
    return p.parse_args(argv)


def resolve_settings(args):
    """Fill the settings left at None: command line > DATASET_SETTINGS > paper default; check."""
    dataset = "shapes" if args.dataset.startswith(data.WORLD_PREFIX) else args.dataset
    for key, value in {**PAPER, **DATASET_SETTINGS.get(dataset, {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.method == "zeroshot":
        args.epochs = 0  # nothing is trained: the initial model is zero-shot CLIP
    data.resolve_run_args(args)
    check_settings(args)
    return args


def check_settings(args):
    """Refuse, before anything is written, a setting that would give wrong numbers (UsageError)."""
    data.check_run_args(args, min_epochs=0 if args.method == "zeroshot" else 1, min_shots=0)
    data.check_int("--grad-accum", args.grad_accum, 1)
    for name in ("lr", "head_lr_mult", "weight_decay", "alpha", "fixed_alpha", "ensemble_alpha"):
        bound = dict(above=0) if name in ("lr", "head_lr_mult") else dict(minimum=0)
        data.check_float(f"--{name.replace('_', '-')}", getattr(args, name), **bound)
    data.check_warmup("--warmup", args.warmup, None)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    share = world_size * args.grad_accum
    data.require(args.batch_size % share == 0, f"--batch-size {args.batch_size} does not split into "
                 f"{world_size} processes x --grad-accum {args.grad_accum}: use a multiple of {share}")
    data.require(args.loss_impl != "kernel" or args.weight == "code" or args.method != "proreg",
                 "--loss-impl kernel computes the official weight only: use --weight code or "
                 "--loss-impl torch")


# --------------------------------------------------------------------------------------- the run
def main(args):
    start_time = time.time()
    rank, world_size = data.setup_distributed()
    tag = "proreg" if args.method == "proreg" else f"proreg-{args.method}"
    args, saved, out, device = data.start_run(args, tag, resolve_settings, check_settings)
    data.require(world_size == 1 or not args.evaluate, "--evaluate runs in one process: use python")
    out, device = data.share_run(out, device, world_size)
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"proreg --method {args.method} on {args.dataset} ({args.protocol}): {args.model}/"
        f"{args.pretrained}, seed {args.seed}, {args.epochs} epochs, batch {args.batch_size} "
        f"({world_size} process(es) x {args.grad_accum} part(s)), device {device} -> {out}")
    data.seed_everything(args.seed)  # sampling, shuffling, augmentation, a random-init backbone

    # the head's start and the teacher's classes (prompt features); every test set's frozen features
    task = data.load_task(args, device)
    clip, tokenize = task.backbone.model, task.backbone.tokenize
    zs_text = prompt_features(clip, tokenize, task.train_names, task.benchmark.template)  # [C, D]
    splits = data.evaluation_sets(task, args.protocol)
    frozen = zero_shot_features(splits, task.backbone, args, device) if rank == 0 else None
    model = FineTunedCLIP(clip, zs_text).to(device)  # the same encoder, the prompt-initialised head
    if args.evaluate:
        data.load_learned(model, saved["learned"])
        return data.finish_run(out, evaluate_run(model, frozen, splits, task, args, device), args,
                               start_time)
    if rank == 0:
        data.make_run_folder(out, args, saved)
    optimizer = adamw(model, args, device)
    if args.epochs:
        items = data.training_items(task, args, cache=out / "fewshot.json" if rank == 0 else None)
        train_set = TrainingSet(items, task.benchmark, task.backbone, zs_text, args, device)
        fine_tune(model, optimizer, train_set, saved, out, args, device, rank, world_size, say)
    elif rank == 0:  # zeroshot: nothing is trained, the initial model is the result
        data.save_checkpoint(out / "checkpoint.pt", args, 0, model, optimizer)
    memory = data.peak_memory(device)
    if world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank == 0:
        record = evaluate_run(model, frozen, splits, task, args, device, processes=world_size,
                              **memory)
        return data.finish_run(out, record, args, start_time)


def fine_tune(model, optimizer, train_set, saved, out, args, device, rank, world_size, say):
    """The epochs (from the last saved one), the lr set per step; a checkpoint after each epoch. DDP
    averages the processes' gradients; on one GPU the step is replayed as a CUDA graph."""
    steps = train_set.n // args.batch_size  # an epoch's
    data.require(steps > 0, f"--batch-size {args.batch_size} exceeds the {train_set.n} images: lower it")
    use_kernel = args.loss_impl == "kernel" or (args.loss_impl == "auto" and args.weight == "code"
                                                and kernels and kernels.kernel_available(device))
    say(f"fine-tuning {sum(p.numel() for p in model.parameters() if p.requires_grad):,} parameters "
        f"on {train_set.n} images, {steps} steps an epoch, loss {'fused' if use_kernel else 'torch'}")
    start_epoch = data.restore_checkpoint(saved, model, optimizer)
    if args.checkpointing:
        model.visual.set_grad_checkpointing(True)
    net = model if world_size == 1 else DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    step_fn = functools.partial(train_step, args=args, use_kernel=use_kernel)
    step = functools.partial(step_fn, net, optimizer)
    if kernels and device.type == "cuda" and not args.eager and world_size == args.grad_accum == 1:
        step = kernels.CapturedStep(step_fn, model, optimizer)  # the same step, as a CUDA graph
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for epoch in data.epoch_bar(args, start_epoch) if rank == 0 else range(start_epoch, args.epochs):
        net.train()
        losses, correct, seen, started = [], 0, 0, time.time()
        for i, (x, y, zs_logits) in enumerate(train_set.batches(epoch, rank, world_size)):
            set_lr(optimizer, lr_factor(epoch * steps + i, args.epochs * steps, args.warmup))
            loss, n_correct = step(x, y, zs_logits)
            losses.append(loss)
            correct, seen = correct + n_correct, seen + len(y)
        fit = data.epoch_fit(losses, correct, seen, epoch, started=started)
        if rank == 0:
            data.save_checkpoint(out / "checkpoint.pt", args, epoch + 1, model, optimizer, train=fit)


class TrainingSet:
    """The training images with their teacher logits: computed once before any update where the
    transform is deterministic (the world); else a frozen copy of the image encoder scores each
    augmented batch, for the objectives that read them (proreg, fixed; the others get zeros)."""

    def __init__(self, items, benchmark, backbone, zs_text, args, device):
        transform = data.make_transform(backbone, train=False)  # CLIP's preprocessing (the world)
        if benchmark.augment:  # real data: RandAugment(2, 9) before it
            from torchvision import transforms as T
            transform = T.Compose([T.RandAugment(2, 9), *transform.transforms])
        self.data = data.IndexedBatches(items, benchmark.open_image, transform, benchmark.augment,
                                        args.batch_size, args.seed, args.workers, device)
        self.n, self.zs_text = len(items), F.normalize(zs_text, dim=-1)
        self.zs_scale = backbone.model.logit_scale.exp().detach()
        self.teacher_logits = self.teacher = None
        if benchmark.augment and args.method in ("proreg", "fixed"):  # others: no second encoder
            self.teacher = copy.deepcopy(backbone.model.visual).eval().requires_grad_(False)
        elif not benchmark.augment:
            print(f"no training augmentation on {args.dataset}: the teacher's logits of the "
                  f"{self.n} training images are computed once, before training (exact)")
            chunks, visual = self.data.images.split(args.test_batch_size), backbone.model.visual
            self.teacher_logits = torch.cat([self.zero_shot_logits(c.to(device), visual)
                                             for c in chunks])  # [N, C]

    @torch.no_grad()
    def zero_shot_logits(self, images, teacher):
        with data.autocast(images.device):
            features = data.normalised_encoder(teacher)(images)
        return self.zs_scale * features @ self.zs_text.t()  # [b, C]

    def batches(self, epoch, rank, world_size):
        """(images, labels, teacher logits) on the device, this process's share of each batch."""
        for x, y, idx in self.data.epoch(epoch, rank, world_size):
            if self.teacher_logits is not None:
                yield x, y, self.teacher_logits[idx].to(x.device)
            else:
                yield x, y, (self.zero_shot_logits(x, self.teacher) if self.teacher is not None
                             else x.new_zeros(len(x), len(self.zs_text)))


# --- evaluation
class OutputEnsemble(nn.Module):
    """(1 - a) z_ft + a z_zs (official ensemble_test) of x = [fine-tuned, frozen features] [B, 2D]."""

    def __init__(self, fine_tuned, zero_shot, a):
        super().__init__()
        self.fine_tuned, self.zero_shot, self.a = fine_tuned, zero_shot, a
        self.class_text_features = lambda: None  # the text side is each model's own

    def forward(self, x, text_features=None):
        f_ft, f_zs = x.chunk(2, dim=-1)
        return (1 - self.a) * self.fine_tuned(f_ft) + self.a * self.zero_shot(f_zs)


def zero_shot_features(splits, backbone, args, device) -> dict:
    """{split: (features [N, D], labels [N], prompt features [C, D])} of the model before any update."""
    encode, clip = data.normalised_encoder(backbone.model.visual), backbone.model
    return {name: (*data.encode_images(encode, data.split_loader(split, backbone, args), device),
                   prompt_features(clip, backbone.tokenize, split[1], split[2].template))
            for name, split in splits.items()}


def evaluate_run(model, frozen, splits, task, args, device, **more) -> dict:
    """Accuracy of the fine-tuned model, zero-shot CLIP and their output ensemble on every test set
    (data.evaluation_sets) -> the record (with `more`); untrained classes: their prompt features."""
    trained = "finetune" if args.method == "ensemble" else args.method  # the fine-tuned model's row
    ensemble = "ensemble" if args.method == "ensemble" else f"{args.method}+ensemble"
    rows, test_loss = {"zero-shot CLIP": {}, trained: {}, ensemble: {}}, {}
    for split, (items, names, source) in splits.items():
        zs_features, labels, zs_text = frozen[split]
        loader = data.split_loader((items, names, source), task.backbone, args)
        ft_features, _ = data.encode_images(data.normalised_encoder(model.visual), loader, device)
        fine_tuned = model if names == task.train_names else data.FixedHead(zs_text, model.logit_scale)
        zero_shot = data.FixedHead(zs_text, task.backbone.model.logit_scale)
        both = torch.cat([ft_features, zs_features], -1)
        ft, zs, both = ([*zip(x.split(args.test_batch_size), labels.split(args.test_batch_size))]
                        for x in (ft_features, zs_features, both))  # batches of (features, labels)
        metrics = data.evaluate(fine_tuned, ft)
        rows[trained][split], test_loss[split] = metrics["acc"], metrics["loss"]
        rows["zero-shot CLIP"][split] = data.evaluate(zero_shot, zs)["acc"]
        output_ensemble = OutputEnsemble(fine_tuned, zero_shot, args.ensemble_alpha)
        rows[ensemble][split] = data.evaluate(output_ensemble, both)["acc"]
    ours = ensemble if args.method == "ensemble" else trained
    return data.result_record(args.method, args, task, rows, ours, splits, test_loss,
                              ensemble=rows[ensemble], **more)


if __name__ == "__main__":
    try:
        main(parse_args())
    except data.UsageError as error:  # a mistake the user can fix: one line that says what to do
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
