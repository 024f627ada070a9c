"""Bayesian prompt learning: CLIP's context words as a distribution, learned variationally.

Derakhshani, Sanchez, Bulat, da Costa, Snoek, Tzimiropoulos, Martinez. "Bayesian Prompt Learning
for Image-Language Model Generalization." ICCV 2023. https://arxiv.org/abs/2210.02390
Official code: saic-fi/Bayesian-Prompt-Learning (trainer "VPT", trainers/vpt.py).

CoOp learns context vectors V = [v_1..v_M] for the prompt [SOS][V][CLASS][.][EOS]. Here a residual
r (one vector of the text width d, added to every context token: v_m + r) has a Gaussian posterior
q(r) = N(mu, diag(exp(logvar))) against the prior N(0, I). Training draws L samples of r by
reparameterisation and maximises the log of the Monte Carlo average of the label's probability,
minus 0.001 x the KL to the prior (averaged over the d dimensions); a test prediction averages the
class probabilities of L fresh samples. So regularised, the prompts of classes never trained on
stay near the hand-written one. Two variants (one flag):
- standard (default, the released config's "coopvpt"): mu and logvar are learned, on top of CoOp.
- conditional (--conditional, "cocoopvpt"): mu(x) and logvar(x) come from two small networks on the
  image feature, as CoCoOp's meta-net: each image gets its own posterior and its own prompts.

  python vprompt.py [--conditional]                      # offline world (tiny CLIP)
  python vprompt.py --dataset caltech101 --root ~/data   # paper: ViT-B/16 openai, 16 shots, L 20
  python vprompt.py --resume RUN_DIR    # continue a killed run (--evaluate RUN_DIR: same numbers)
  python vprompt.py --protocol cross --dataset imagenet --root ~/data    # cross-dataset transfer

Protocols as coop.py's (base2new, all, cross); no --csc or --class-token-position (VPT has neither).

Differs from the official code (saic-fi/Bayesian-Prompt-Learning, trainers/vpt.py) in:
- open_clip and fp32 learned tensors with bf16 autocast on CUDA (official: OpenAI's clip in fp16);
  the text transformer runs only up to the longest prompt's end-of-text token (exact).
- M counts the BPE tokens of --ctx-init, all of them learned; the official code counts words, keeps
  the tokens beyond that count as a frozen suffix ("itap of a": 3 learned, "a" frozen) and turns
  `_` into spaces in CTX_INIT (here the words are taken as given).
- the C prompts of a draw share [SOS][V + r], which the causal mask keeps from the class tokens:
  with kernels/ beside the file those positions run once per draw (same features, half the work).
- conditional: the prompts of every (image, sample, class) are built, so any batch size works (the
  official code broadcasts the [L, B, d] residuals onto the [1, M, d] context, right only at its
  batch 1); the KL term is the batch's mean. Standard: one draw of L residuals per training batch
  (as the official code at batch > 1; the paper's batch is 1).
- evaluation draws from a generator seeded with --seed at every test split, image by image, so
  --evaluate repeats the numbers and --test-batch-size (official: 1) changes none. The standard
  variant draws one set of L residuals per split for all its images (official: fresh ones per
  image), so the L*C text passes run once per split: each prediction has the same expectation, but
  the errors are correlated across the split's images (more run-to-run variance).
- names: posterior_mean / _logvar (official mean_posterior / std_posterior, a log-variance too),
  meta_net.mean / .logvar (official Amortized.weight_mean / weight_log_variance).
- L and the epochs per dataset (DATASET_SETTINGS) come from the official scripts' commands (VPT.md),
  not its configs; both variants use them (the released scripts run the standard one).
- on CUDA the step is recorded once as a CUDA graph and replayed (kernels.CapturedStep), fresh
  draws at every replay (graph-safe generator offsets). Training images are decoded once, their
  random crops and flips tensor ops on the device (data.train_batches: torchvision's distribution).
"""
import argparse
import functools
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import data

try:  # kernels/ beside this file: the captured CUDA-graph step and the shared-prefix text pass
    import kernels
except ImportError:
    kernels = None

