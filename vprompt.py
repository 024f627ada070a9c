"""Bayesian prompt learning: CLIP's context words as a distribution, learned variationally, in one file.

Derakhshani, Sanchez, Bulat, da Costa, Snoek, Tzimiropoulos, Martinez. "Bayesian Prompt Learning for
Image-Language Model Generalization." ICCV 2023. https://arxiv.org/abs/2210.02390
Official code: saic-fi/Bayesian-Prompt-Learning (trainer "VPT", trainers/vpt.py).

CoOp learns one set of context vectors V = [v_1..v_M] for the prompt [SOS][V][CLASS][.][EOS]. Here a
residual r (one vector of the text width d, added to every context token: v_m + r) has a Gaussian
variational posterior q(r) = N(mu, diag(exp(logvar))) against the prior N(0, I). Training draws L
samples of r by reparameterisation and maximises the log of the Monte Carlo average of the label's
probability, minus 0.001 x the KL to the prior (averaged over the d dimensions); a test prediction
averages the class probabilities of L fresh samples. The prompt space is regularised so that prompts
for classes never trained on stay near the hand-written one. Two variants (one flag):
- standard (default, the released config's "coopvpt"): mu and logvar are learned parameters, on top of CoOp.
- conditional (--conditional, "cocoopvpt"): mu(x) and logvar(x) come from two small networks on the
  image feature, as CoCoOp's meta-net; each image gets its own posterior and its own prompts.

  python vprompt.py                                      # offline world (shapes, tiny CLIP), standard
  python vprompt.py --conditional                        # offline world, conditional
  python vprompt.py --dataset caltech101 --root ~/data   # paper setting: ViT-B/16 openai, 16 shots, L 20, 20 epochs
  python vprompt.py --dataset caltech101 --root ~/data --conditional
  python vprompt.py --resume runs/vprompt-caltech101-16shot-seed1-...     # continue a killed run
  python vprompt.py --evaluate runs/vprompt-caltech101-16shot-seed1-...   # re-evaluate (same samples, same numbers)
  python vprompt.py --protocol cross --dataset imagenet --root ~/data     # cross-dataset and domain generalisation

Evaluation protocols (--protocol), as coop.py: base2new (default; CoCoOp's base-to-new, the paper's
Table 1), all (train and test on every class), cross (train on all classes, test on --eval-datasets;
the paper's Tables 2 and 3).

Differs from coop.py in: the residual's posterior (the parameters, or the two networks that replace
CoCoOp's meta-net), L samples through the text encoder in one pass, the objective, seeded sampling at
evaluation; the paper's settings (batch 1; L and epochs per dataset); no --csc or --class-token-position
(the official VPT has neither).

Differs from the official code (saic-fi/Bayesian-Prompt-Learning, trainers/vpt.py) in:
- open_clip instead of OpenAI's clip package; fp32 learned tensors with bf16 autocast on CUDA (the
  official code runs fp16); the text transformer runs only up to the longest prompt's end-of-text token
  (exact); the context length M of --ctx-init counts BPE tokens (the official code counts words).
- the C prompts of one draw share their first 1 + M tokens, [SOS][V + r]; under the causal mask those
  positions never see the class tokens, so the text transformer computes them once per draw and the
  class positions attend to them (SharedPrefixTextEncoder: the same features, about half the work).
- the conditional variant builds the prompts of every (image, sample, class) explicitly, so any batch
  size works; the official code adds the [L, B, d] residuals to the [1, M, d] context by broadcasting,
  which is right only at batch 1 (its configs use batch 1 for training and test). The KL term is the
  mean over the batch's images (at batch 1, the official value).
- the standard variant shares one draw of the L residuals among the images of a training batch (as the
  official code does at batch > 1; the paper's batch is 1).
- evaluation draws from a generator seeded with --seed at the start of every test split, image by image,
  so that a re-evaluation gives the same numbers and --test-batch-size changes none; the standard
  variant draws one set of L residuals per test split and uses it for every test image (the official
  code, at test batch 1, draws fresh ones per image: the same L-sample estimate of each image's
  predictive, with the L*C text passes done once per split instead of once per image).
- names: posterior_mean / posterior_logvar (official mean_posterior / std_posterior, which holds the
  log-variance), meta_net.mean / meta_net.logvar (official Amortized.weight_mean / weight_log_variance).
- L and the epochs per dataset come from the official scripts' commands (VPT.md), here DATASET_SETTINGS;
  they are not in the official configs. Both variants use them (the released scripts run the standard one).
- on CUDA the training step is recorded once as a CUDA graph and replayed (CapturedStep); its random
  draws are fresh at every replay (the CUDA generator's graph-safe offsets).
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
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import data


# ------------------------------------------------------------------------------------------ settings
# The released config (configs/trainers/VPT/vit_b16_c4_ep10_batch1_ctxv1.yaml): batch 1, 40 epochs, L 10,
# then the per-dataset L and epochs of the official scripts (VPT.md); a flag on the command line wins over both.
PAPER = dict(batch_size=1, epochs=40, samples=10)
DATASET_SETTINGS = {
    "caltech101": dict(samples=20, epochs=20), "oxford_pets": dict(samples=40, epochs=20),
    "stanford_cars": dict(samples=20, epochs=40), "oxford_flowers": dict(samples=10, epochs=40),
    "food101": dict(samples=20, epochs=20), "fgvc_aircraft": dict(samples=10, epochs=10),
    "sun397": dict(samples=20, epochs=10), "dtd": dict(samples=40, epochs=10),
    "eurosat": dict(samples=20, epochs=60), "ucf101": dict(samples=5, epochs=20),
    "imagenet": dict(samples=10, epochs=10),  # also the source of cross-dataset transfer and domain generalisation
    # The offline world (every 'shapes...' benchmark) is no dataset of the paper: the released config's L 10, with
    # 10 epochs (as four of the paper's datasets, and CoCoOp's batch-1 steps on the world) instead of 40, which take
    # ~4x as long: a world-only setting, chosen for time (README), not for accuracy.
    "shapes": dict(epochs=10),
}
# What each protocol trains on (the official scripts use the same settings in every protocol).
PROTOCOLS = {"base2new": dict(train_classes="base"), "all": dict(train_classes="all"),
             "cross": dict(train_classes="all")}
KL_WEIGHT = 0.001  # beta, hard-coded in the official code
PROMPTS_PER_PASS = 4096  # conditional: at most this many (image, sample, class) prompts in one text pass
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
      help="the posterior of the residual from the image feature (official VPT_TYPE cocoopvpt); off: learned "
           "parameters (coopvpt, the released config)")
    a("--samples", type=int, default=None,
      help="L, Monte Carlo samples of the residual at training and at test (official TRAINER.VPT.L); default: "
           "the official scripts' value per dataset (DATASET_SETTINGS), else 10")
    a("--n-ctx", type=int, default=4,
      help="context tokens M when --ctx-init is empty (paper setting: 4)")
    a("--ctx-init", default="a photo of a",
      help="words that initialise the context (M = their BPE token count); '' = random N(0, 0.02^2) "
           "(paper setting: a photo of a)")
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
      help="default: the official scripts' value per dataset (DATASET_SETTINGS), else 40 (the released config)")
    a("--batch-size", type=int, default=None, help="default: 1, the paper value")
    a("--lr", type=float, default=0.002,
      help="SGD learning rate after warm-up, cosine-annealed per epoch (paper: 0.002)")
    a("--momentum", type=float, default=0.9, help="SGD momentum (Dassl default: 0.9)")
    a("--weight-decay", type=float, default=5e-4, help="SGD weight decay (Dassl default: 5e-4)")
    a("--warmup-epochs", type=int, default=1, help="constant warm-up epochs before the cosine (paper: 1)")
    a("--warmup-lr", type=float, default=1e-5, help="learning rate during warm-up (paper: 1e-5)")
    a("--test-batch-size", type=int, default=100,
      help="evaluation batch size (official: 1; changes no number here, see the docstring)")
    a("--workers", type=int, default=min(4, os.cpu_count() or 1),
      help="data-loader worker processes (Dassl: 4, here capped at the CPU count)")
    a("--seed", type=int, default=1,
      help="seed for sampling (few-shot, residuals), initialisation and shuffling (papers: 1, 2, 3)")
    a("--no-truncate", action="store_true",
      help="run the text transformer over all context positions (slower, same result; the official code does)")
    a("--eager", action="store_true",
      help="CUDA: run each training step op by op instead of replaying its CUDA graph (slower)")
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
    dataset = "shapes" if args.dataset.startswith(data.WORLD_PREFIX) else args.dataset
    for key, value in {**PAPER, **DATASET_SETTINGS.get(dataset, {})}.items():
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
    for name in ("epochs", "batch_size", "shots", "test_batch_size", "samples"):
        data.check_int(f"--{name.replace('_', '-')}", getattr(args, name), 1)
    for name in ("warmup_epochs", "workers"):
        data.check_int(f"--{name.replace('_', '-')}", getattr(args, name), 0)
    data.check_float("--lr", args.lr, above=0)
    for name in ("momentum", "weight_decay", "warmup_lr"):
        data.check_float(f"--{name.replace('_', '-')}", getattr(args, name), minimum=0)
    data.require(args.ctx_init.strip() or args.n_ctx >= 1,
                 f"--n-ctx {args.n_ctx} with an empty --ctx-init: the prompt needs at least one context token")
    data.require(args.protocol != "cross" or eval_datasets(args), f"--protocol cross names no default "
                 f"targets for {args.dataset}: list them with --eval-datasets")


def method_name(args):
    """The method's name in run folders, records and tables."""
    return "vprompt-conditional" if args.conditional else "vprompt"


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


