"""ProReg: fine-tuning CLIP's image encoder, regularised by CLIP's own zero-shot prompt prediction.

ProReg Zhu, Niu, Lee, Hur, Zhang. "Debiased Fine-Tuning for Vision-language Models by Prompt
       Regularization." AAAI 2023. https://arxiv.org/abs/2301.12429 (code: BeierZhu/ProReg)

Fine-tuning CLIP on a biased training set learns the bias. ProReg fine-tunes the image encoder with
a head initialised from the zero-shot prompt features and a trainable logit scale, regularised per
sample by the frozen model's prompt prediction (which knows nothing of the task's bias), weighted
towards it where that prediction is confident about the true class:
    w = stopgrad( p_zs(y|x)^10 / (p_ft(y|x) + p_zs(y|x)^10 + 1e-5) )     (official losses.py: xERM)
    L = mean_i (1 - w_i) CE(z_ft_i, y_i)  +  alpha * mean_i w_i KL(p_zs_i || p_ft_i)

  python proreg.py                                    # offline world, biased task (shapes_biased)
  python proreg.py --dataset domain_net --root ~/data # sketch -> clipart, painting, real (the paper)
  python proreg.py --dataset pacs --test-domain photo # also office_home, imagenet_lt, caltech101...
  torchrun --nproc_per_node 4 proreg.py --dataset domain_net  # 4 GPUs, the same global batch

--method: proreg; finetune (CE, the same head: official prompt_finetune); fixed ((1 - a) CE + a KL:
knowledge_distill); ensemble ((1 - a) z_ft + a z_zs of finetune: ensemble_test); promptless (a new
MLP head: promptless_finetune); linear_probe (the head alone); zeroshot. Every run also records
zero-shot CLIP and its output ensemble. As the official code: transformers' AdamW and schedule, its
RandAugment, validation every half epoch with the best checkpoint tested (--select), the configs'
settings (SETTINGS; templates: data.CUSTOM_TEMPLATES); the CoOp datasets take DomainNet's.

Differs from the official code (BeierZhu/ProReg, a ViLT/Lightning scaffold around OpenAI's clip) in:
- open_clip (QuickGELU for `openai` weights); bf16 autocast on CUDA, fp32 weights (official: fp16).
- the teacher: with a fixed training transform (the world) its logits are computed once before
  training; with augmentation a frozen copy of the image encoder scores each batch (proreg, fixed).
- the "KL" term is the official soft-target cross-entropy (KL plus the teacher's entropy: the same
  gradient); --weight xerm is losses.py's commented-out form with gamma 1 (the configs' gamma,
  BAR 2, NICO-vehicle 0.5, is not offered: the active form ignores it).
- weight decay spares every LayerNorm parameter (official no_decay names miss CLIP's 'ln_1.weight').
- RandAugment (data.RandAugmentPort) as the official port, its draws seeded by (seed, epoch, image).
- one seeded permutation per epoch, split evenly over processes and accumulation steps; the last
  incomplete batch is dropped (the official loader keeps it). --seed 1 (official: 0).
- the world: batch 32 (576 training images), not augmented, its tiny CLIP's patch dropout off.
  linear_probe: its config's lr on the head (the official forward has no such branch).
"""
import argparse
import contextlib
import copy
import functools
import os
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

METHODS = ("proreg", "finetune", "fixed", "ensemble", "promptless", "linear_probe", "zeroshot")


# --------------------------------------------------------------------------------------- the method
class FineTunedCLIP(nn.Module):
    """The student: CLIP's image encoder (trained), a head of class embeddings initialised from the
    zero-shot prompt features (trained, L2-normalised in the forward pass), and the logit scale
    (trained). logits = exp(logit_scale) * cos(f_theta(x), t_c): at step 0, zero-shot CLIP's."""

    def __init__(self, clip, class_embeddings, train_encoder=True):  # False: linear_probe
        super().__init__()
        self.visual = data.trainable_encoder(clip.visual).requires_grad_(train_encoder)  # patch dropout off
        self.class_embeddings = nn.Parameter(class_embeddings.clone())  # [C, D]
        self.logit_scale = nn.Parameter(clip.logit_scale.detach().clone(), train_encoder)  # log 100

    def encode(self, images):
        return F.normalize(self.visual(images).float(), dim=-1)

    def class_text_features(self):
        return F.normalize(self.class_embeddings.float(), dim=-1)  # [C, D]

    def forward(self, x, text_features=None):
        """x: images [B, 3, H, W], or their L2-normalised features [B, D] (evaluation)."""
        image_features = x if x.dim() == 2 else self.encode(x)
        text_features = self.class_text_features() if text_features is None else text_features
        return self.logit_scale.exp() * image_features @ text_features.t()  # [B, C]