KL_WEIGHT = 0.001  # beta, hard-coded in the official code
PROMPTS_PER_PASS = 4096  # conditional: at most this many (image, sample, class) prompts in one pass


# --------------------------------------------------------------------------------------- the method
class PromptedCLIP(nn.Module):
    """Frozen CLIP + the prompt distribution. Per sample l, logits_l = s * cos(f(x), g(t_c(r_l))),
    s = CLIP's frozen exp(logit_scale); the prediction is log (1/L sum_l softmax(logits_l)), the log
    of the Monte Carlo estimate of the predictive p(y | x) = E_q(r)[p(y | x, r)]."""

    def __init__(self, clip, tokenize, classnames, args):
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self.prompt_learner = PromptLearner(clip, tokenize, classnames, args)
        self.text_encoder = TextEncoder(clip)
        self.samples = args.samples  # L
        self.sampler = torch.Generator()  # evaluation's draws (CPU), seeded per test split

    @torch.no_grad()
    def encode_image(self, images):  # [B, 3, H, W] -> L2-normalised [B, D]; frozen
        return F.normalize(self.clip.encode_image(images).float(), dim=-1)

    def residuals(self, mean, logvar):
        """L samples r = mu + exp(logvar / 2) eps, eps ~ N(0, I), of each posterior: [n, d] ->
        [n, L, d]. Training draws from torch's generator on the device (checkpointed); evaluation
        from self.sampler, a posterior at a time: no number depends on the test batching."""
        n, d = mean.shape
        if self.training:
            eps = torch.randn(n, self.samples, d, device=mean.device)
        else:
            eps = torch.stack([torch.randn(self.samples, d, generator=self.sampler) for _ in mean])
        return mean[:, None] + torch.exp(0.5 * logvar)[:, None] * eps.to(mean.device)

    def text_features(self, residuals):
        """[n, L, C, D] normalised class features of the prompts of each residual [n, L, d]."""
        n, n_samples = residuals.shape[:2]
        shared, tails, eot = self.prompt_learner(residuals.flatten(0, 1))  # [nL, P, d], [C, T, d]
        if kernels is not None:  # the shared [SOS][V + r] positions once per draw (same features)
            features = kernels.shared_prefix_encode(self.text_encoder, shared, tails, eot)
        else:  # the whole prompts [nL * C, P + T, d]
            whole = torch.cat([shared[:, None].expand(-1, len(eot), -1, -1),
                               tails.expand(len(shared), -1, -1, -1)], dim=2).flatten(0, 1)
            features = self.text_encoder(whole, eot.repeat(len(shared)))
            features = features.view(len(shared), len(eot), -1)  # [nL, C, D]
        return F.normalize(features.float(), dim=-1).view(n, n_samples, features.shape[1], -1)

    def class_text_features(self):
        """[1, L, C, D] of L residuals drawn once per evaluation (standard); None (conditional)."""
        if self.prompt_learner.meta_net is not None:
            return None
        return self.text_features(self.residuals(*self.prompt_learner.posterior(None)))

    def sample_logits(self, x, text_features=None):
        """x: images [B, 3, H, W], or their features [B, D]. Returns the logits of every sample
        [B, L, C] and the KL of each posterior to the prior, [1] (standard) or [B] (conditional)."""
        image_features = x if x.dim() == 2 else self.encode_image(x)  # [B, D]
        scale = self.clip.logit_scale.exp()
        if self.prompt_learner.meta_net is None:  # standard: the same L prompts for every image
            mean, logvar = self.prompt_learner.posterior(None)  # [1, d]
            if text_features is None:
                text_features = self.text_features(self.residuals(mean, logvar))
            logits = scale * torch.einsum("bd,lcd->blc", image_features, text_features[0])
            return logits, kl_to_prior(mean, logvar)
        logits, kl = [], []  # conditional: L * C prompts per image, from its own posterior
        per_pass = max(1, PROMPTS_PER_PASS // (self.samples * len(self.prompt_learner.eot)))
        for chunk in image_features.split(per_pass):
            mean, logvar = self.prompt_learner.posterior(chunk)  # [b, d] each
            text_features = self.text_features(self.residuals(mean, logvar))  # [b, L, C, D]
            logits.append(scale * torch.einsum("bd,blcd->blc", chunk, text_features))
            kl.append(kl_to_prior(mean, logvar))
        return torch.cat(logits), torch.cat(kl)

    def predictive(self, x, text_features=None):
        """log p(y | x) ~ log (1/L sum_l softmax(logits_l)) [B, C] (in fp32), and the KL to the
        prior averaged over the posteriors (a scalar)."""
        logits, kl = self.sample_logits(x, text_features)  # [B, L, C], [1 or B]
        log_p = torch.logsumexp(logits.float().log_softmax(-1), dim=1) - math.log(logits.shape[1])
        return log_p, kl.mean()

    def forward(self, x, text_features=None):
        """The log-predictive [B, C] (cross-entropy on it: the predictive's NLL)."""
        return self.predictive(x, text_features)[0]


def kl_to_prior(mean, logvar):
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) [n, d] -> [n], averaged over the d dimensions as the
    official code does: mean_j (exp(logvar_j) + mu_j^2 - 1 - logvar_j) / 2."""
    return 0.5 * (logvar.exp() + mean.pow(2) - 1 - logvar).mean(-1)


def train_step(model, optimizer, x, y):
    """One SGD step on a batch already on the device: the paper's negative ELBO (official weights).
    Returns {"loss", "ce", "kl"} (loss = ce + KL_WEIGHT kl) and the number correct, as tensors."""
    with data.autocast(x.device):
        log_p, kl = model.predictive(x)  # [B, C] log of the L-sample mean of p(y | x, r_l); scalar
    # -log (1/L sum_l p(y | x, r_l)), the log of the Monte Carlo average (not the mean of the logs),
    # + beta KL(q || N(0, I)), averaged over the dimensions (and over the batch's posteriors)
    ce = F.nll_loss(log_p, y)
    loss = ce + KL_WEIGHT * kl
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    terms = {"loss": loss.detach(), "ce": ce.detach(), "kl": kl.detach()}
    return terms, (log_p.argmax(-1) == y).sum()


def sgd(learned, args, device):
    """Dassl's SGD, its lr a tensor the schedule fills in place, so that a captured step reads each
    epoch's value (fused SGD on the GPU; float64 on the CPU: a Python float's update, exactly)."""
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    return torch.optim.SGD(learned, lr=torch.tensor(args.lr, dtype=dtype, device=device),
                           momentum=args.momentum, weight_decay=args.weight_decay,
                           fused=device.type == "cuda")


class PromptLearner(nn.Module):
    """The learned context V [M, d] and the posterior q(r) of the residual r [d] added to every
    context token. Gives the prompts [SOS][V + r][CLASS][.][EOS][pad] for the current class names,
    one per (residual, class), as the part every class shares and the class tokens."""

    def __init__(self, clip, tokenize, classnames, args):
        super().__init__()
        self.tokenize, self.token_embedding = tokenize, clip.token_embedding
        self.truncate = not args.no_truncate
        device = clip.token_embedding.weight.device
        ctx_dim = clip.ln_final.weight.shape[0]  # text width d (512 for ViT-B/16)
        context_length = tokenize(["x"]).shape[1]  # 77 for OpenAI CLIP (not the L of the samples)
        if args.ctx_init:
            ids = tokenize([args.ctx_init]).to(device)  # [1, 77]; cut to the context if longer
            self.n_ctx = int(ids.argmax(-1)) - 1  # BPE tokens between SOS and EOT (4 here)
            data.require(self.n_ctx + 2 < context_length, f"--ctx-init {args.ctx_init!r} does not "
                         f"fit the text context of {context_length} tokens with a class name: use "
                         "fewer words")
            with torch.no_grad():
                ctx_vectors = self.token_embedding(ids)[0, 1:1 + self.n_ctx].float()  # [M, d]
            self.prefix_words = args.ctx_init
        else:
            self.n_ctx = args.n_ctx
            data.require(self.n_ctx + 3 < context_length, f"--n-ctx {self.n_ctx} does not fit the "
                         f"text context of {context_length} tokens with a class name: use fewer")
            ctx_vectors = nn.init.normal_(torch.empty(self.n_ctx, ctx_dim, device=device), std=0.02)
            self.prefix_words = " ".join(["X"] * self.n_ctx)  # placeholders that V replaces
        self.ctx = nn.Parameter(ctx_vectors)  # fp32 master copy, whatever the backbone's precision
        self.meta_net = None
        if args.conditional:  # q(r | x) = N(mu(x), diag(exp(logvar(x)))) from the image feature
            vis_dim = clip.text_projection.shape[1]  # image and text features share the dimension D
            self.meta_net = nn.ModuleDict(dict(mean=inference_block(vis_dim, ctx_dim),
                                               logvar=inference_block(vis_dim, ctx_dim))).to(device)
        else:  # q(r) = N(mu, diag(exp(logvar))); official init: mu = 0, logvar ~ U[0, 1)
            self.posterior_mean = nn.Parameter(torch.zeros(1, ctx_dim, device=device))
            self.posterior_logvar = nn.Parameter(torch.rand(1, ctx_dim, device=device))
        self.set_classes(classnames)

    def set_classes(self, classnames):
        """Build the frozen parts of the prompts of these class names (base or new classes)."""
        names = [c.replace("_", " ") for c in classnames]
        device = self.token_embedding.weight.device
        ids = self.tokenize([f"{self.prefix_words} {name}." for name in names]).to(device)  # C, 77
        eot = ids.argmax(-1)  # [C]: EOT has the largest token id
        too_long = [name for name, e in zip(names, eot.tolist()) if e >= ids.shape[1] - 1]  # cut
        data.require(not too_long, f"the prompt '{self.prefix_words} <class>.' does not fit the "
                     f"text context of {ids.shape[1]} tokens for {len(too_long)} classes (e.g. "
                     f"{(too_long or [''])[0]!r}): use a shorter --ctx-init or fewer --n-ctx")
        # Truncation: positions after the longest prompt's EOT never reach a feature (causal mask).
        length = int(eot.max()) + 1 if self.truncate else ids.shape[1]
        with torch.no_grad():
            emb = self.token_embedding(ids[:, :length]).float()  # [C, n, d]
        self.register_buffer("token_prefix", emb[:1, :1], persistent=False)  # SOS [1, 1, d]
        self.register_buffer("token_suffix", emb[:, 1 + self.n_ctx:], persistent=False)  # CLASS.EOS
        self.register_buffer("eot", eot, persistent=False)

    def posterior(self, image_features):
        """(mean, log-variance) of q(r), [1, d] each, one posterior for all images (standard), or of
        q(r | x), [B, d] each, from image features [B, D] (conditional); fp32 under autocast too."""
        if self.meta_net is None:
            return self.posterior_mean, self.posterior_logvar
        return tuple(self.meta_net[k](image_features).float() for k in ("mean", "logvar"))

    def forward(self, residuals):
        """residuals [N, d], one sample of r each. The prompt of (sample, class c) is
        [SOS][V + r][CLASS_c][.][EOS][pad]: returns its first 1 + M tokens, shared by every class,
        [N, 1 + M, d], the class tokens [C, len - 1 - M, d], shared by every sample, and eot [C]."""
        ctx = self.ctx + residuals[:, None, :]  # [N, M, d]: v_m + r, the same r for every token
        sos = self.token_prefix.expand(len(residuals), -1, -1)  # [N, 1, d]
        return torch.cat([sos, ctx], dim=1), self.token_suffix, self.eot


def inference_block(n_in, n_out):
    """A head of the amortised posterior (official InferenceBlock): D -> D/2 -> D/2 -> d, ELUs."""
    hidden = n_in // 2
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ELU(inplace=True), nn.Linear(hidden, hidden),
                         nn.ELU(inplace=True), nn.Linear(hidden, n_out))


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


# ----------------------------------------------------------------------------------------- settings
# The released config (configs/trainers/VPT/vit_b16_c4_ep10_batch1_ctxv1.yaml): batch 1, 40 epochs,
# L 10, then the per-dataset L and epochs of the official scripts (VPT.md, the same in every
# protocol); a flag given on the command line wins over both.
PAPER = dict(batch_size=1, epochs=40, samples=10)
DATASET_SETTINGS = {
    "caltech101": dict(samples=20, epochs=20), "oxford_pets": dict(samples=40, epochs=20),
    "stanford_cars": dict(samples=20, epochs=40), "oxford_flowers": dict(samples=10, epochs=40),
    "food101": dict(samples=20, epochs=20), "fgvc_aircraft": dict(samples=10, epochs=10),
    "sun397": dict(samples=20, epochs=10), "dtd": dict(samples=40, epochs=10),
    "eurosat": dict(samples=20, epochs=60), "ucf101": dict(samples=5, epochs=20),
    "imagenet": dict(samples=10, epochs=10),  # also the source of cross-dataset transfer
    # The offline world ('shapes...'), no dataset of the paper: the released config's L 10, with 10
    # epochs (as 4 of the paper's datasets) instead of 40: chosen for time (README), not accuracy.
    "shapes": dict(epochs=10),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--conditional", action="store_true", help="the residual's posterior from the image feature "
      "(official VPT_TYPE cocoopvpt); off: learned parameters (coopvpt, the released config)")
    a("--samples", type=int, default=None, help="L, Monte Carlo samples of the residual, training "
      "and test (TRAINER.VPT.L); default: the official scripts' value per dataset, else 10")
    a("--n-ctx", type=int, default=4, help="context tokens M when --ctx-init is empty (paper: 4)")
    a("--ctx-init", default="a photo of a", help="words that initialise the context (M = their BPE "
      "token count); '' = random N(0, 0.02^2) (paper: a photo of a)")
    a("--lr", type=float, default=0.002, help="SGD lr after warm-up, cosine-annealed per epoch")
    a("--momentum", type=float, default=0.9, help="SGD momentum (Dassl default: 0.9)")
    a("--weight-decay", type=float, default=5e-4, help="SGD weight decay (Dassl default: 5e-4)")
    a("--warmup-epochs", type=int, default=1, help="constant warm-up epochs before the cosine")
    a("--warmup-lr", type=float, default=1e-5, help="learning rate during warm-up (paper: 1e-5)")
    a("--no-truncate", action="store_true", help="run the text transformer over all context "
      "positions (slower, same result; the official code does)")
    data.add_run_flags(p, epochs_help="default: the official scripts' value per dataset "
                       "(DATASET_SETTINGS), else 40 (the released config)",
                       batch_help="default: 1, the paper value")
    return p.parse_args(argv)


def method_name(args):
    return "vprompt-conditional" if args.conditional else "vprompt"


def resolve_settings(args):
    """Fill the settings left at None: command line > DATASET_SETTINGS > PAPER; check them."""
    dataset = "shapes" if args.dataset.startswith(data.WORLD_PREFIX) else args.dataset
    for key, value in {**PAPER, **DATASET_SETTINGS.get(dataset, {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    data.resolve_run_args(args)
    check_settings(args)
    return args


def check_settings(args):
    """Refuse, before anything is written, a setting that would run and give wrong numbers (a
    data.UsageError); the prompt's length is checked where it is tokenized (PromptLearner)."""
    data.check_run_args(args)
    data.check_int("--samples", args.samples, 1)
    data.check_sgd_args(args)
    data.require(args.ctx_init.strip() or args.n_ctx >= 1, f"--n-ctx {args.n_ctx} with an empty "
                 "--ctx-init: the prompt needs at least one context token")


