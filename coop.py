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
trained on, at the price of one text pass per (image, class) pair. Evaluation follows the CoCoOp
base-to-new protocol: accuracy on the base classes, on the new classes, and their harmonic mean.

  python coop.py                                      # offline world (shapes, tiny CLIP), CoOp
  python coop.py --conditional                        # offline world, CoCoOp
  python coop.py --dataset caltech101 --root ~/data   # paper setting: ViT-B/16 openai, 16 shots
  python coop.py --dataset caltech101 --root ~/data --conditional
  python coop.py --eval-only --resume runs/coop-caltech101-16shot-seed1-...   # re-evaluate a run

Differs from the official code (KaiyangZhou/CoOp) in: open_clip instead of OpenAI's clip package;
fp32 prompts with bf16 autocast on CUDA instead of pure fp16; the text transformer runs only up to
the longest prompt (exact, see TextEncoder); frozen image features computed once where no random
augmentation applies; CoCoOp batched over images; --csc with --ctx-init starts every class from the
words (the official code silently drops --csc there).
"""
import argparse
import json
import math
import os
import random
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

# Paper defaults, then per-dataset exceptions; a flag given on the command line wins over both.
def coop_epochs(shots):  # CoOp's epochs follow the shot count (scripts/coop/main.sh)
    return 50 if shots <= 1 else 100 if shots <= 4 else 200


PAPER = {"coop": dict(batch_size=32), "cocoop": dict(batch_size=1, epochs=10)}
DATASET_SETTINGS = {
    "imagenet": {"coop": dict(epochs=50)},  # CoOp's *_ep50 configs, for every shot count
    # The offline world (every 'shapes...' benchmark) runs the paper settings as they are: with the
    # tiny CLIP and cached image features, CoOp's 200 epochs and CoCoOp's 10 take ~30 s each on 2 CPU cores.
    "shapes": {},
}
PROMPTS_PER_PASS = 4096  # CoCoOp: at most this many (image, class) prompts in one text pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--dataset", default="shapes", help="benchmark name for data.load_dataset (shapes = the built-in offline world; paper: 11 datasets, e.g. caltech101)")
    a("--root", default="~/data", help="folder holding the datasets in CoOp's layout, as DATASET.ROOT (unused by the world)")
    a("--download", action="store_true", help="let data.py download what torchvision can download (the papers: manual download)")
    a("--model", default=None, help="open_clip model name; default: data.default_backbone(dataset) (paper: ViT-B-16)")
    a("--pretrained", default=None, help="open_clip pretrained tag, 'none' for random init; required with --model (paper: openai)")
    a("--conditional", action="store_true", help="CoCoOp: add the meta-net that shifts the context per image (off: CoOp; official: --trainer CoCoOp)")
    a("--n-ctx", type=int, default=4, help="context tokens M when --ctx-init is empty (CoCoOp-paper setting: 4)")
    a("--ctx-init", default="a photo of a", help="words that initialise the context (M = their token count); '' = random N(0, 0.02^2) (CoCoOp-paper setting: a photo of a)")
    a("--csc", action="store_true", help="CoOp: class-specific context, one per class (paper default: off, unified)")
    a("--class-token-position", default="end", choices=["end", "middle", "front"], help="CoOp: where the class name sits (paper: end)")
    a("--shots", type=int, default=16, help="training images per class, sampled on all classes before the base/new split (paper: 16)")
    a("--epochs", type=int, default=None, help="default: CoOp 50/100/200 for 1/2-4/8-16 shots (ImageNet 50), CoCoOp 10; paper values; see DATASET_SETTINGS")
    a("--batch-size", type=int, default=None, help="default: CoOp 32, CoCoOp 1, the paper values; see DATASET_SETTINGS")
    a("--lr", type=float, default=0.002, help="SGD learning rate after warm-up, cosine-annealed per epoch (paper: 0.002)")
    a("--momentum", type=float, default=0.9, help="SGD momentum (Dassl default: 0.9)")
    a("--weight-decay", type=float, default=5e-4, help="SGD weight decay (Dassl default: 5e-4)")
    a("--warmup-epochs", type=int, default=1, help="constant warm-up epochs before the cosine (paper: 1)")
    a("--warmup-lr", type=float, default=1e-5, help="learning rate during warm-up (paper: 1e-5)")
    a("--test-batch-size", type=int, default=100, help="evaluation batch size (Dassl: 100)")
    a("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loader worker processes (Dassl: 4, here capped at the CPU count)")
    a("--seed", type=int, default=1, help="seed for sampling, initialisation and shuffling (papers: 1, 2, 3)")
    a("--no-truncate", action="store_true", help="run the text transformer over all context positions (slower, same result; the official code always does)")
    a("--bench-steps", type=int, default=0, help="if > 0: time this many training steps with and without truncation, print the ratio, exit (not in the papers)")
    a("--output-dir", default=None, help="run folder; default runs/<method>-<dataset>-<shots>shot-seed<seed>-<time> (official: --output-dir)")
    a("--overwrite", action="store_true", help="allow writing into a run folder that already holds a checkpoint (the official scripts skip a folder that exists)")
    a("--results-file", default=None, help="JSON-lines file that gets one line per run; default <output-dir>/../results.jsonl (the papers parse log.txt)")
    a("--eval-only", action="store_true", help="evaluate the run in --resume with its saved settings, without training (official: --eval-only --model-dir)")
    a("--resume", default=None, help="run folder whose checkpoint.pt --eval-only loads (official: --model-dir, --load-epoch)")
    a("--device", default=None, help="torch device; default cuda if available, else cpu (papers: one GPU)")
    return p.parse_args(argv)


def resolve_settings(args):
    """Fill the settings left at None: command line > DATASET_SETTINGS > paper default."""
    method = "cocoop" if args.conditional else "coop"
    paper = dict(PAPER[method], epochs=PAPER[method].get("epochs", coop_epochs(args.shots)))
    dataset = "shapes" if args.dataset.startswith(data.WORLD_PREFIX) else args.dataset
    for key, value in {**paper, **DATASET_SETTINGS.get(dataset, {}).get(method, {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model is None:
        args.model, default_pretrained = data.default_backbone(args.dataset)
        args.pretrained = default_pretrained if args.pretrained is None else args.pretrained
    elif args.pretrained is None:  # never fall back to random weights silently
        raise SystemExit("--model needs --pretrained (an open_clip tag, or 'none' for random init)")
    if args.pretrained in ("none", "None", ""):
        args.pretrained = None
    return args


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
    which is all CLIP uses, never depends on later positions: running the transformer over the first
    max(EOT) + 1 positions gives exactly the features of the full context (77 for OpenAI CLIP)."""

    def __init__(self, clip):
        super().__init__()
        assert clip.transformer.batch_first and clip.text_pool_type == "argmax", "needs open_clip's standard text tower"
        self.resblocks = clip.transformer.resblocks
        self.positional_embedding = clip.positional_embedding  # [L, d]
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection  # [d, D]
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)  # [L, L], -inf above the diagonal
        self.truncate = True

    def forward(self, prompts, eot):
        """prompts: [N, L, d] token embeddings; eot: [N] EOT positions. Returns features [N, D]."""
        n = int(eot.max()) + 1 if self.truncate else prompts.shape[1]
        x = prompts[:, :n] + self.positional_embedding[:n]  # [N, n, d]
        for block in self.resblocks:
            x = block(x, attn_mask=self.attn_mask[:n, :n])
        x = self.ln_final(x)
        return x[torch.arange(len(x), device=x.device), eot] @ self.text_projection  # [N, D]