class PromptlessCLIP(nn.Module):
    """The `promptless` baseline (official promptless_finetune): the image encoder (trained), a new
    head on its raw features: Linear(D, 2D), LayerNorm, GELU, Linear(2D, C), N(0, 0.02) weights."""

    def __init__(self, clip, n_classes):
        super().__init__()
        self.visual, d = data.trainable_encoder(clip.visual), clip.visual.output_dim
        self.head = nn.Sequential(nn.Linear(d, 2 * d), nn.LayerNorm(2 * d), nn.GELU(),
                                  nn.Linear(2 * d, n_classes))
        for linear in self.head[::3]:
            nn.init.normal_(linear.weight, std=0.02), nn.init.zeros_(linear.bias)
        self.class_text_features = lambda: None

    def encode(self, images):
        return self.visual(images).float()

    def forward(self, x, text_features=None):
        return self.head(x if x.dim() == 2 else self.encode(x))


@torch.no_grad()
def prompt_features(clip, tokenize, classnames, template):
    """The classes' prompts through the frozen text tower, not normalised (the head's start) [C, D]."""
    ids = tokenize([template.format(c.replace("_", " ")) for c in classnames])
    ids = ids.to(clip.logit_scale.device)
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
    """--method's training loss on fp32 logits [B, C] (student), zs_logits [B, C] (teacher) and its
    terms: proreg's loss = ce + alpha kl, ce = mean((1 - w) CE), kl = mean(w KL), w the mean weight;
    fixed: (1 - a) ce + a kl; others: ce. The fused kernels skip the label check (a host sync)."""
    if args.method not in ("proreg", "fixed"):  # CE only (official prompt_finetune, promptless...)
        return dict.fromkeys(["loss", "ce"], F.cross_entropy(logits, labels))
    fixed, a = args.method == "fixed", args.fixed_alpha
    if use_kernel:  # fused: one pass over the logits, the gradient written in the forward
        fused = (functools.partial(kernels.fused_kl_ce, ce_weight=1 - a, kl_weight=a) if fixed
                 else functools.partial(kernels.proreg_loss, alpha=args.alpha))
        loss, (ce, kl, w) = fused(logits, zs_logits, labels, kl_form="soft_ce", check_labels=False,
                                  return_stats=True)  # per sample: CE, KL, weight
    else:
        ce, kl, w = proreg_terms(logits, zs_logits, labels, "code" if fixed else args.weight)
    if fixed:  # (1 - a) CE + a KL, one global a (official knowledge_distill)
        ce, kl = ce.mean(), kl.mean()
        return {"loss": loss if use_kernel else (1 - a) * ce + a * kl, "ce": ce, "kl": kl}
    ce, kl = ((1 - w) * ce).mean(), (w * kl).mean()  # CE, prompt regularisation
    return {"loss": loss if use_kernel else ce + args.alpha * kl, "ce": ce, "kl": kl, "w": w.mean()}


def train_step(model, optimizer, x, y, zs_logits, args, use_kernel):
    """One AdamW step on this process's share of a batch (x [b, 3, H, W], y [b], zs_logits [b, C]),
    in --grad-accum parts (DDP averages the gradients at the last) -> (loss terms, n correct)."""
    optimizer.zero_grad(set_to_none=True)
    parts, terms, correct = args.grad_accum, {}, 0
    for k, (xp, yp, zp) in enumerate(zip(x.chunk(parts), y.chunk(parts), zs_logits.chunk(parts))):
        ddp = isinstance(model, DistributedDataParallel)
        with model.no_sync() if ddp and k < parts - 1 else contextlib.nullcontext():
            with data.autocast(x.device):
                logits = model(xp)  # [b / parts, C]
            part = objective(logits.float(), zp.float(), yp, args, use_kernel)
            (part["loss"] / parts).backward()
        terms = {n: terms.get(n, 0.0) + v.detach() / parts for n, v in part.items()}
        correct = correct + (logits.argmax(-1) == yp).sum()
    optimizer.step()
    return terms, correct