def learning_rate(epoch, args):
    """Dassl's schedule, stepped once per epoch: constant warm-up, then cosine over all epochs.
    eta_0 = warmup_lr; eta_e = lr/2 (1 + cos(pi (e - W) / E)) for e >= W (never reaches 0)."""
    if epoch < args.warmup_epochs:
        return args.warmup_lr
    return 0.5 * args.lr * (1 + math.cos(math.pi * (epoch - args.warmup_epochs) / args.epochs))


# ------------------------------------------------------------------------------------------ the run
def main(args):
    if args.predict:  # --predict RUN_DIR IMAGE...: a finished run as a classifier
        return data.predict(args, load_classifier)
    start_time = time.time()
    args, saved, out, device = data.start_run(args, method_name(args), resolve_settings,
                                              check_settings)
    data.print_start(args, method_name(args), device, out, L=args.samples)
    data.seed_everything(args.seed)  # few-shot sampling, initialisation, shuffling, training draws

    # Data and model: the base half of the classes for base2new (CoCoOp's protocol), else all.
    task = data.load_task(args, device)
    model, optimizer = build(task.backbone, task.train_names, args, device)
    if args.evaluate:
        data.load_learned(model, saved["learned"])
        return data.finish_run(out, evaluate_run(model, task, args, device), args, start_time)
    data.make_run_folder(out, args, saved)
    train_items = data.training_items(task, args, cache=out / "fewshot.json")
    train_loader = data.training_batches(task, train_items, args, device, model.encode_image,
                                         images=False)  # frozen features where no augmentation

    # The step: SGD on the context and the posterior (its parameters, or the networks giving it).
    learned = [p for p in model.parameters() if p.requires_grad]
    lr = optimizer.param_groups[0]["lr"]
    step = functools.partial(train_step, model, optimizer)
    if kernels is not None and device.type == "cuda" and not args.eager:
        step = kernels.CapturedStep(train_step, model, optimizer)  # the same step, as a CUDA graph
    print(f"learning {sum(p.numel() for p in learned):,} parameters on {len(train_items)} images")
    start_epoch = data.restore_checkpoint(saved, model, optimizer, train_loader.generator)

    for epoch in data.epoch_bar(args, start_epoch):
        lr.fill_(learning_rate(epoch, args))  # Dassl steps the scheduler once per epoch
        steps, seen, started = [], 0, time.time()  # each step's (loss terms, number correct)
        for x, y in train_loader:
            steps.append(step(x.to(device, non_blocking=True), y.to(device, non_blocking=True)))
            seen += len(y)
        fit = data.epoch_fit(steps, seen, epoch, learning_rate(epoch, args), started)
        data.save_checkpoint(out / "checkpoint.pt", args, epoch + 1, model, optimizer,
                             train_loader.generator, fit)

    return data.finish_run(out, evaluate_run(model, task, args, device), args, start_time)