# ==== end shared block ====


class PromptLearner(nn.Module):
    """The learned context V ([M, d], or [C, M, d] with --csc) and, for CoCoOp, the meta-net.
    Returns the prompt embeddings [SOS][V][CLASS][.][EOS][pad] for the current class names."""

    def __init__(self, clip, tokenize, classnames, args):
        super().__init__()
        self.tokenize, self.token_embedding, self.position = tokenize, clip.token_embedding, args.class_token_position
        device, n_cls = clip.token_embedding.weight.device, len(classnames)
        ctx_dim = clip.ln_final.weight.shape[0]  # text width d (512 for ViT-B/16)
        if args.ctx_init:
            ids = tokenize([args.ctx_init]).to(device)  # [1, L]
            self.n_ctx = int(ids.argmax(-1)) - 1  # BPE tokens between SOS and EOT: "a photo of a" -> 4
            with torch.no_grad():
                ctx = self.token_embedding(ids)[0, 1:1 + self.n_ctx].float()  # [M, d]
            ctx = ctx.repeat(n_cls, 1, 1) if args.csc else ctx  # [C, M, d]: every class starts from the words
            self.prefix_words = args.ctx_init
        else:
            self.n_ctx = args.n_ctx
            ctx = torch.empty((n_cls, self.n_ctx, ctx_dim) if args.csc else (self.n_ctx, ctx_dim), device=device)
            nn.init.normal_(ctx, std=0.02)
            self.prefix_words = " ".join(["X"] * self.n_ctx)  # placeholders whose embeddings V replaces
        self.ctx = nn.Parameter(ctx)  # fp32 master copy, whatever the backbone's precision
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
        with torch.no_grad():
            emb = self.token_embedding(ids).float()  # [C, L, d]
        self.register_buffer("token_prefix", emb[:, :1], persistent=False)  # SOS [C, 1, d]
        self.register_buffer("token_suffix", emb[:, 1 + self.n_ctx:], persistent=False)  # CLASS . EOS pad
        self.register_buffer("eot", ids.argmax(-1), persistent=False)  # [C]: EOT has the largest token id
        # Class-token position as a per-class reordering of the 'end' layout [SOS][V][CLASS][rest]:
        # middle = [SOS][V_1..V_M/2][CLASS][V_M/2+1..V_M][rest], front = [SOS][CLASS][V][rest].
        name_lens = (self.tokenize(names).argmax(-1) - 1).tolist()  # BPE tokens per class name
        order = torch.arange(ids.shape[1]).repeat(len(names), 1)  # [C, L]
        m, half = self.n_ctx, self.n_ctx // 2
        for i, n in enumerate(name_lens):
            ctx_pos, cls_pos = list(range(1, 1 + m)), list(range(1 + m, 1 + m + n))
            new = {"end": ctx_pos + cls_pos, "front": cls_pos + ctx_pos,
                   "middle": ctx_pos[:half] + cls_pos + ctx_pos[half:]}[self.position]
            order[i, 1:1 + m + n] = torch.tensor(new)
        self.register_buffer("order", order.to(device), persistent=False)

    def forward(self, shift=None):
        """shift: [B, d] meta-net output (CoCoOp) or None. Returns prompts [C, L, d] or [B, C, L, d], eot [C]."""
        n_cls = len(self.eot)
        ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.expand(n_cls, -1, -1)  # [C, M, d]
        prefix, suffix = self.token_prefix, self.token_suffix
        if shift is not None:  # CoCoOp: v_m(x) = v_m + pi(x), the same shift for every context token
            ctx = ctx + shift[:, None, None, :]  # [B, C, M, d]
            prefix, suffix = (t.expand(len(shift), -1, -1, -1) for t in (prefix, suffix))
        prompts = torch.cat([prefix, ctx, suffix], dim=-2)  # [(B,) C, L, d], 'end' layout
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
        for f in image_features.split(max(1, PROMPTS_PER_PASS // n_cls)):  # CoCoOp: C prompts per image
            prompts, eot = self.prompt_learner(self.prompt_learner.meta_net(f))  # [b, C, L, d]
            t = self.text_encoder(prompts.flatten(0, 1), eot.repeat(len(f)))  # [b*C, D]
            t = F.normalize(t.float(), dim=-1).view(len(f), n_cls, -1)  # [b, C, D]
            logits.append(scale * torch.einsum("bd,bcd->bc", f, t))
        return torch.cat(logits)  # [B, C]


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
def encode_images(model, loader, device):
    """Frozen image features of a whole split, once: [N, D] normalised, labels [N]."""
    feats, labels = [], []
    for images, y in tqdm(loader, desc="image features", leave=False):
        with autocast(device):
            feats.append(model.encode_image(images.to(device)))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels).to(device)


def train_step(model, optimizer, x, y, device):
    with autocast(device):
        logits = model(x.to(device))  # [B, C]
    loss = F.cross_entropy(logits.float(), y.to(device))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item(), (logits.argmax(-1) == y.to(device)).float().mean().item()


def bench_truncation(model, optimizer, loader, device, steps):
    """Training-step time with and without the truncated text pass, on the same batch, interleaved
    so that background load hits both alike. Returns {"truncated_s", "full_s", "speedup"}."""
    x, y = next(iter(loader))
    times = {True: [], False: []}
    for truncate in (True, False) * 3:
        model.text_encoder.truncate = truncate
        train_step(model, optimizer, x, y, device)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            train_step(model, optimizer, x, y, device)  # .item() inside waits for the GPU
        times[truncate].append((time.perf_counter() - start) / steps)
    model.text_encoder.truncate = True
    t, f = sorted(times[True])[1], sorted(times[False])[1]  # medians of 3
    return {"truncated_s": t, "full_s": f, "speedup": f / t}


def main(args):
    start_time = time.time()
    if bool(args.eval_only) != bool(args.resume):
        raise SystemExit("--eval-only and --resume RUN_DIR go together (training always starts fresh)")
    if args.eval_only:  # the saved run's settings, except where its data and device live now
        ckpt = torch.load(Path(args.resume) / "checkpoint.pt", map_location="cpu")
        now = {k: getattr(args, k) for k in ("eval_only", "resume", "root", "device", "workers", "test_batch_size")}
        args = argparse.Namespace(**{**ckpt["args"], **now})  # saved after resolve_settings
    else:
        args = resolve_settings(args)
    method = "cocoop" if args.conditional else "coop"
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # Seeding: everything random below (few-shot sampling, context init, shuffling) follows args.seed.
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    loader_generator = torch.Generator().manual_seed(args.seed)  # shuffling of cached features (make_loader seeds its own)

    out = Path(args.resume if args.eval_only else args.output_dir or
               f"runs/{method}-{args.dataset}-{args.shots}shot-seed{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    writes = not args.eval_only and not args.bench_steps
    if writes and (out / "checkpoint.pt").exists() and not args.overwrite:
        raise SystemExit(f"{out} already holds a checkpoint: pass --overwrite or another --output-dir")
    print(f"{method} on {args.dataset}: {args.model}/{args.pretrained}, {args.shots} shots, seed {args.seed}, "
          f"{args.epochs} epochs, batch {args.batch_size}, device {device} -> {out}")

    # Data: few-shot on all classes first, then the base half for training (CoCoOp protocol).
    bench = data.load_dataset(args.dataset, args.root, download=args.download)
    backbone = data.load_backbone(args.model, args.pretrained, device)
    if writes:  # only once data and weights are there: a run that cannot start leaves no folder
        out.mkdir(parents=True, exist_ok=True)
        data.atomic_write_text(json.dumps(vars(args), indent=2), out / "args.json")
    clip = backbone.model
    loader = lambda items, train, bs: data.make_loader(items, bench, backbone, train, bs, args.seed, args.workers)
    _, base_names = data.subsample_classes(bench.test, bench.classnames, "base")
    model = PromptedCLIP(clip, backbone.tokenize, base_names, args).to(device)
    model.text_encoder.truncate = not args.no_truncate
    learned = [p for p in model.parameters() if p.requires_grad]  # the context (and CoCoOp's meta-net)

    epoch = args.epochs
    if args.eval_only:
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.data.copy_(ckpt["learned"][name])
        epoch = ckpt["epoch"]
    else:
        train_items = data.fewshot(bench.train, args.shots, args.seed, cache=None if args.bench_steps else out / "fewshot.json")
        train_items, _ = data.subsample_classes(train_items, bench.classnames, "base")
        if bench.augment:  # random crops and flips: the image encoder runs on every training batch
            train_loader = loader(train_items, True, args.batch_size)
        else:  # deterministic transform, frozen encoder: each image's feature is the same every epoch
            print(f"no training augmentation on {args.dataset}: caching the frozen image features of the "
                  f"{len(train_items)} training images once (exact)")
            feats, labels = encode_images(model, loader(train_items, False, args.test_batch_size), device)
            train_loader = DataLoader(TensorDataset(feats, labels), batch_size=args.batch_size, shuffle=True,
                                      drop_last=len(feats) >= args.batch_size, generator=loader_generator)
        optimizer = torch.optim.SGD(learned, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        print(f"learning {sum(p.numel() for p in learned):,} parameters on {len(train_items)} images "
              f"of {len(base_names)} base classes")
        if args.bench_steps:
            r = bench_truncation(model, optimizer, train_loader, device, args.bench_steps)
            print(f"step time: truncated {1e3 * r['truncated_s']:.1f} ms, full {1e3 * r['full_s']:.1f} ms, "
                  f"speed-up {r['speedup']:.2f}x (text context {clip.positional_embedding.shape[0]}, "
                  f"longest prompt {int(model.prompt_learner.eot.max()) + 1} tokens)")
            return r
        epochs_bar = tqdm(range(args.epochs), desc="train")
        for epoch in epochs_bar:
            lr = learning_rate(epoch, args)  # Dassl steps the scheduler once per epoch
            for group in optimizer.param_groups:
                group["lr"] = lr
            losses, accs = [], []
            for x, y in tqdm(train_loader, desc=f"epoch {epoch + 1}", leave=False):
                loss, acc = train_step(model, optimizer, x, y, device)
                losses.append(loss), accs.append(acc)
            epochs_bar.set_postfix(lr=f"{lr:.2e}", loss=f"{np.mean(losses):.3f}", acc=f"{np.mean(accs):.3f}")
        epoch = args.epochs
        learned_state = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        checkpoint = {"learned": learned_state, "args": vars(args), "epoch": epoch, "metrics": None}
        data.atomic_save(checkpoint, out / "checkpoint.pt")  # saved before evaluation, so a crash there loses nothing

    # Evaluation of the last epoch: base classes, new classes (prompts for the new names only), shifts.
    splits = {"base": data.subsample_classes(bench.test, bench.classnames, "base"),
              "new": data.subsample_classes(bench.test, bench.classnames, "new")}
    splits.update({name: (data.shift_items(items, base_names), base_names) for name, items in bench.shifts.items()})
    shown = "CoCoOp" if args.conditional else "CoOp"
    results, test_loss = {"zero-shot CLIP": {}, shown: {}}, {}
    for split, (items, names) in splits.items():
        if split == "new" and args.csc:
            print("--csc: the learned contexts belong to base classes; no prompt exists for new classes")
            continue
        feats, labels = encode_images(model, loader(items, False, args.test_batch_size), device)  # once per split
        batches = list(zip(feats.split(args.test_batch_size), labels.split(args.test_batch_size)))
        model.prompt_learner.set_classes(names)
        metrics = evaluate(model, batches)
        results[shown][split], test_loss[split] = metrics["acc"], metrics["loss"]
        results["zero-shot CLIP"][split] = evaluate(ZeroShotCLIP(clip, backbone.tokenize, names, bench.template), batches)["acc"]
    model.prompt_learner.set_classes(base_names)
    for r in results.values():
        r["hm"] = data.harmonic_mean(r["base"], r["new"]) if "new" in r else None

    columns = ["base", "new", "hm", *bench.shifts]
    print(f"\n{args.dataset}, {args.shots} shots, seed {args.seed}, epoch {epoch}, {backbone.name}/{backbone.pretrained}")
    print(f"{'':16}" + "".join(f"{c:>12}" for c in columns))
    for row, r in results.items():
        print(f"{row:16}" + "".join(f"{r[c]:12.2f}" if r.get(c) is not None else f"{'-':>12}" for c in columns))

    r = results[shown]
    record = dict(method=method, dataset=args.dataset, backbone=backbone.name, pretrained=backbone.pretrained,
                  shots=args.shots, seed=args.seed, epoch=epoch, base=r["base"], new=r.get("new"), hm=r["hm"],
                  shifts={s: r[s] for s in bench.shifts}, zero_shot=results["zero-shot CLIP"],
                  test_loss=test_loss, wall_s=round(time.time() - start_time, 1), args=vars(args))
    if args.eval_only:  # a re-evaluation: its own file, nothing of the run is replaced or appended
        data.atomic_write_text(json.dumps(record, indent=2), out / "eval_only.json")
        return record
    data.atomic_write_text(json.dumps(record, indent=2), out / "results.json")
    data.atomic_save({**checkpoint, "metrics": record}, out / "checkpoint.pt")
    data.append_result(Path(args.results_file or out.parent / "results.jsonl"), record)
    print(f"wrote {out / 'results.json'}, {out / 'checkpoint.pt'}")
    return record


if __name__ == "__main__":
    main(parse_args())
