"""ProReg: fine-tuning CLIP's image encoder, regularised by CLIP's own zero-shot prompt prediction,
in one file.

ProReg Zhu, Niu, Lee, Hur, Zhang. "Debiased Fine-Tuning for Vision-language Models by Prompt
       Regularization." AAAI 2023. https://arxiv.org/abs/2301.12429 (code: BeierZhu/ProReg)

Fine-tuning CLIP on a downstream training set that is biased (each class mostly in one context)
learns the bias. ProReg fine-tunes the whole image encoder with a linear head initialised from the
zero-shot prompt features ("a photo of a [CLASS].") and a trainable logit scale, and regularises it
by the frozen model's prompt prediction, which knows nothing of the task's bias: per sample,
cross-entropy to the label and KL to the prompt prediction, mixed by a sample-wise weight that moves
towards the KL term where the zero-shot prediction is confident about the true class:

    w = stopgrad( p_zs(y|x)^10 / (p_ft(y|x) + p_zs(y|x)^10 + 1e-5) )     (official losses.py: xERM)
    L = mean_i (1 - w_i) CE(z_ft_i, y_i)  +  alpha * mean_i w_i KL(p_zs_i || p_ft_i)

  python proreg.py                                    # offline world, biased task (shapes_biased)
  python proreg.py --method finetune                  # baselines: finetune fixed ensemble zeroshot
  python proreg.py --dataset caltech101 --root ~/data # ViT-B/16 openai, the whole training split
  torchrun --nproc_per_node 4 proreg.py --dataset caltech101 --root ~/data  # 4 GPUs, same batch
  python proreg.py --resume runs/proreg-...           # continue a killed run
  python proreg.py --evaluate runs/proreg-...         # re-evaluate a finished run

Methods (--method): proreg (the paper); finetune (CE only, the same prompt-initialised head: the
official prompt_finetune); fixed ((1 - a) CE + a KL, one global a = --fixed-alpha: the official
knowledge_distill); ensemble (fine-tune, then predict with (1 - a) z_ft + a z_zs, a =
--ensemble-alpha: the official ensemble_test); zeroshot (no training: zero-shot CLIP). Every run
also records zero-shot CLIP and the output ensemble of its own model on every test set.

Protocols (--protocol): all (default, the paper's), base2new, cross (data.add_run_flags). Classes
not trained on (new, other datasets) are scored with their zero-shot prompt features and the
fine-tuned image encoder.

Differs from the official code (BeierZhu/ProReg, a ViLT/Lightning scaffold around OpenAI's clip) in:
- open_clip instead of OpenAI's clip package (QuickGELU forced for the `openai` weights, data.py);
  bf16 autocast on CUDA with fp32 weights, where the official code trains in fp16 (Lightning
  precision 16).
- the frozen teacher is not a second model: where the training transform is deterministic (the
  offline world), the teacher's logits of every training image are computed once before training,
  with the very weights that are then fine-tuned; zero-shot features of every test set likewise.
  Only with random augmentation (real data), and only for the objectives that read the teacher
  (proreg, fixed), is a frozen copy of the image encoder kept (no text tower copy: its class
  features are a fixed [C, D] tensor).
- the weight formula: --weight code (default) is the active form of the official losses.py, quoted
  above. The paper's printed formula could not be read here (only its abstract was reachable), so
  --weight xerm offers the form left commented out beside it, w = CE_ft / (CE_ft + CE_zs + 1e-5)
  (the xERM paper's weight, gamma = 1), without a claim that the paper prints it; the code's form is
  the default because it is the one the authors ran.
- weight decay 0.01 spares biases and every LayerNorm parameter (the intent of the official no_decay
  list; its names, 'norm.weight' etc., do not match CLIP's 'ln_1.weight', so there LayerNorm weights
  do decay); the head (class embeddings, logit scale) decays as in the official code.
- RandAugment is torchvision's RandAugment(2, 9) where the official code ships its own port; each
  image's draw comes from a generator seeded by (seed, epoch, image index), so that the augmentation
  does not depend on worker or process layout (exact resume, DistributedDataParallel = one process).
  The offline world is not augmented (data.Benchmark.augment: a colour or geometric op would change
  its classes). RandAugment stays in the loader's workers (the other method files' crops and flips
  run batched on the device, data.train_batches; RandAugment's PIL ops have no exact tensor form).
- the global batch is one seeded permutation per epoch, cut into batches of --batch-size (the last
  incomplete one dropped, as Dassl does) and split evenly over processes and accumulation steps, so
  that N processes x K steps of B / (N K) give the update of one process with B (DDP averages).
- the last epoch is evaluated (the official code keeps the best validation checkpoint, every half
  epoch).
- alpha per dataset: the official configs cover DomainNet, PACS, NICO, BAR (2, 2, 2 / 1.5, 1); the
  CoOp datasets have none, so they take 2, the value of most of them (DATASET_SETTINGS).
- the offline world: batch 32 instead of 256 (576 training images: 256 would give 20 steps in all);
  its tiny CLIP's pretraining patch dropout is switched off for fine-tuning (OpenAI CLIP has none).

Reading map: FineTunedCLIP (the student), objective (the loss), train_step, then main (the recipe),
fine_tune, TrainingSet (batches with the teacher's logits), evaluate_run. data.py holds the run
machinery (flags, run folder, checkpoints, evaluation).
"""
import argparse
import contextlib
import copy
import functools
import os
import resource
import sys
import time