def adamw(model, args, device):
    """The official set_schedule: transformers' AdamW (data.AdamWHF), betas (0.9, 0.98), eps 1e-8,
    the head at lr x head_lr_mult, no weight decay on biases and the encoder's norms; its schedule:
    linear warm-up over --warmup of the steps, then linear decay to 0 (data.warmup_linear)."""
    groups = {}
    for name, p in filter(lambda named: named[1].requires_grad, model.named_parameters()):
        head = not name.startswith("visual.")
        matrix = p.ndim >= 2 or name.endswith(("class_embedding", "positional_embedding"))
        groups.setdefault((head, not name.endswith("bias") if head else matrix), []).append(p)
    optimizer = data.AdamWHF([dict(params=ps, weight_decay=args.weight_decay * decay, lr=args.lr,
                                   base_lr=args.lr * (args.head_lr_mult if head else 1.0))
                              for (head, decay), ps in groups.items()], args.lr, (0.9, 0.98), 1e-8)
    return data.set_lr(optimizer, 1.0, tensors=device.type == "cuda")  # CUDA: a captured step reads them


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
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)  # [L, L], causal

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
# Paper defaults (vilt/config.py, configs), then per benchmark and per method; a given flag wins.
PAPER = dict(epochs=10, batch_size=256, lr=1e-5, head_lr_mult=100.0, weight_decay=0.01, warmup=0.1,
             alpha=2.0, fixed_alpha=0.5, ensemble_alpha=0.5, model="ViT-B-32", pretrained="openai")
SETTINGS = {
    "shapes": dict(batch_size=32, model=None, pretrained=None),  # the world's tiny CLIP, 576 images
    "imagenet_lt": dict(lr=1e-4, head_lr_mult=10.0),  # task_finetune_imagenetLT (alpha: no config)
    "linear_probe": dict(lr=2e-3, head_lr_mult=1.0),  # its config's lr, on the head alone
}  # BAR's and NICO's configs (alpha 1; 2 / 1.5, ...): README (their data are not read here)


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
    a("--select", default="val", choices=["val", "last"], help="the model tested: the best "
      "validation (every half epoch, where there is a validation split: official) or the last")
    a("--loss-impl", default="auto", choices=["auto", "kernel", "torch"], help="the fused Triton "
      "loss (kernels/) or PyTorch's; auto: the kernel where kernels.kernel_available(device)")
    data.add_run_flags(p, dataset="shapes_biased", protocol="all", shots=0,
                       shots_help="training images per class; 0 = the whole training split (paper)",
                       epochs_help="training epochs (paper: 10)", batch_help="global batch over "
                       "processes and accumulation steps (paper: 256 = 4 GPUs x 16 x accumulation)")
    return p.parse_args(argv)


def resolve_settings(args):
    """Fill the settings left at None: command line > method > benchmark > paper default; check."""
    dataset = "shapes" if args.dataset.startswith(data.WORLD_PREFIX) else args.dataset
    given = args.model is not None
    settings = {**PAPER, **SETTINGS.get(dataset, {}), **SETTINGS.get(args.method, {})}
    for key, value in settings.items():
        if getattr(args, key) is None and not (given and key == "pretrained"):
            setattr(args, key, value)
    args.epochs = 0 if args.method == "zeroshot" else args.epochs  # zeroshot: the initial model
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
    world, parts = int(os.environ.get("WORLD_SIZE", 1)), args.grad_accum
    data.require(args.batch_size % (world * parts) == 0, f"--batch-size {args.batch_size} does not "
                 f"split into {world} processes x --grad-accum {parts}: use a multiple of "
                 f"{world * parts}")
    data.require(args.method != "promptless" or args.protocol == "all", "--method promptless has a "
                 "head for the training classes only: use --protocol all")
    data.require(args.loss_impl != "kernel" or args.weight == "code" or args.method != "proreg",
                 "--loss-impl kernel computes the official weight only: use --weight code or "
                 "--loss-impl torch")