class SharedPrefixTextEncoder(nn.Module):
    """TextEncoder for prompts that come in groups sharing their first P tokens: the C prompts of one draw r
    are [SOS][V + r] followed by each class's own tokens. Position i attends only to positions <= i (the
    causal mask), so the P shared positions never see a class token and their activations are the same in
    all C prompts: they are computed once per group, and each class position attends to them and to the
    class positions before it. The features equal TextEncoder's on the whole prompts (tested), with the
    transformer's work on the shared positions done once instead of C times (for "a photo of a" and short
    class names, about half of it)."""

    def __init__(self, text_encoder):
        super().__init__()
        self.text_encoder = text_encoder  # its blocks, positional embedding, final norm and projection

    def forward(self, shared, tails, eot):
        """shared: [N, P, d] embeddings of the shared positions of N groups; tails: [C, T, d] the class
        positions (the same in every group); eot: [C] EOT positions in the whole prompt (>= P).
        Returns features [N, C, D]."""
        enc = self.text_encoder
        (n, p, d), (n_cls, t) = shared.shape, tails.shape[:2]
        x = shared + enc.positional_embedding[:p]  # [N, P, d]
        y = (tails + enc.positional_embedding[p:p + t]).expand(n, -1, -1, -1).reshape(n * n_cls, t, d)  # [N*C, T, d]
        # class position i (position P + i of the whole prompt) sees the P shared positions and class positions <= i
        mask = torch.ones(t, p + t, dtype=torch.bool, device=x.device).tril(p)
        n_heads = enc.resblocks[0].attn.num_heads
        heads = lambda z: z.unflatten(-1, (n_heads, -1)).transpose(1, 2)  # noqa: E731 [., len, d] -> [., h, len, d/h]
        for block in enc.resblocks:  # open_clip's ResidualAttentionBlock, its attention written out
            attn = block.attn
            q_x, k_x, v_x = map(heads, F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1))
            q_y, k_y, v_y = map(heads, F.linear(block.ln_1(y), attn.in_proj_weight, attn.in_proj_bias).chunk(3, -1))
            out_x = F.scaled_dot_product_attention(q_x, k_x, v_x, is_causal=True)  # [N, h, P, d/h]
            k = torch.cat([k_x.repeat_interleave(n_cls, dim=0), k_y], dim=2)  # [N*C, h, P+T, d/h]
            v = torch.cat([v_x.repeat_interleave(n_cls, dim=0), v_y], dim=2)
            out_y = F.scaled_dot_product_attention(q_y, k, v, attn_mask=mask)  # [N*C, h, T, d/h]
            x = x + block.ls_1(attn.out_proj(out_x.transpose(1, 2).flatten(2)))
            y = y + block.ls_1(attn.out_proj(out_y.transpose(1, 2).flatten(2)))
            x = x + block.ls_2(block.mlp(block.ln_2(x)))
            y = y + block.ls_2(block.mlp(block.ln_2(y)))
        y = y.view(n, n_cls, t, d)[:, torch.arange(n_cls, device=y.device), eot - p]  # [N, C, d] at each EOT
        return enc.ln_final(y) @ enc.text_projection  # [N, C, D]