import torch
import torch.distributed as dist
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


@torch.no_grad()
def prompt_features(clip, tokenize, classnames, template):
    """Zero-shot prompt features of the classes, "a photo of a {class}." through the frozen text
    tower, not normalised (the official head starts from these) -> [C, D]."""
    ids = tokenize([template.format(c.replace("_", " ")) for c in classnames])
    ids = ids.to(clip.logit_scale.device)
    cut = int(ids.argmax(-1).max()) + 1  # positions after the last EOT never reach a feature
    return TextEncoder(clip)(clip.token_embedding(ids[:, :cut]), ids.argmax(-1)).float()


class FineTunedCLIP(nn.Module):
    """The student: CLIP's image encoder (trained), a head of class embeddings initialised from the
    zero-shot prompt features (trained, L2-normalised in the forward pass), and the logit scale
    (trained). logits = exp(logit_scale) * cos(f_theta(x), t_c): at step 0, zero-shot CLIP's."""

    def __init__(self, clip, class_embeddings):
        super().__init__()
        if not isinstance(getattr(clip.visual, "patch_dropout", nn.Identity()), nn.Identity):
            # a pretraining device (the world's tiny CLIP: 0.5; OpenAI CLIP: none), active in train
            # mode only: fine-tuning sees every patch, as the frozen teacher does
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


# --- the objectives (readable PyTorch; kernels.proreg_loss / fused_kl_ce compute the same fused)
def proreg_weight(ce_ft, ce_zs, form):
    """ProReg's sample weight w [B] from the per-sample CEs, detached (official: w_t.detach())."""
    ce_ft, ce_zs = ce_ft.detach(), ce_zs.detach()
    if form == "code":  # losses.py xERM (active): p_zs^10 / (p_ft + p_zs^10 + 1e-5)
        p_zs10 = torch.exp(-10 * ce_zs)
        return p_zs10 / (torch.exp(-ce_ft) + p_zs10 + 1e-5)
    return ce_ft / (ce_ft + ce_zs + 1e-5)  # xerm: the commented-out form, gamma = 1


def proreg_terms(logits, zs_logits, labels, form="code"):
    """Per sample: CE to the label, the prompt-regularisation term and the weight, each [B]. The KL
    term is the official soft-target cross-entropy -sum_c p_zs(c) log p_ft(c) (T = 1):
    KL(p_zs || p_ft) plus the teacher's entropy, a constant, so the same gradient."""
    ce_ft = F.cross_entropy(logits, labels, reduction="none")  # [B]
    ce_zs = F.cross_entropy(zs_logits, labels, reduction="none")  # [B]
    kl = -(F.softmax(zs_logits, dim=-1) * F.log_softmax(logits, dim=-1)).sum(-1)  # [B]
    return ce_ft, kl, proreg_weight(ce_ft, ce_zs, form)