# --------------------------------------------------------------------------------------- the run
def main(args):
    if args.predict:  # --predict RUN_DIR IMAGE...: a finished run as a classifier
        return data.predict(args, load_classifier)
    start_time = time.time()
    rank, world_size = data.setup_distributed()
    tag = "proreg" if args.method == "proreg" else f"proreg-{args.method}"
    args, saved, out, device = data.start_run(args, tag, resolve_settings, check_settings)
    out, device = data.share_run(out, device, world_size, args)
    if rank == 0:
        data.print_start(args, f"proreg --method {args.method}", device, out, processes=world_size)
    data.seed_everything(args.seed)  # sampling, shuffling, augmentation, a random-init backbone

    # the head's start and the teacher's classes (prompt features); every test set's frozen features
    task = data.load_task(args, device)
    clip = task.backbone.model
    zs_text = prompt_features(clip, task.backbone.tokenize, task.train_names, task.benchmark.template)
    splits = data.evaluation_sets(task, args.protocol)
    frozen = zero_shot_features(splits, task.backbone, args, device) if rank == 0 else None
    model = (PromptlessCLIP(clip, len(task.train_names)) if args.method == "promptless" else
             FineTunedCLIP(clip, zs_text, args.method != "linear_probe")).to(device)  # same encoder
    if args.evaluate:
        data.load_learned(model, saved["learned"])
        selected = data.select_model(model, out, (saved["extra"] or {}).get("best"))
        return data.finish_run(out, evaluate_run(model, frozen, splits, task, args, device,
                                                 selected=selected), args, start_time)
    if rank == 0:
        data.make_run_folder(out, args, saved)
    optimizer, best = adamw(model, args, device), None
    if args.epochs:
        items = data.training_items(task, args, cache=out / "fewshot.json" if rank == 0 else None)
        train_set = TrainingSet(items, task.benchmark, task.backbone, zs_text, args, device)
        best = fine_tune(model, optimizer, train_set, task, saved, out, args, device, rank,
                         world_size)
    elif rank == 0:  # zeroshot: nothing is trained, the initial model is the result
        data.save_checkpoint(out / "checkpoint.pt", args, 0, model, optimizer)
    memory = data.peak_memory(device)
    data.end_distributed(world_size)
    if rank == 0:
        record = evaluate_run(model, frozen, splits, task, args, device, processes=world_size,
                              selected=data.select_model(model, out, best), **memory)
        return data.finish_run(out, record, args, start_time)


def load_classifier(run_dir, classnames=None, device=None):
    """A finished run as a callable (data.RunClassifier): images (PIL, paths or a batch) ->
    probabilities [N, C] over .classnames, from the model its evaluation tested (best.pt where
    validation selected it): a trained class by its head row, any other name by its zero-shot prompt
    feature, as evaluate_run scores new classes (--method ensemble: the fine-tuned model alone)."""
    run = data.load_run(run_dir, device)
    data.require(run.args.method != "promptless", f"{run_dir}: --method promptless has a new head "
                 "for its training classes, no class names: predict with another method's run")
    if (run.folder / "best.pt").exists():
        run.learned = data.load_checkpoint(run.folder / "best.pt")
    clip, tokenize = run.backbone.model, run.backbone.tokenize
    model = FineTunedCLIP(clip, prompt_features(clip, tokenize, run.classnames, run.template),
                          run.args.method != "linear_probe")

    def text_features(names):
        head = dict(zip(run.classnames, model.class_text_features()))
        new = [n for n in names if n not in head]
        if new:
            zs = prompt_features(clip, tokenize, new, run.template)  # new names: as evaluate_run
            head.update(zip(new, F.normalize(zs, dim=-1)))
        return torch.stack([head[n] for n in names])
    return data.RunClassifier(model.to(run.device), run, text_features, classnames)


