"""CoOp and CoCoOp: learning the context words of CLIP's prompts, in one file.

CoOp   Zhou, Yang, Loy, Liu. "Learning to Prompt for Vision-Language Models." IJCV 2022.
       https://arxiv.org/abs/2109.01134
CoCoOp Zhou, Yang, Loy, Liu. "Conditional Prompt Learning for Vision-Language Models." CVPR 2022.
       https://arxiv.org/abs/2203.05557

CLIP classifies an image by the cosine between its feature and the text feature of one prompt per
class ("a photo of a {class}."). CoOp freezes both encoders and learns the context words as M
continuous vectors, [SOS][v_1]..[v_M][CLASS][.][EOS], with cross-entropy on a few labelled images of
the base classes. CoCoOp adds a small meta-net that maps each image feature to one shift added to
every context vector, so the prompt depends on the image; it transfers better to classes never
trained on, at the price of one text pass per (image, class) pair.

  python coop.py                                      # offline world (shapes, tiny CLIP), CoOp
  python coop.py --conditional                        # offline world, CoCoOp
  python coop.py --dataset caltech101 --root ~/data   # paper setting: ViT-B/16 openai, 16 shots
  python coop.py --dataset caltech101 --root ~/data --conditional
  python coop.py --resume runs/coop-caltech101-16shot-seed1-...     # continue a killed run
  python coop.py --evaluate runs/coop-caltech101-16shot-seed1-...   # re-evaluate a finished run
  python coop.py --protocol all --shots 4             # few-shot on all classes (CoOp's main table)
  python coop.py --protocol cross --dataset imagenet --root ~/data  # cross-dataset and domain generalisation
  python coop.py --evaluate RUN_DIR --eval-datasets dtd,eurosat     # a saved run on other datasets

Evaluation protocols (--protocol):
- base2new (default): CoCoOp's base-to-new. Train on the base half of the classes; accuracy on the base
  and the new half, each in its own label space, their harmonic mean, and the benchmark's shifted test
  sets restricted to the base classes (the world's other styles; ImageNet's variants).
- all: CoOp's few-shot setting. Train and test on every class (one `all` accuracy), plus the shifted
  test sets each in its own label space (domain generalisation: ImageNet-A and -R have 200 classes).
- cross: cross-dataset transfer. Train as `all`, then evaluate on other datasets, each in its own label
  space (--eval-datasets; default: ImageNet -> the other ten datasets, the world -> its second task).

Differs from the official code (KaiyangZhou/CoOp) in:
- open_clip instead of OpenAI's clip package (QuickGELU forced for the `openai` weights, as theirs).
- fp32 learned tensors (context and meta-net) with bf16 autocast on CUDA, where the official code
  runs everything in fp16; bf16 is coarser than fp16 per value, but needs no loss scaling.
- the text transformer runs only up to the longest prompt's end-of-text token (exact, see
  TextEncoder); frozen image features are computed once where no random augmentation applies
  (the offline world), and once per evaluation split.
- the context length M of --ctx-init counts BPE tokens ("itap of a" is 4 tokens); the official
  code counts words (3 there) and so mis-sizes the context for such words.
- CoCoOp is batched over images (one text pass for a chunk of images) instead of a loop per image.
- --csc with --ctx-init starts every class from the words (the official code silently drops --csc).
- on CUDA the training step is recorded once as a CUDA graph and replayed (CapturedStep); the lr is
  a tensor filled in place each epoch, and SGD is the fused implementation there (same update).
- a checkpoint is written after every epoch, with what the next epoch needs (--resume).
"""
import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import data


# ------------------------------------------------------------------------------------------ settings
def coop_epochs(shots):  # CoOp's epochs follow the shot count (scripts/coop/main.sh)
    return 50 if shots <= 1 else 100 if shots <= 4 else 200