def objective(logits, zs_logits, labels, args, use_kernel):
    """The training loss of --method on fp32 logits [B, C] (student) and zs_logits [B, C] (teacher).
    The fused kernels skip their label check: the labels are the dataset's own, and the check would
    wait for the device (not allowed inside a CUDA graph)."""
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


def adamw(model, args, device):
    """The official set_schedule: AdamW (0.9, 0.98), eps 1e-8; the head (class embeddings, logit
    scale) at lr x head_lr_mult; weight decay on every matrix and the head, not on biases and norms.
    On CUDA the lrs are tensors (a captured step reads them there) and the update is fused."""
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


def train_step(model, optimizer, x, y, zs_logits, args, use_kernel):
    """One AdamW step on this process's share of a batch (x [b, 3, H, W], y [b], zs_logits [b, C]
    on the device), in --grad-accum sequential parts; under DDP the gradients are averaged over
    processes once, at the last part. Returns (loss, number correct) as tensors, so that nothing
    waits for the device here."""
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


# --------------------------------------------------------------------------------------- settings
# Paper defaults (vilt/config.py task_finetune_*, the xERM configs), then per-dataset exceptions; a
# flag given on the command line wins over both.
PAPER = dict(epochs=10, batch_size=256, lr=1e-5, head_lr_mult=100.0, weight_decay=0.01, warmup=0.1,
             alpha=2.0, fixed_alpha=0.5, ensemble_alpha=0.5)
DATASET_SETTINGS = {
    # The offline world (every 'shapes...' benchmark): 576 training images on the biased task; at
    # the paper's batch of 256 ten epochs are 20 steps, too few to move the encoder at lr 1e-5.
    "shapes": dict(batch_size=32),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--method", default="proreg", choices=METHODS, help="proreg; finetune (CE only); fixed "
      "((1-a) CE + a KL); ensemble (finetune, then (1-a) z_ft + a z_zs); zeroshot (no training)")
    a("--weight", default="code", choices=["code", "xerm"], help="ProReg's sample weight: code = "
      "p_zs^10 / (p_ft + p_zs^10 + 1e-5) (official, active); xerm = CE_ft / (CE_ft + CE_zs + 1e-5) "
      "(official, commented out)")
    a("--alpha", type=float, help="ProReg's KL weight alpha (official configs: 1 to 2; default 2)")
    a("--fixed-alpha", type=float,
      help="--method fixed: a in (1-a) CE + a KL (official configs: 0.5, NICO-animal 0.9)")
    a("--ensemble-alpha", type=float, help="output ensemble (1-a) z_ft + a z_zs (official "
      "configs: 0.9 BAR, 0.1 NICO-animal; here 0.5)")
    a("--grad-accum", type=int, default=1, help="split each process's share of a batch into this "
      "many sequential steps (same update, less memory)")
    a("--checkpointing", action="store_true", help="activation checkpointing in the image encoder "
      "(same update, less memory, ~30%% more compute)")
    a("--lr", type=float, help="AdamW lr of the image encoder (paper: 1e-5)")
    a("--head-lr-mult", type=float, help="lr multiplier of the head and logit scale (paper: 100)")
    a("--weight-decay", type=float, help="AdamW weight decay, not on biases, norms (paper: 0.01)")
    a("--warmup", type=float, help="linear warm-up over this fraction of the steps, then linear "
      "decay to 0 (paper: 0.1)")
    a("--loss-impl", default="auto", choices=["auto", "kernel", "torch"], help="auto: the fused "
      "Triton loss where kernels.kernel_available(device), else the PyTorch form")
    data.add_run_flags(p, dataset="shapes_biased", protocol="all", shots=0,
                       shots_help="training images per class; 0 = the whole training split (paper)",
                       epochs_help="training epochs (paper: 10)",
                       batch_help="global batch over all processes and accumulation steps (paper: "
                       "256 = 4 GPUs x 16 x accumulation; the world: 32)")
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
    """Refuse, before anything is written, a setting that would run and give wrong numbers (a
    data.UsageError: one line that names the value). The batch must split over torchrun's
    processes (WORLD_SIZE) and the accumulation steps."""
    data.check_run_args(args, min_epochs=0 if args.method == "zeroshot" else 1, min_shots=0)
    data.check_int("--grad-accum", args.grad_accum, 1)
    for name in ("lr", "head_lr_mult"):
        data.check_float(f"--{name.replace('_', '-')}", getattr(args, name), above=0)
    for name in ("weight_decay", "alpha", "fixed_alpha", "ensemble_alpha"):
        data.check_float(f"--{name.replace('_', '-')}", getattr(args, name), minimum=0)
    data.check_warmup("--warmup", args.warmup, None)
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    share = world_size * args.grad_accum
    data.require(args.batch_size % share == 0, f"--batch-size {args.batch_size} does not split "
                 f"into {world_size} processes x --grad-accum {args.grad_accum}: use a multiple of "
                 f"{share}")
    data.require(args.loss_impl != "kernel" or args.weight == "code" or args.method != "proreg",
                 "--loss-impl kernel computes the official weight only: use --weight code or "
                 "--loss-impl torch")