def build(backbone, classnames, args, device):
    """The model for these classes and its optimiser (what main trains; bench_steps.py too)."""
    model = PromptedCLIP(backbone.model, backbone.tokenize, classnames, args).to(device)
    return model, sgd([p for p in model.parameters() if p.requires_grad], args, device)


def load_classifier(run_dir, classnames=None, device=None):
    """A finished run as a callable (data.RunClassifier): images -> probabilities [N, C] over
    .classnames, the Monte Carlo average of L draws seeded as the evaluation's (at every call)."""
    run = data.load_run(run_dir, device)
    model, _ = build(run.backbone, run.classnames, run.args, run.device)

    def text_features(names):
        model.prompt_learner.set_classes(names)
        model.sampler.manual_seed(run.args.seed)
        return model.class_text_features()
    return data.RunClassifier(model, run, text_features, classnames)


def evaluate_run(model, task, args, device) -> dict:
    """Accuracy of the learned prompt distribution and of zero-shot CLIP on the protocol's test sets
    (data.evaluation_sets), on image features computed once per split, each split's draws seeded
    with --seed; prints the table, returns the record."""
    splits, ours = data.evaluation_sets(task, args.protocol), method_name(args)
    backbone = task.backbone
    rows, test_loss = {"zero-shot CLIP": {}, ours: {}}, {}
    for split, (items, names, source) in splits.items():
        batches = data.feature_batches(splits[split], backbone, args, device, model.encode_image)
        model.prompt_learner.set_classes(names)
        model.sampler.manual_seed(args.seed)  # each split's draws from the seed: --evaluate repeats
        metrics = data.evaluate(model, batches)
        rows[ours][split], test_loss[split] = metrics["acc"], metrics["loss"]
        rows["zero-shot CLIP"][split] = data.zero_shot_accuracy(backbone, names, source.template,
                                                                batches)
    model.prompt_learner.set_classes(task.train_names)
    return data.result_record(ours, args, task, rows, ours, splits, test_loss)


if __name__ == "__main__":
    data.run_script(main, parse_args)  # a UsageError: one line, exit status 2