# ------------------------------------------------------------------------------------------ the method
def inference_block(n_in, n_out):
    """One head of the amortised posterior (the official InferenceBlock): Linear(D, D/2) - ELU -
    Linear(D/2, D/2) - ELU - Linear(D/2, d)."""
    hidden = n_in // 2
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ELU(inplace=True), nn.Linear(hidden, hidden),
                         nn.ELU(inplace=True), nn.Linear(hidden, n_out))


class PromptLearner(nn.Module):
    """The learned context V [M, d] and the variational posterior q(r) of the residual r [d] that is added
    to every context token. Gives the prompt embeddings [SOS][V + r][CLASS][.][EOS][pad] for the current
    class names, one prompt per (residual, class), as the part every class shares and the class tokens."""

    def __init__(self, clip, tokenize, classnames, args):
        super().__init__()
        self.tokenize, self.token_embedding = tokenize, clip.token_embedding
        self.truncate = not getattr(args, "no_truncate", False)
        device = clip.token_embedding.weight.device
        ctx_dim = clip.ln_final.weight.shape[0]  # text width d (512 for ViT-B/16)
        context_length = tokenize(["x"]).shape[1]  # 77 for OpenAI CLIP (not the L of the samples)
        if args.ctx_init:
            ids = tokenize([args.ctx_init]).to(device)  # [1, 77]; cut to the context length by the tokenizer
            self.n_ctx = int(ids.argmax(-1)) - 1  # BPE tokens between SOS and EOT: "a photo of a" -> 4
            data.require(self.n_ctx + 2 < context_length, f"--ctx-init {args.ctx_init!r} does not fit the text "
                         f"context of {context_length} tokens with a class name: use fewer words")
            with torch.no_grad():
                ctx_vectors = self.token_embedding(ids)[0, 1:1 + self.n_ctx].float()  # [M, d]
            self.prefix_words = args.ctx_init
        else:
            self.n_ctx = args.n_ctx
            data.require(self.n_ctx + 3 < context_length, f"--n-ctx {self.n_ctx} does not fit the text context "
                         f"of {context_length} tokens with a class name: use fewer")
            ctx_vectors = torch.empty((self.n_ctx, ctx_dim), device=device)
            nn.init.normal_(ctx_vectors, std=0.02)
            self.prefix_words = " ".join(["X"] * self.n_ctx)  # placeholders whose embeddings V replaces
        self.ctx = nn.Parameter(ctx_vectors)  # fp32 master copy, whatever the backbone's precision
        self.meta_net = None
        if args.conditional:  # q(r | x) = N(mu(x), diag(exp(logvar(x)))), two MLPs on the normalised image feature
            vis_dim = clip.text_projection.shape[1]  # image and text features share the dimension D
            self.meta_net = nn.ModuleDict(dict(mean=inference_block(vis_dim, ctx_dim),
                                               logvar=inference_block(vis_dim, ctx_dim))).to(device)
        else:  # q(r) = N(mu, diag(exp(logvar))); the official init: mu = 0, logvar ~ U[0, 1) (variance 1 to e)
            self.posterior_mean = nn.Parameter(torch.zeros(1, ctx_dim, device=device))
            self.posterior_logvar = nn.Parameter(torch.rand(1, ctx_dim, device=device))
        self.set_classes(classnames)

    def set_classes(self, classnames):
        """Build the frozen parts of the prompts for these class names (base for training, new for testing)."""
        names = [c.replace("_", " ") for c in classnames]
        device = self.token_embedding.weight.device
        ids = self.tokenize([f"{self.prefix_words} {name}." for name in names]).to(device)  # [C, 77]
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
        self.register_buffer("token_prefix", emb[:1, :1], persistent=False)  # SOS [1, 1, d], the same in every prompt
        self.register_buffer("token_suffix", emb[:, 1 + self.n_ctx:], persistent=False)  # CLASS . EOS pad
        self.register_buffer("eot", eot, persistent=False)

    def posterior(self, image_features):
        """(mean, log-variance) of q(r): [1, d] each, one posterior for every image (standard), or of q(r | x):
        [B, d] each from the normalised image features [B, D] (conditional). In fp32 under autocast too."""
        if self.meta_net is None:
            return self.posterior_mean, self.posterior_logvar
        return self.meta_net["mean"](image_features).float(), self.meta_net["logvar"](image_features).float()

    def forward(self, residuals):
        """residuals: [N, d], one sample of r each. The prompt of (sample, class c) is [SOS][V + r][CLASS_c][.][EOS]
        [pad]: returns its first 1 + M tokens, which every class shares, [N, 1 + M, d], the class tokens
        [C, len - 1 - M, d], which every sample shares, and the EOT positions eot [C]."""
        ctx = self.ctx + residuals[:, None, :]  # [N, M, d]: v_m + r, the same r for every context token
        sos = self.token_prefix.expand(len(residuals), -1, -1)  # [N, 1, d]
        return torch.cat([sos, ctx], dim=1), self.token_suffix, self.eot