def lr_factor(step, total, warmup):
    """transformers' polynomial schedule with power 1 and end lr 0 (official set_schedule), per
    step: linear warm-up from 0 over int(warmup * total) steps, then linear decay to 0 at total."""
    warm = int(warmup * total)
    if step < warm:
        return step / warm
    return max(0.0, (total - step) / max(1, total - warm))


def set_lr(optimizer, factor):
    for g in optimizer.param_groups:
        if torch.is_tensor(g["lr"]):
            g["lr"].fill_(g["base_lr"] * factor)
        else:
            g["lr"] = g["base_lr"] * factor


# --------------------------------------------------------------------------------------- the run
def main(args):
    if args.predict:  # --predict RUN_DIR IMAGE...: a finished run as a classifier
        return data.predict(args, load_classifier)
    start_time = time.time()
    rank, world_size = setup_distributed()
    tag = "proreg" if args.method == "proreg" else f"proreg-{args.method}"
    args, saved, out, device = data.start_run(args, tag, resolve_settings, check_settings)
    data.require(world_size == 1 or not args.evaluate, "--evaluate runs in one process: use python")
    if world_size > 1:  # one folder, whatever each process's clock says; one GPU per process
        box = [out]
        dist.broadcast_object_list(box, src=0)
        out = box[0]
        if torch.cuda.is_available():
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    say = print if rank == 0 else (lambda *a, **k: None)
    say(f"proreg --method {args.method} on {args.dataset} ({args.protocol}): {args.model}/"
        f"{args.pretrained}, seed {args.seed}, {args.epochs} epochs, batch {args.batch_size} "
        f"({world_size} process(es) x {args.grad_accum} part(s)), device {device} -> {out}")
    data.seed_everything(args.seed)  # sampling, shuffling, augmentation, a random-init backbone

    # Data and the frozen model's share: prompt features of the training classes (the head's start
    # and the teacher's classifier), zero-shot image features of every test set.
    task = data.load_task(args, device)
    clip, tokenize = task.backbone.model, task.backbone.tokenize
    zs_text = prompt_features(clip, tokenize, task.train_names, task.benchmark.template)  # [C, D]
    splits = data.evaluation_sets(task, args.protocol)
    frozen = zero_shot_features(splits, task.backbone, args, device) if rank == 0 else None
    model = FineTunedCLIP(clip, zs_text).to(device)  # the same encoder, the prompt-initialised head
    if args.evaluate:
        data.load_learned(model, saved["learned"])
        record = evaluate_run(model, frozen, splits, task, args, device)
        return data.finish_run(out, record, args, start_time)
    if rank == 0:
        data.make_run_folder(out, args, saved)
    if world_size > 1:
        dist.barrier()

    optimizer = adamw(model, args, device)
    if args.epochs:
        items = data.training_items(task, args, cache=out / "fewshot.json" if rank == 0 else None)
        train_set = TrainingSet(items, task.benchmark, task.backbone, zs_text, args, device)
        fine_tune(model, optimizer, train_set, saved, out, args, device, rank, world_size)
    elif rank == 0:  # zeroshot: nothing is trained, the initial model is the result
        data.save_checkpoint(out / "checkpoint.pt", args, 0, model, optimizer)
    memory = peak_memory(device)
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank != 0:
        return None
    record = evaluate_run(model, frozen, splits, task, args, device, processes=world_size, **memory)
    return data.finish_run(out, record, args, start_time)