def fine_tune(model, optimizer, train_set, task, saved, out, args, device, rank, world_size):
    """The epochs (from the last saved one), the lr set per step, validation every half epoch (the
    best kept: data.keep_best), a checkpoint after each epoch -> the best validation (None: none).
    DDP averages the processes' gradients; on one GPU the step is replayed as a CUDA graph."""
    steps = train_set.n // args.batch_size  # an epoch's
    data.require(steps > 0, f"--batch-size {args.batch_size} > {train_set.n} images: lower it")
    use_kernel = args.loss_impl == "kernel" or (args.loss_impl == "auto" and args.weight == "code"
                                                and kernels and kernels.kernel_available(device))
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if rank == 0:
        print(f"fine-tuning {trained:,} parameters on {train_set.n} images, {steps} steps an "
              f"epoch, {'fused' if use_kernel else 'torch'} loss")
    start_epoch = data.restore_checkpoint(saved, model, optimizer)
    best = (saved["extra"] or {}).get("best") if saved else None
    val = data.validation_loader(task, args) if args.select == "val" and rank == 0 else None
    model.visual.set_grad_checkpointing(args.checkpointing)
    net = data.distributed(model, device, world_size)  # DDP: the processes' gradients averaged
    step_fn = functools.partial(train_step, args=args, use_kernel=use_kernel)
    step = functools.partial(step_fn, net, optimizer)
    if kernels and device.type == "cuda" and not args.eager and world_size == args.grad_accum == 1:
        step = kernels.CapturedStep(step_fn, model, optimizer)  # the same step, as a CUDA graph
    data.reset_peak_memory(device)  # peak_memory below reads training's peak
    epochs = data.epoch_bar(args, start_epoch) if rank == 0 else range(start_epoch, args.epochs)
    for epoch in epochs:
        net.train()
        fits, seen, started = [], 0, time.time()  # each step's (loss terms, number correct)
        for i, (x, y, zs_logits) in enumerate(train_set.batches(epoch, rank, world_size)):
            data.set_lr(optimizer, data.warmup_linear(epoch * steps + i, args.epochs * steps, args.warmup))
            fits.append(step(x, y, zs_logits))
            seen += len(y)
            if val and i + 1 in (steps // 2, steps):  # official val_check_interval 0.5
                acc = data.evaluate(model, val)["acc"]
                best = data.keep_best(out, model, acc, round(epoch + (i + 1) / steps, 2), best)
                net.train()
        fit = data.epoch_fit(fits, seen, epoch, started=started)
        if rank == 0:
            data.save_checkpoint(out / "checkpoint.pt", args, epoch + 1, model, optimizer,
                                 train=fit, extra={"best": best})
    return best


class TrainingSet:
    """The training images with their teacher logits (computed once where the transform is fixed; else
    a frozen encoder's per augmented batch, for proreg and fixed; the other objectives get zeros)."""

    def __init__(self, items, benchmark, backbone, zs_text, args, device):
        transform = data.make_transform(backbone, train=False)  # CLIP's preprocessing (the world)
        if benchmark.augment:  # real data: the official RandAugment(2, 9) before it
            transform.transforms.insert(0, data.RandAugmentPort(2, 9))
        self.data = data.IndexedBatches(items, benchmark.open_image, transform, benchmark.augment,
                                        args.batch_size, args.seed, args.workers, device)
        self.n, self.head = len(items), data.FixedHead(zs_text, backbone.model.logit_scale)
        self.teacher_logits = self.teacher = None
        if benchmark.augment and args.method in ("proreg", "fixed"):  # others: no second encoder
            self.teacher = copy.deepcopy(backbone.model.visual).eval().requires_grad_(False)
        elif not benchmark.augment:
            print(f"no augmentation: the teacher's logits of the {self.n} images are computed once")
            chunks, visual = self.data.images.split(args.test_batch_size), backbone.model.visual
            self.teacher_logits = torch.cat([self.zero_shot_logits(c.to(device), visual)
                                             for c in chunks])  # [N, C]

    @torch.no_grad()
    def zero_shot_logits(self, images, teacher):  # [b, C]: the head in fp32, after autocast
        with data.autocast(images.device):
            features = data.normalised_encoder(teacher)(images)
        return self.head(features)

    def batches(self, epoch, rank, world_size):
        """(images, labels, teacher logits) on the device, this process's share of each batch."""
        for x, y, idx in self.data.epoch(epoch, rank, world_size):
            if self.teacher_logits is not None:
                yield x, y, self.teacher_logits[idx].to(x.device)
            else:
                yield x, y, (self.zero_shot_logits(x, self.teacher) if self.teacher is not None
                             else x.new_zeros(len(x), len(self.head.text_features)))


# --- evaluation
class OutputEnsemble(nn.Module):
    """(1 - a) z_ft + a z_zs (official ensemble_test) of x = [ft features, frozen features]."""

    def __init__(self, fine_tuned, zero_shot, a):
        super().__init__()
        self.fine_tuned, self.zero_shot, self.a = fine_tuned, zero_shot, a
        self.class_text_features = lambda: None  # the text side is each model's own

    def forward(self, x, text_features=None):
        f_ft, f_zs = x.chunk(2, dim=-1)
        return (1 - self.a) * self.fine_tuned(f_ft) + self.a * self.zero_shot(f_zs)


def zero_shot_features(splits, backbone, args, device) -> dict:
    """{split: (features [N, D], labels [N], prompt features [C, D])} before any update."""
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
        ft_features, _ = data.encode_images(model.eval().encode, loader, device)
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
    return data.result_record(args.method, args, task, rows, ensemble if args.method == "ensemble"
                              else trained, splits, test_loss, ensemble=rows[ensemble], **more)


if __name__ == "__main__":
    data.run_script(main, parse_args)  # a UsageError: one line, exit status 2