def kl_to_prior(mean, logvar):
    """KL(N(mu, diag(exp(logvar))) || N(0, I)), averaged over the d dimensions as the official code does
    (torch.distributions' kl_divergence, then .mean(-1)): mean_j (exp(logvar_j) + mu_j^2 - 1 - logvar_j) / 2.
    [n, d] -> [n]."""
    return 0.5 * (logvar.exp() + mean.pow(2) - 1 - logvar).mean(-1)


class PromptedCLIP(nn.Module):
    """Frozen CLIP + the prompt distribution. Per sample l, logits_l = s * cos(f(x), g(t_c(r_l))), s = CLIP's
    frozen exp(logit_scale); the prediction is log (1/L sum_l softmax(logits_l)), the log of the Monte Carlo
    estimate of the predictive p(y | x) = E_q(r)[p(y | x, r)]."""

    def __init__(self, clip, tokenize, classnames, args):
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self.prompt_learner = PromptLearner(clip, tokenize, classnames, args)
        self.text_encoder = SharedPrefixTextEncoder(TextEncoder(clip))
        self.samples = args.samples  # L
        self.sampler = torch.Generator()  # evaluation's draws (CPU), seeded per test split by seed_sampling

    def seed_sampling(self, seed):
        """Make evaluation's draws start again from `seed`: the same samples, so the same numbers."""
        self.sampler.manual_seed(seed)

    @torch.no_grad()
    def encode_image(self, images):  # [B, 3, H, W] -> L2-normalised [B, D]; frozen
        return F.normalize(self.clip.encode_image(images).float(), dim=-1)

    def residuals(self, mean, logvar):
        """L samples r = mu + exp(logvar / 2) * eps, eps ~ N(0, I), for each of the n posteriors in mean, logvar
        [n, d] -> [n, L, d] (reparameterised: the gradient reaches mu and logvar). Training draws eps from torch's
        generator on the device (in every checkpoint; a CUDA graph replays it with fresh draws); evaluation from
        self.sampler, one posterior at a time, so that no number depends on how the test set is batched."""
        n, d = mean.shape
        if self.training:
            eps = torch.randn(n, self.samples, d, device=mean.device)
        else:
            eps = torch.stack([torch.randn(self.samples, d, generator=self.sampler) for _ in range(n)])
        return mean[:, None] + torch.exp(0.5 * logvar)[:, None] * eps.to(mean.device)

    def text_features(self, residuals):
        """[n, L, C, D] normalised class features of the prompts built with each residual [n, L, d]: all
        n * L * C prompts through the text encoder in one pass (their shared first tokens once per draw)."""
        n, n_samples = residuals.shape[:2]
        shared, tails, eot = self.prompt_learner(residuals.flatten(0, 1))  # [n*L, 1+M, d], [C, T, d], [C]
        features = self.text_encoder(shared, tails, eot)  # [n*L, C, D]
        return F.normalize(features.float(), dim=-1).view(n, n_samples, len(eot), -1)

    def class_text_features(self):
        """[1, L, C, D]: the class features of L residuals drawn once per evaluation and used for every test
        image (standard); None when the posterior depends on the image (conditional)."""
        if self.prompt_learner.meta_net is not None:
            return None
        return self.text_features(self.residuals(*self.prompt_learner.posterior(None)))

    def sample_logits(self, x, text_features=None):
        """x: images [B, 3, H, W], or their precomputed features [B, D]. Returns the logits of every sample
        [B, L, C] and the KL of each posterior to the prior, [1] (standard) or [B] (conditional)."""
        image_features = x if x.dim() == 2 else self.encode_image(x)  # [B, D]
        scale = self.clip.logit_scale.exp()
        if self.prompt_learner.meta_net is None:  # standard: the same L prompts per class for every image
            mean, logvar = self.prompt_learner.posterior(None)  # [1, d]
            text_features = self.text_features(self.residuals(mean, logvar)) if text_features is None else text_features
            return scale * torch.einsum("bd,lcd->blc", image_features, text_features[0]), kl_to_prior(mean, logvar)
        logits, kl = [], []  # conditional: L * C prompts per image, from its own posterior
        per_pass = max(1, PROMPTS_PER_PASS // (self.samples * len(self.prompt_learner.eot)))
        for chunk in image_features.split(per_pass):
            mean, logvar = self.prompt_learner.posterior(chunk)  # [b, d] each
            text_features = self.text_features(self.residuals(mean, logvar))  # [b, L, C, D]
            logits.append(scale * torch.einsum("bd,blcd->blc", chunk, text_features))
            kl.append(kl_to_prior(mean, logvar))
        return torch.cat(logits), torch.cat(kl)

    def predictive(self, x, text_features=None):
        """log p(y | x) ~ log (1/L sum_l softmax(logits_l)) [B, C] (log-mean-exp over the samples, in fp32),
        and the KL to the prior averaged over the posteriors (a scalar)."""
        logits, kl = self.sample_logits(x, text_features)  # [B, L, C], [1 or B]
        log_p = torch.logsumexp(logits.float().log_softmax(-1), dim=1) - math.log(logits.shape[1])
        return log_p, kl.mean()

    def forward(self, x, text_features=None):
        """The log-predictive [B, C]: its argmax is the prediction, and cross-entropy on it is the predictive's
        negative log-likelihood (its softmax is the predictive itself)."""
        return self.predictive(x, text_features)[0]


def sgd(learned, args, device):
    """Dassl's SGD, with the lr in a tensor that the schedule fills in place, so that a captured step
    reads each epoch's value (fused SGD reads it on the GPU; float64 on the CPU is the update of a
    Python float, bit for bit)."""
    lr = torch.tensor(args.lr, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    return torch.optim.SGD(learned, lr=lr, momentum=args.momentum, weight_decay=args.weight_decay,
                           fused=device.type == "cuda")


def train_step(model, optimizer, x, y):
    """One SGD step on a batch already on the device: the negative ELBO of the paper, with the official
    weights. Returns (loss, number correct) as tensors, so that nothing waits for the device here."""
    with autocast(x.device):
        log_p, kl = model.predictive(x)  # [B, C] log of the L-sample average of p(y | x, r_l); scalar
    # likelihood: -log (1/L sum_l p(y | x, r_l)), the log of the Monte Carlo average (not the average of the logs)
    nll = F.nll_loss(log_p, y)
    # KL of the posterior to the prior N(0, I), averaged over dimensions (and over the batch's posteriors)
    loss = nll + KL_WEIGHT * kl
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), (log_p.argmax(-1) == y).sum()


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
    method = method_name(args)
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
          f"seed {args.seed}, {args.epochs} epochs, batch {args.batch_size}, L {args.samples}, device {device} -> {out}")

    # Seeding: everything random below (few-shot sampling, initialisation, shuffling, the residuals' draws)
    # follows args.seed.
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

    # Optimiser: SGD on the context and the posterior (its parameters, or the networks that give it), its lr
    # a tensor the schedule fills in place.
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
    record["train"] = checkpoint["train"]  # the last epoch's training loss (negative ELBO) and accuracy (%)
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
    method = method_name(args)
    rows, test_loss = {"zero-shot CLIP": {}, method: {}}, {}
    for split, (items, names, source) in splits.items():
        loader = data.make_loader(items, source, backbone, False, args.test_batch_size, args.seed,
                                  args.workers)
        features, labels = encode_images(model, loader, device)  # once per split
        batches = list(zip(features.split(args.test_batch_size), labels.split(args.test_batch_size)))
        model.prompt_learner.set_classes(names)
        model.seed_sampling(args.seed)  # each split's draws start from the seed: --evaluate gives the same numbers
        metrics = evaluate(model, batches)
        rows[method][split], test_loss[split] = metrics["acc"], metrics["loss"]
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
    print(f"{'':20}" + "".join(f"{c:>{width[c]}}" for c in columns))
    for name, row in rows.items():
        cells = [f"{row[c]:{width[c]}.2f}" if row.get(c) is not None else f"{'-':>{width[c]}}"
                 for c in columns]
        print(f"{name:20}" + "".join(cells))
    ours = rows[method]
    return dict(method=method, protocol=args.protocol, dataset=args.dataset,
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
    optimiser state, the random states of Python, NumPy, torch and CUDA (torch's draw the residuals) and of
    the loader's shuffling), and the epoch's training loss and accuracy (train_fit). Plain tensors, numbers and strings
    only, so that it loads with weights_only=True."""
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