def load_classifier(run_dir, classnames=None, device=None):
    """A finished run as a callable: images (PIL, paths or a batch) -> probabilities [N, C] over
    .classnames from the fine-tuned encoder: a trained class by its head row, any other name by its
    zero-shot prompt feature, as evaluate_run scores new classes (--method ensemble: the fine-tuned
    model, not the output ensemble). data.RunClassifier."""
    run = data.load_run(run_dir, device)
    clip, tokenize = run.backbone.model, run.backbone.tokenize
    model = FineTunedCLIP(clip, prompt_features(clip, tokenize, run.classnames, run.template))

    def text_features(names):
        head = dict(zip(run.classnames, model.class_text_features()))
        new = [n for n in names if n not in head]
        if new:
            zs = prompt_features(clip, tokenize, new, run.template)  # new names: as evaluate_run
            head.update(zip(new, F.normalize(zs, dim=-1)))
        return torch.stack([head[n] for n in names])
    return data.RunClassifier(model.to(run.device), run, text_features, classnames)


def fine_tune(model, optimizer, train_set, saved, out, args, device, rank, world_size):
    """The epochs (from the last saved one), the lr set per step; a checkpoint after each epoch. DDP
    averages the processes' gradients; on one GPU the step is replayed as a CUDA graph."""
    steps = train_set.n // args.batch_size  # an epoch's
    data.require(steps > 0, f"--batch-size {args.batch_size} is larger than the {train_set.n} "
                 "training images: use a smaller one")
    use_kernel = args.loss_impl == "kernel" or (args.loss_impl == "auto" and kernels is not None
                                                and kernels.kernel_available(device)
                                                and args.weight == "code")
    if rank == 0:
        print(f"fine-tuning {sum(p.numel() for p in model.parameters() if p.requires_grad):,} "
              f"parameters on {train_set.n} images of {len(train_set.zs_text)} classes, {steps} "
              f"steps an epoch, loss {'fused (kernels)' if use_kernel else 'PyTorch'}")
    start_epoch = data.restore_checkpoint(saved, model, optimizer)
    if args.checkpointing:
        model.visual.set_grad_checkpointing(True)
    net = model if world_size == 1 else DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    step_fn = functools.partial(train_step, args=args, use_kernel=use_kernel)
    step = functools.partial(step_fn, net, optimizer)
    if (kernels is not None and device.type == "cuda" and not args.eager and world_size == 1
            and args.grad_accum == 1):
        step = kernels.CapturedStep(step_fn, model, optimizer)  # the same step, as a CUDA graph
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    epochs = data.epoch_bar(args, start_epoch) if rank == 0 else range(start_epoch, args.epochs)
    for epoch in epochs:
        net.train()
        losses, correct, seen, started = [], 0, 0, time.time()
        for i, (x, y, zs_logits) in enumerate(train_set.batches(epoch, rank, world_size)):
            set_lr(optimizer, lr_factor(epoch * steps + i, args.epochs * steps, args.warmup))
            loss, n_correct = step(x, y, zs_logits)
            losses.append(loss)
            correct, seen = correct + n_correct, seen + len(y)
        fit = data.epoch_fit(losses, correct, seen, epoch, started=started)
        if rank == 0:
            data.save_checkpoint(out / "checkpoint.pt", args, epoch + 1, model, optimizer,
                                 train=fit)