# Paper defaults, then per-dataset exceptions; a flag given on the command line wins over both.
PAPER = {"coop": dict(batch_size=32), "cocoop": dict(batch_size=1, epochs=10)}
DATASET_SETTINGS = {
    "imagenet": {"coop": dict(epochs=50)},  # CoOp's *_ep50 configs, for every shot count
    # The offline world (every 'shapes...' benchmark) runs the paper settings as they are: with the tiny
    # CLIP and cached image features, CoOp's 200 epochs and CoCoOp's 10 take ~30 s each on 2 CPU cores.
    "shapes": {},
}
# What each protocol trains on. The official configs use the same settings in every protocol: CoOp's epochs
# follow the shot count, CoCoOp runs 10 epochs, and cross-dataset/domain generalisation train on ImageNet
# at 16 shots (the --shots default); so this dict holds only the class set.
PROTOCOLS = {"base2new": dict(train_classes="base"), "all": dict(train_classes="all"),
             "cross": dict(train_classes="all")}
PROMPTS_PER_PASS = 4096  # CoCoOp: at most this many (image, class) prompts in one text pass
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
      help="open_clip model name; default: data.default_backbone(dataset) (paper: ViT-B-16)")
    a("--pretrained", default=None,
      help="open_clip pretrained tag, 'none' for random init; required with --model (paper: openai)")
    a("--conditional", action="store_true",
      help="CoCoOp: add the meta-net that shifts the context per image (off: CoOp; official: --trainer CoCoOp)")
    a("--n-ctx", type=int, default=4,
      help="context tokens M when --ctx-init is empty (CoCoOp-paper setting: 4)")
    a("--ctx-init", default="a photo of a",
      help="words that initialise the context (M = their BPE token count); '' = random N(0, 0.02^2) "
           "(CoCoOp-paper setting: a photo of a)")
    a("--csc", action="store_true",
      help="CoOp: class-specific context, one per class (paper default: off, unified)")
    a("--class-token-position", default="end", choices=["end", "middle", "front"],
      help="CoOp: where the class name sits (paper: end)")
    a("--protocol", default="base2new", choices=list(PROTOCOLS),
      help="base2new: train on the base half, test base/new (CoCoOp); all: train and test on every class "
           "(CoOp); cross: as all, then test on --eval-datasets (cross-dataset transfer)")
    a("--eval-datasets", default=None, metavar="A,B,C",
      help="other datasets to test on after training, each in its own label space; default for --protocol "
           "cross: imagenet -> the other ten CoOp datasets, shapes -> shapes2 (the world's second task). "
           "With --evaluate: test a saved run on these")
    a("--shots", type=int, default=16,
      help="training images per class, sampled on all classes before the base/new split (paper: 16)")
    a("--epochs", type=int, default=None,
      help="default: CoOp 50/100/200 for 1/2-4/8-16 shots (ImageNet 50), CoCoOp 10; see DATASET_SETTINGS")
    a("--batch-size", type=int, default=None, help="default: CoOp 32, CoCoOp 1, the paper values")
    a("--lr", type=float, default=0.002,
      help="SGD learning rate after warm-up, cosine-annealed per epoch (paper: 0.002)")
    a("--momentum", type=float, default=0.9, help="SGD momentum (Dassl default: 0.9)")
    a("--weight-decay", type=float, default=5e-4, help="SGD weight decay (Dassl default: 5e-4)")
    a("--warmup-epochs", type=int, default=1, help="constant warm-up epochs before the cosine (paper: 1)")
    a("--warmup-lr", type=float, default=1e-5, help="learning rate during warm-up (paper: 1e-5)")
    a("--test-batch-size", type=int, default=100, help="evaluation batch size (Dassl: 100)")
    a("--workers", type=int, default=min(4, os.cpu_count() or 1),
      help="data-loader worker processes (Dassl: 4, here capped at the CPU count)")
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
    """Fill the settings left at None: command line > DATASET_SETTINGS > paper default; then check them."""
    method = "cocoop" if args.conditional else "coop"
    paper = dict(PAPER[method], epochs=PAPER[method].get("epochs", coop_epochs(args.shots)))
    dataset = "shapes" if args.dataset.startswith(data.WORLD_PREFIX) else args.dataset
    for key, value in {**paper, **DATASET_SETTINGS.get(dataset, {}).get(method, {})}.items():
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
    tokenized (PromptLearner)."""
    for name in ("epochs", "batch_size", "shots", "test_batch_size"):
        data.check_int(f"--{name.replace('_', '-')}", getattr(args, name), 1)
    for name in ("warmup_epochs", "workers"):
        data.check_int(f"--{name.replace('_', '-')}", getattr(args, name), 0)
    data.check_float("--lr", args.lr, above=0)
    for name in ("momentum", "weight_decay", "warmup_lr"):
        data.check_float(f"--{name.replace('_', '-')}", getattr(args, name), minimum=0)
    data.require(args.ctx_init.strip() or args.n_ctx >= 1,
                 f"--n-ctx {args.n_ctx} with an empty --ctx-init: the prompt needs at least one context token")
    data.require(not (args.csc and args.conditional),
                 "--csc is CoOp's class-specific context; CoCoOp (--conditional) has one shared context")
    data.require(args.protocol != "cross" or eval_datasets(args), f"--protocol cross names no default "
                 f"targets for {args.dataset}: list them with --eval-datasets")
    data.require(not (args.csc and eval_datasets(args)),
                 "--csc learns one context per class of the training dataset: other datasets have no prompt")


def eval_datasets(args):
    """The other datasets a run is tested on (--eval-datasets), as a list."""
    return [name.strip() for name in (getattr(args, "eval_datasets", None) or "").split(",") if name.strip()]


def learning_rate(epoch, args):
    """Dassl's schedule, stepped once per epoch: constant warm-up, then cosine over all epochs.
    eta_0 = warmup_lr; eta_e = lr/2 (1 + cos(pi (e - W) / E)) for e >= W (never reaches 0)."""
    if epoch < args.warmup_epochs:
        return args.warmup_lr
    return 0.5 * args.lr * (1 + math.cos(math.pi * (epoch - args.warmup_epochs) / args.epochs))


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
class PromptLearner(nn.Module):
    """The learned context V ([M, d], or [C, M, d] with --csc) and, for CoCoOp, the meta-net.
    Returns the prompt embeddings [SOS][V][CLASS][.][EOS][pad] for the current class names."""

    def __init__(self, clip, tokenize, classnames, args):
        super().__init__()
        self.tokenize, self.token_embedding = tokenize, clip.token_embedding
        self.position, self.truncate = args.class_token_position, not getattr(args, "no_truncate", False)
        device, n_cls = clip.token_embedding.weight.device, len(classnames)
        ctx_dim = clip.ln_final.weight.shape[0]  # text width d (512 for ViT-B/16)
        context_length = tokenize(["x"]).shape[1]  # L: 77 for OpenAI CLIP
        if args.ctx_init:
            ids = tokenize([args.ctx_init]).to(device)  # [1, L]; cut to L by the tokenizer
            self.n_ctx = int(ids.argmax(-1)) - 1  # BPE tokens between SOS and EOT: "a photo of a" -> 4
            data.require(self.n_ctx + 2 < context_length, f"--ctx-init {args.ctx_init!r} does not fit the text "
                         f"context of {context_length} tokens with a class name: use fewer words")
            with torch.no_grad():
                ctx_vectors = self.token_embedding(ids)[0, 1:1 + self.n_ctx].float()  # [M, d]
            if args.csc:  # every class starts from the words
                ctx_vectors = ctx_vectors.repeat(n_cls, 1, 1)  # [C, M, d]
            self.prefix_words = args.ctx_init
        else:
            self.n_ctx = args.n_ctx
            data.require(self.n_ctx + 3 < context_length, f"--n-ctx {self.n_ctx} does not fit the text context "
                         f"of {context_length} tokens with a class name: use fewer")
            ctx_vectors = torch.empty((n_cls, self.n_ctx, ctx_dim) if args.csc else (self.n_ctx, ctx_dim),
                                      device=device)
            nn.init.normal_(ctx_vectors, std=0.02)
            self.prefix_words = " ".join(["X"] * self.n_ctx)  # placeholders whose embeddings V replaces
        self.ctx = nn.Parameter(ctx_vectors)  # fp32 master copy, whatever the backbone's precision
        self.meta_net = None
        if args.conditional:  # CoCoOp's h_theta: Linear(D, D/16) - ReLU - Linear(D/16, d)
            vis_dim = clip.text_projection.shape[1]  # image and text features share the dimension D
            self.meta_net = nn.Sequential(OrderedDict(  # the official layer names, so state_dict keys match
                linear1=nn.Linear(vis_dim, vis_dim // 16), relu=nn.ReLU(inplace=True),
                linear2=nn.Linear(vis_dim // 16, ctx_dim))).to(device)
        self.set_classes(classnames)

    def set_classes(self, classnames):
        """Build the frozen parts of the prompts for these class names (base for training, new for testing)."""
        names = [c.replace("_", " ") for c in classnames]
        device = self.token_embedding.weight.device
        ids = self.tokenize([f"{self.prefix_words} {name}." for name in names]).to(device)  # [C, L]
        eot = ids.argmax(-1)  # [C]: EOT has the largest token id
        too_long = [name for name, e in zip(names, eot.tolist()) if e >= ids.shape[1] - 1]  # cut by the tokenizer
        data.require(not too_long, f"the prompt '{self.prefix_words} <class>.' does not fit the text context "
                     f"of {ids.shape[1]} tokens for {len(too_long)} classes (e.g. {(too_long or [''])[0]!r}): "
                     "use a shorter --ctx-init or fewer --n-ctx")
        # Truncation: positions after the longest prompt's EOT never reach a feature (causal mask).
        length = int(eot.max()) + 1 if self.truncate else ids.shape[1]
        ids = ids[:, :length]
        with torch.no_grad():
            emb = self.token_embedding(ids).float()  # [C, n, d]
        self.register_buffer("token_prefix", emb[:, :1], persistent=False)  # SOS [C, 1, d]
        self.register_buffer("token_suffix", emb[:, 1 + self.n_ctx:], persistent=False)  # CLASS . EOS pad
        self.register_buffer("eot", eot, persistent=False)
        # Class-token position as a per-class reordering of the 'end' layout [SOS][V][CLASS][rest]:
        # middle = [SOS][V_1..V_M/2][CLASS][V_M/2+1..V_M][rest], front = [SOS][CLASS][V][rest].
        name_lens = (self.tokenize(names).argmax(-1) - 1).tolist()  # BPE tokens per class name
        order = torch.arange(length).repeat(len(names), 1)  # [C, n]
        m, half = self.n_ctx, self.n_ctx // 2
        for i, n in enumerate(name_lens):
            ctx_pos, cls_pos = list(range(1, 1 + m)), list(range(1 + m, 1 + m + n))
            new = {"end": ctx_pos + cls_pos, "front": cls_pos + ctx_pos,
                   "middle": ctx_pos[:half] + cls_pos + ctx_pos[half:]}[self.position]
            order[i, 1:1 + m + n] = torch.tensor(new)
        self.register_buffer("order", order.to(device), persistent=False)

    def forward(self, shift=None):
        """shift: [B, d] meta-net output (CoCoOp) or None. Returns prompts [C, n, d] or [B, C, n, d],
        and eot [C]."""
        n_cls = len(self.eot)
        ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.expand(n_cls, -1, -1)  # [C, M, d]
        prefix, suffix = self.token_prefix, self.token_suffix
        if shift is not None:  # CoCoOp: v_m(x) = v_m + pi(x), the same shift for every context token
            ctx = ctx + shift[:, None, None, :]  # [B, C, M, d]
            prefix, suffix = (t.expand(len(shift), -1, -1, -1) for t in (prefix, suffix))
        prompts = torch.cat([prefix, ctx, suffix], dim=-2)  # [(B,) C, n, d], 'end' layout
        if self.position != "end":
            prompts = prompts[..., torch.arange(n_cls, device=ctx.device)[:, None], self.order, :]
        return prompts, self.eot


class PromptedCLIP(nn.Module):
    """Frozen CLIP + learned prompts. logits = s * cos(f(x), g(t_c)), s = CLIP's frozen exp(logit_scale)."""

    def __init__(self, clip, tokenize, classnames, args):
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self.prompt_learner = PromptLearner(clip, tokenize, classnames, args)
        self.text_encoder = TextEncoder(clip)

    @torch.no_grad()
    def encode_image(self, images):  # [B, 3, H, W] -> L2-normalised [B, D]; frozen in CoOp and CoCoOp
        return F.normalize(self.clip.encode_image(images).float(), dim=-1)

    def class_text_features(self):
        """[C, D] normalised class prompt features, computed once per evaluation; None when the prompts
        depend on the image (CoCoOp)."""
        if self.prompt_learner.meta_net is not None:
            return None
        prompts, eot = self.prompt_learner()
        return F.normalize(self.text_encoder(prompts, eot).float(), dim=-1)

    def forward(self, x, text_features=None):
        """x: images [B, 3, H, W], or their precomputed features [B, D] (the image encoder is frozen)."""
        image_features = x if x.dim() == 2 else self.encode_image(x)  # [B, D]
        scale = self.clip.logit_scale.exp()
        if self.prompt_learner.meta_net is None:  # CoOp: one prompt per class, shared by all images
            text_features = self.class_text_features() if text_features is None else text_features
            return scale * image_features @ text_features.t()  # [B, C]
        logits, n_cls = [], len(self.prompt_learner.eot)
        for chunk in image_features.split(max(1, PROMPTS_PER_PASS // n_cls)):  # CoCoOp: C prompts per image
            prompts, eot = self.prompt_learner(self.prompt_learner.meta_net(chunk))  # [b, C, n, d]
            text_features = self.text_encoder(prompts.flatten(0, 1), eot.repeat(len(chunk)))  # [b*C, D]
            text_features = F.normalize(text_features.float(), dim=-1).view(len(chunk), n_cls, -1)  # [b, C, D]
            logits.append(scale * torch.einsum("bd,bcd->bc", chunk, text_features))
        return torch.cat(logits)  # [B, C]


def sgd(learned, args, device):
    """Dassl's SGD, with the lr in a tensor that the schedule fills in place, so that a captured step
    reads each epoch's value (fused SGD reads it on the GPU; float64 on the CPU is the update of a
    Python float, bit for bit)."""
    lr = torch.tensor(args.lr, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    return torch.optim.SGD(learned, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay,
                           fused=device.type == "cuda")


def train_step(model, optimizer, x, y):
    """One SGD step on a batch already on the device. Returns (loss, number correct) as tensors, so
    that nothing waits for the device here."""
    with autocast(x.device):
        logits = model(x)  # [B, C]
    loss = F.cross_entropy(logits.float(), y)  # CE over the base classes: CoOp's whole objective
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (logits.argmax(-1) == y).sum()


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
        image_features = x if x.dim() == 2 else F.normalize(self.clip.encode_image(x).float(), dim=-1)
        text_features = self.class_text_features() if text_features is None else text_features
        return self.clip.logit_scale.exp() * image_features @ text_features.t()


@torch.no_grad()
def encode_images(model, loader, device):
    """Frozen image features of a whole split, once: [N, D] normalised, labels [N]."""
    features, labels = [], []
    for images, y in tqdm(loader, desc="image features", leave=False):
        with autocast(device):
            features.append(model.encode_image(images.to(device)))
        labels.append(y)
    return torch.cat(features), torch.cat(labels).to(device)


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
    method = "cocoop" if args.conditional else "coop"
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

    # Seeding: everything random below (few-shot sampling, context init, shuffling) follows args.seed.
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
    if not saved:  # only once data, weights and prompts are there: a run that cannot start leaves no folder
        if args.overwrite and (out / "checkpoint.pt").exists():
            shutil.rmtree(out)  # the whole old run goes, so no file of it is left beside the new results
        out.mkdir(parents=True, exist_ok=True)
        data.atomic_write_text(json.dumps(vars(args), indent=2), out / "args.json")
    train_items = data.fewshot(benchmark.train, args.shots, args.seed, cache=out / "fewshot.json")
    train_items, _ = data.subsample_classes(train_items, benchmark.classnames, train_classes)
    train_loader = training_batches(model, train_items, benchmark, backbone, args, device)

    # Optimiser: SGD on the context (and CoCoOp's meta-net), its lr a tensor the schedule fills in place.
    learned = [p for p in model.parameters() if p.requires_grad]
    optimizer = sgd(learned, args, device)
    lr = optimizer.param_groups[0]["lr"]
    if device.type == "cuda" and not args.eager:
        step = CapturedStep(train_step, model, optimizer)  # same step, replayed as one CUDA graph
    else:
        step = lambda x, y: train_step(model, optimizer, x, y)  # noqa: E731
    print(f"learning {sum(p.numel() for p in learned):,} parameters on {len(train_items)} images "
          f"of {len(train_names)} {train_classes} classes")
    start_epoch = restore_training(saved, model, optimizer, train_loader) if saved else 0

    epochs_bar = tqdm(range(start_epoch, args.epochs), desc="train", initial=start_epoch, total=args.epochs)
    for epoch in epochs_bar:
        lr.fill_(learning_rate(epoch, args))  # Dassl steps the scheduler once per epoch
        step_losses, correct, seen = [], 0, 0
        for x, y in tqdm(train_loader, desc=f"epoch {epoch + 1}", leave=False):
            loss, n_correct = step(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            step_losses.append(loss)
            correct, seen = correct + n_correct, seen + len(y)
        step_losses = torch.stack(step_losses).cpu()  # one wait for the device per epoch
        if not torch.isfinite(step_losses).all():
            bad = int((~torch.isfinite(step_losses)).nonzero()[0])
            raise SystemExit(f"error: the loss became {step_losses[bad].item()} at epoch {epoch + 1}, step "
                             f"{bad + 1} (lr {learning_rate(epoch, args):.3g}); nothing was recorded as a "
                             "result. Lower --lr.")
        epochs_bar.set_postfix(lr=f"{learning_rate(epoch, args):.2e}", loss=f"{step_losses.mean():.3f}",
                               acc=f"{float(correct) / seen:.3f}")
        train_fit = {"loss": round(float(step_losses.mean()), 4), "acc": round(100 * float(correct) / seen, 2)}
        save_training(out / "checkpoint.pt", args, epoch + 1, model, optimizer, train_loader, train_fit)

    record = evaluate_run(model, benchmark, targets, backbone, train_names, args, device)
    checkpoint = data.load_checkpoint(out / "checkpoint.pt")
    record["train"] = checkpoint["train"]  # the last epoch's training loss and accuracy (%)
    record["wall_s"] = round(time.time() - start_time, 1)
    data.atomic_write_text(json.dumps(record, indent=2), out / "results.json")
    data.atomic_save({**checkpoint, "metrics": record}, out / "checkpoint.pt")
    data.append_result(Path(args.results_file or out.parent / "results.jsonl"), record)
    print(f"wrote {out / 'results.json'}, {out / 'checkpoint.pt'}")
    return record


def training_batches(model, items, benchmark, backbone, args, device):
    """Training batches of (images, labels), or of (frozen image features, labels) where no random
    augmentation applies: the frozen encoder then gives every image the same feature in every epoch."""
    if benchmark.augment:  # random crops and flips: the image encoder runs on every training batch
        return data.make_loader(items, benchmark, backbone, True, args.batch_size, args.seed, args.workers)
    print(f"no training augmentation on {args.dataset}: caching the frozen image features of the "
          f"{len(items)} training images once (exact)")
    plain = data.make_loader(items, benchmark, backbone, False, args.test_batch_size, args.seed, args.workers)
    features, labels = encode_images(model, plain, device)
    return DataLoader(TensorDataset(features, labels), batch_size=args.batch_size, shuffle=True,
                      drop_last=len(features) >= args.batch_size,
                      generator=torch.Generator().manual_seed(args.seed))


def evaluate_run(model, benchmark, targets, backbone, train_names, args, device) -> dict:
    """Accuracy of the learned prompts and of zero-shot CLIP on the protocol's test sets (evaluation_sets);
    prints the table, returns the record."""
    splits = evaluation_sets(benchmark, targets, train_names, args.protocol)
    method_name = "CoCoOp" if args.conditional else "CoOp"
    rows, test_loss = {"zero-shot CLIP": {}, method_name: {}}, {}
    for split, (items, names, source) in splits.items():
        if args.csc and names != train_names:
            print(f"--csc: the learned contexts belong to the training classes; no prompt exists for {split}")
            continue
        loader = data.make_loader(items, source, backbone, False, args.test_batch_size, args.seed,
                                  args.workers)
        features, labels = encode_images(model, loader, device)  # once per split
        batches = list(zip(features.split(args.test_batch_size), labels.split(args.test_batch_size)))
        model.prompt_learner.set_classes(names)
        metrics = evaluate(model, batches)
        rows[method_name][split], test_loss[split] = metrics["acc"], metrics["loss"]
        zero_shot = ZeroShotCLIP(backbone.model, backbone.tokenize, names, source.template)
        rows["zero-shot CLIP"][split] = evaluate(zero_shot, batches)["acc"]
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
    return dict(method="cocoop" if args.conditional else "coop", protocol=args.protocol, dataset=args.dataset,
                backbone=backbone.name, pretrained=backbone.pretrained, shots=args.shots, seed=args.seed,
                epoch=args.epochs, base=ours.get("base"), new=ours.get("new"), hm=ours["hm"], all=ours.get("all"),
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
def save_training(path, args, epoch, model, optimizer, train_loader, train_fit):
    """After each epoch, atomically: the learned tensors and everything the next epoch depends on (the
    optimiser state, the random states of Python, NumPy, torch and the loader's shuffling), and the
    epoch's training loss and accuracy (train_fit). Plain tensors, numbers and strings only, so that it
    loads with weights_only=True."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    data.atomic_save({
        "learned": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "args": vars(args), "epoch": epoch, "metrics": None, "train": train_fit,
        "optimizer": optimizer.state_dict(),
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


def restore_training(saved, model, optimizer, train_loader):
    """Put a saved epoch back (see save_training); returns the number of epochs already done."""
    load_learned(model, saved["learned"])
    lr = optimizer.param_groups[0]["lr"]
    optimizer.load_state_dict(saved["optimizer"])
    for group in optimizer.param_groups:  # keep the one lr tensor the schedule fills
        group["lr"] = lr
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
    """Evaluate a finished run's learned tensors again with its saved settings, on the datasets of
    --eval-datasets when given (else the run's own); writes RUN_DIR/eval.json and nothing else (the
    run's results and the results file are left as they are)."""
    run_dir = Path(args.evaluate)
    saved = load_run(run_dir)
    if saved["epoch"] < saved["args"]["epochs"]:
        raise SystemExit(f"error: {run_dir} stopped after epoch {saved['epoch']} of {saved['args']['epochs']}: "
                         f"finish it with --resume {run_dir}")
    other_datasets = args.eval_datasets  # runs saved before --protocol existed were base2new runs
    args = argparse.Namespace(**{"protocol": "base2new", "eval_datasets": None, **saved["args"],
                                 **{k: getattr(args, k) for k in LOCAL_SETTINGS}})
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