def setup_distributed():
    """(rank, world size) as torchrun sets them: one process per GPU (nccl), or gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return 0, 1
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size()


def peak_memory(device) -> dict:
    """The peak memory: CUDA's allocator peak in training on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return dict(peak_memory_mb=round(torch.cuda.max_memory_allocated(device) / 2 ** 20),
                    peak_memory_of="cuda max_memory_allocated")
    return dict(peak_memory_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                peak_memory_of="process peak RSS (CPU)")


# --- the training batches
class IndexedItems(data.ImageItems):
    """(image, label) of a list of items; with `augment`, each image's RandAugment draw comes from
    a generator seeded by (seed, epoch, index), whatever process or worker loads it."""

    def __init__(self, items, open_image, transform, seed, augment):
        super().__init__(items, open_image, transform)
        self.seed, self.epoch, self.augment = seed, 0, augment

    def __getitem__(self, i):
        if not self.augment:
            return super().__getitem__(i)
        with torch.random.fork_rng(devices=[]):  # RandAugment draws from torch's global RNG
            torch.manual_seed(hash((self.seed, self.epoch, i)) % 2 ** 63)
            return super().__getitem__(i)


def epoch_batches(n, batch_size, seed, epoch, rank=0, world_size=1):
    """This process's share of every global batch of one epoch, as index lists: one permutation
    seeded by (seed, epoch), cut into batches of batch_size (the last incomplete one dropped), each
    split into world_size contiguous shares. Every process, and a resumed run, draws the same."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order, share = torch.randperm(n, generator=generator).tolist(), batch_size // world_size
    return [order[b * batch_size + rank * share: b * batch_size + (rank + 1) * share]
            for b in range(n // batch_size)]


def normalised(visual):
    """An image tower, put in eval mode, as an encoder: images -> L2-normalised features [B, D]."""
    visual.eval()
    return lambda images: F.normalize(visual(images).float(), dim=-1)


class TrainingSet:
    """The training images with their teacher logits. Deterministic transform: every image
    preprocessed once ([N, 3, H, W]) and its zero-shot logits computed once with the frozen
    encoder, before any update. Random augmentation: a loader, and a frozen copy of the image
    encoder that scores each augmented batch, for the objectives that read the teacher (proreg,
    fixed); the others (cross-entropy only) get zeros in its place."""

    def __init__(self, items, benchmark, backbone, zs_text, args, device):
        self.args, self.device, self.n = args, device, len(items)
        self.labels = torch.tensor([it.label for it in items])
        transform = data.make_transform(backbone, train=False)  # CLIP's preprocessing (the world)
        if benchmark.augment:  # real data: RandAugment(2, 9) before it
            from torchvision import transforms as T
            transform = T.Compose([T.RandAugment(2, 9), *transform.transforms])
        self.dataset = IndexedItems(items, benchmark.open_image, transform, args.seed,
                                    benchmark.augment)
        self.zs_text = F.normalize(zs_text, dim=-1)
        self.zs_scale = backbone.model.logit_scale.exp().detach()
        self.images = self.teacher_logits = self.teacher = None
        if benchmark.augment and args.method in ("proreg", "fixed"):  # others: no second encoder
            self.teacher = copy.deepcopy(backbone.model.visual).eval().requires_grad_(False)
        elif not benchmark.augment:
            print(f"no training augmentation on {args.dataset}: the teacher's logits of the "
                  f"{self.n} training images are computed once, before training (exact)")
            self.images = torch.stack([self.dataset[i][0] for i in range(self.n)])  # [N, 3, H, W]
            chunks, visual = self.images.split(args.test_batch_size), backbone.model.visual
            self.teacher_logits = torch.cat([self.zero_shot_logits(c.to(device), visual)
                                             for c in chunks])  # [N, C]

    @torch.no_grad()
    def zero_shot_logits(self, images, teacher):
        with data.autocast(images.device):
            features = normalised(teacher)(images)
        return self.zs_scale * features @ self.zs_text.t()  # [b, C]

    def batches(self, epoch, rank, world_size):
        """(images, labels, teacher logits) on the device, this process's share of each batch."""
        index_lists = epoch_batches(self.n, self.args.batch_size, self.args.seed, epoch, rank,
                                    world_size)
        if self.images is not None:
            for idx in map(torch.tensor, index_lists):
                yield (self.images[idx].to(self.device), self.labels[idx].to(self.device),
                       self.teacher_logits[idx].to(self.device))
            return
        self.dataset.epoch = epoch
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=index_lists,
                                             num_workers=self.args.workers,
                                             pin_memory=self.device.type == "cuda")
        for x, y in loader:
            x = x.to(self.device, non_blocking=True)
            zs_logits = (self.zero_shot_logits(x, self.teacher) if self.teacher is not None
                         else x.new_zeros(len(x), len(self.zs_text)))
            yield x, y.to(self.device, non_blocking=True), zs_logits


# --- evaluation
class Classifier(nn.Module):
    """Fixed class features and logit scale over L2-normalised image features [B, D]: zero-shot
    CLIP (the frozen prompt features, CLIP's scale), or the fine-tuned encoder's scale over new
    classes' prompt features."""

    def __init__(self, text_features, logit_scale):
        super().__init__()
        self.text_features = nn.Parameter(F.normalize(text_features.float(), dim=-1),
                                          requires_grad=False)
        self.logit_scale = nn.Parameter(logit_scale.detach().clone(), requires_grad=False)

    def class_text_features(self):
        return self.text_features

    def forward(self, x, text_features=None):
        text_features = self.text_features if text_features is None else text_features
        return self.logit_scale.exp() * x @ text_features.t()


class OutputEnsemble(nn.Module):
    """(1 - a) z_ft + a z_zs (official ensemble_test). x: [B, 2D], the fine-tuned and the frozen
    encoder's features of the same images side by side."""

    def __init__(self, fine_tuned, zero_shot, a):
        super().__init__()
        self.fine_tuned, self.zero_shot, self.a = fine_tuned, zero_shot, a

    def class_text_features(self):
        return None

    def forward(self, x, text_features=None):
        f_ft, f_zs = x.chunk(2, dim=-1)
        return (1 - self.a) * self.fine_tuned(f_ft) + self.a * self.zero_shot(f_zs)


def zero_shot_features(splits, backbone, args, device) -> dict:
    """{split: (features [N, D], labels [N], prompt features [C, D])} of the frozen model, before
    any update."""
    out = {}
    for name, (items, names, source) in splits.items():
        loader = data.split_loader((items, names, source), backbone, args)
        features, labels = data.encode_images(normalised(backbone.model.visual), loader, device)
        out[name] = features, labels, prompt_features(backbone.model, backbone.tokenize, names,
                                                      source.template)
    return out


def evaluate_run(model, frozen, splits, task, args, device, **more) -> dict:
    """Accuracy of the fine-tuned model, of zero-shot CLIP and of their output ensemble on every
    test set (data.evaluation_sets); prints the table, returns the record (with `more`). Classes
    that were not trained (new, other datasets) are scored with their zero-shot prompt features and
    the fine-tuned encoder."""
    trained = "finetune" if args.method == "ensemble" else args.method  # the fine-tuned model's row
    ensemble = "ensemble" if args.method == "ensemble" else f"{args.method}+ensemble"
    rows, test_loss = {"zero-shot CLIP": {}, trained: {}, ensemble: {}}, {}
    for split, (items, names, source) in splits.items():
        zs_features, labels, zs_text = frozen[split]
        loader = data.split_loader((items, names, source), task.backbone, args)
        ft_features, _ = data.encode_images(normalised(model.visual), loader, device)
        fine_tuned = model if names == task.train_names else Classifier(zs_text, model.logit_scale)
        zero_shot = Classifier(zs_text, task.backbone.model.logit_scale)
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
