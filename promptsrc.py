"""PromptSRC: self-regulating deep vision and language prompts, in one file.

PromptSRC Khattak, Wasim, Naseer, Khan, Yang, Khan. "Self-regulating Prompts: Foundational Model
          Adaptation without Forgetting." ICCV 2023. https://arxiv.org/abs/2307.06948
IVLP      the same deep prompts trained with cross-entropy alone: the paper's baseline (--ivlp).

Both encoders of CLIP stay frozen and get deep prompts (IVLP): 4 learned text tokens replace the
context words of "a photo of a {class}." at the input and again, with a new set, at the input of
each of the next blocks up to depth 9; 4 learned image tokens are appended after the patch tokens
and replaced by a new set in each of the next blocks (a depth above an encoder's blocks means all
of them, as in the official code). Prompts fitted with cross-entropy alone forget what CLIP knew,
so PromptSRC regularises them towards the frozen model: L1 between prompted and frozen text
features and between prompted and frozen image features, and a KL from the frozen to the prompted
logits (mutual agreement). The frozen text features average 60 templates (textual diversity), and
the prompts used at test time are a Gaussian-weighted average of each epoch's prompts (GPA), which
favours the later, not the last, epochs.

  python promptsrc.py                                     # offline world (tiny CLIP), PromptSRC
  python promptsrc.py --ivlp                              # offline world, the IVLP baseline
  python promptsrc.py --dataset caltech101 --root ~/data  # paper setting: ViT-B/16 openai, 16 shots
  python promptsrc.py --resume RUN_DIR     # continue a killed run (--evaluate RUN_DIR: re-evaluate)
  python promptsrc.py --protocol all --shots 4            # few-shot on all classes (50 epochs)
  python promptsrc.py --protocol cross --dataset imagenet --root ~/data  # cross-dataset transfer

Differs from the official code (muzairkhattak/PromptSRC) in:
- open_clip instead of OpenAI's clip package (QuickGELU forced for the `openai` weights, as theirs).
- precision: fp32 weights and prompts, bf16 autocast on CUDA (the templates' frozen text features
  too). The official default (PREC fp16) runs the prompted CLIP in fp16: its input text context is
  fp16, its deeper prompts fp32 parameters cast to fp16 in the forward; its frozen text features
  come from a second, fp32 CLIP. Here the frozen model is the prompted one with its prompts off.
- frozen image features once per training image where no random augmentation applies (the world),
  else once per batch as the official code; frozen text features once per class set; the prompted
  text side once per evaluation, not per test batch; the text transformer runs only up to the
  longest prompt's end-of-text token (exact: causal mask).
- a non-empty --ctx-init sets the text context length M to its BPE token count (4 for "a photo of
  a", as the official config); the official code takes N_CTX_TEXT and word-initialises only when
  that is at most 4 (with the first N_CTX_TEXT tokens), else it initialises at random.
- GPA averages only the prompts (the official code: the whole state dict, a no-op for the frozen
  weights up to fp16 rounding), in fp32, as a running average: after epoch e it holds
  sum_{k<=e} g_k theta_k / sum_{k<=e} g_k, at the last epoch the official sum_e g_e theta_e.
- on the offline world the frozen text features average the tiny CLIP's pretraining captions that
  name only colour and shape (world/shapes.py WORLD_CAPTIONS: 7), not the 60 ImageNet templates.
- on CUDA the step is recorded once as a CUDA graph and replayed (kernels.CapturedStep); the logit
  loss and GPA run as fused Triton kernels where kernels.kernel_available(device), else as the
  PyTorch code below (the same numbers to fp32 rounding; tested). Training images are decoded once;
  their random crops and flips are tensor ops on the device (data.train_batches: torchvision's
  distribution, other draws). A checkpoint after every epoch holds the GPA state too.
The protocols (--protocol, as coop.py's) take their official configs' settings (PROTOCOL_SETTINGS).
"""
import argparse
import functools
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import data

try:  # kernels/ beside this file: fused Triton kernels and the captured CUDA-graph step
    import kernels
except ImportError:
    kernels = None

PROMPTS_PER_PASS = 4096  # frozen text features: at most this many template prompts in one text pass


# ------------------------------------------------------------------------------------- the method
def promptsrc_loss(logits, labels, frozen_logits, text_features, frozen_text_features,
                   image_features, frozen_image_features, text_loss_weight, image_loss_weight):
    """The paper's L = L_CE + L_SCL, L_SCL = L_SCL-logits + lambda_1 L_SCL-image + lambda_2
    L_SCL-text (the official forward_backward), and its terms, unweighted: {"loss": L, "ce",
    "scl_logits", "scl_text", "scl_image"}. Features L2-normalised; everything in fp32."""
    # CE + SCL-logits (mutual agreement of the logits)
    loss, terms = logit_loss(logits, frozen_logits, labels)
    # SCL-text: mean |g_p - g| over the C*D entries of the prompted and frozen (template mean) text
    terms["scl_text"] = F.l1_loss(text_features, frozen_text_features)
    # SCL-image: mean |f_p - f| over the B*D entries of the prompted and the frozen image features
    terms["scl_image"] = F.l1_loss(image_features, frozen_image_features)
    loss = loss + text_loss_weight * terms["scl_text"] + image_loss_weight * terms["scl_image"]
    return {"loss": loss, **terms}


def logit_loss(logits, frozen_logits, labels):
    """CE(z_p, y) + L_SCL-logits, and the two: {"ce", "scl_logits"}. L_SCL-logits: the KL from
    the frozen model's to the prompted model's class distribution, KL(softmax(z) || softmax(z_p))
    summed over the batch and divided by B*C (the official normalisation, so a small weight), at
    temperature 1 on logits that carry CLIP's scale. One fused kernel where possible."""
    # fused where Triton runs (CUDA, or the CPU under TRITON_INTERPRET=1); labels unchecked (a sync)
    if kernels is not None and kernels.kernel_available(logits.device):
        loss, rows = kernels.promptsrc_logit_loss(logits, frozen_logits, labels, check_labels=False,
                                                  return_stats=True)
        return loss, {"ce": rows.ce.mean(), "scl_logits": rows.kl.mean() / logits.shape[1]}
    ce = F.cross_entropy(logits, labels)
    scl_logits = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(frozen_logits, dim=1),
                          reduction="sum", log_target=True) / logits.numel()
    return ce + scl_logits, {"ce": ce, "scl_logits": scl_logits}


def train_step(model, optimizer, x, y, frozen_image_features=None):
    """One SGD step on a batch already on the device: images x [B, 3, H, W], labels y [B] and,
    where they were computed once (no random augmentation), the frozen image features [B, D].
    Returns promptsrc_loss's terms (IVLP: {"loss", "ce"}) and the number correct: device tensors."""
    scale = model.clip.logit_scale.exp()
    with data.autocast(x.device):
        text_features = model.class_text_features()  # [C, D] prompted
        image_features = model.encode_image(x)  # [B, D] prompted
        logits = (scale * image_features @ text_features.t()).float()  # [B, C]
        if not model.ivlp and frozen_image_features is None:  # this batch's random view, frozen
            with torch.no_grad():
                frozen_image_features = model.encode_image(x, prompted=False)
    if model.ivlp:  # IVLP: cross-entropy is the whole objective
        terms = dict.fromkeys(["loss", "ce"], F.cross_entropy(logits, y))
    else:
        frozen_image_features = frozen_image_features.float()
        frozen_logits = scale * frozen_image_features @ model.frozen_text_features.t()
        terms = promptsrc_loss(logits, y, frozen_logits, text_features, model.frozen_text_features,
                               image_features, frozen_image_features, model.text_loss_weight,
                               model.image_loss_weight)
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward()
    optimizer.step()
    return {k: v.detach() for k, v in terms.items()}, (logits.argmax(-1) == y).sum()


class PromptedCLIP(nn.Module):
    """Frozen CLIP + deep prompts. logits = s * cos(f_p(x), g_p(t_c)), s = CLIP's frozen
    exp(logit_scale). The frozen model is the same CLIP with its prompts off (prompted=False)."""

    def __init__(self, clip, tokenize, classnames, args):
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self.image_encoder = ImageEncoder(clip.visual)  # first: it refuses an image tower not a ViT
        self.text_encoder = TextEncoder(clip)
        self.prompt_learner = PromptLearner(clip, tokenize, classnames, args)
        self.ivlp, self.text_loss_weight = args.ivlp, args.text_loss_weight
        self.image_loss_weight = args.image_loss_weight
        self.register_buffer("frozen_text_features", torch.empty(0), persistent=False)  # see below

    def encode_image(self, images, prompted=True):  # [B, 3, H, W] -> L2-normalised [B, D]
        prompts = self.prompt_learner.vision_prompts if prompted else None
        return F.normalize(self.image_encoder(images, prompts).float(), dim=-1)

    def class_text_features(self):
        """[C, D] normalised prompted text features of the current classes (once per evaluation)."""
        prompts, eot = self.prompt_learner()
        features = self.text_encoder(prompts, eot, self.prompt_learner.text_prompts)
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def set_frozen_text_features(self, classnames, templates):
        """The frozen text features of L_SCL-text (textual diversity): per class the mean of the
        frozen model's unnormalised features over the templates, normalised; once per class set."""
        names = [c.replace("_", " ") for c in classnames]
        texts = [t.format(name) for name in names for t in templates]  # class-major: [C * T]
        ids = self.prompt_learner.tokenize(texts).to(self.clip.logit_scale.device)  # [C * T, L]
        eot = ids.argmax(-1)
        too_long = [text for text, e in zip(texts, eot.tolist()) if e >= ids.shape[1] - 1]
        data.require(not too_long, f"the template prompt {(too_long or [''])[0]!r} does not fit "
                     f"the text context of {ids.shape[1]} tokens (frozen text features)")
        features = []
        for chunk, chunk_eot in zip(ids.split(PROMPTS_PER_PASS), eot.split(PROMPTS_PER_PASS)):
            chunk = chunk[:, :int(chunk_eot.max()) + 1]  # exact (causal mask), as the prompted pass
            with data.autocast(ids.device):
                embeddings = self.clip.token_embedding(chunk)
                features.append(self.text_encoder(embeddings, chunk_eot).float())
        mean = torch.cat(features).view(len(names), len(templates), -1).mean(1)  # [C, D]
        self.frozen_text_features = F.normalize(mean, dim=-1)

    def forward(self, x, text_features=None):
        """x: images [B, 3, H, W]. Returns the prompted logits [B, C]."""
        text_features = self.class_text_features() if text_features is None else text_features
        return self.clip.logit_scale.exp() * self.encode_image(x) @ text_features.t()


class PromptLearner(nn.Module):
    """The learned prompts (IVLP): the input-level text context ctx [M, d] (--ctx-init's words), the
    deeper text prompts [J_T - 1, M, d] and the image prompts [J_V, M_V, w] (N(0, 0.02^2)). Builds
    the input embeddings [SOS][ctx][CLASS][.][EOS] of the current class names."""

    def __init__(self, clip, tokenize, classnames, args):
        super().__init__()
        self.tokenize, self.token_embedding = tokenize, clip.token_embedding
        self.truncate = not args.no_truncate
        device = clip.token_embedding.weight.device
        ctx_dim, width = clip.ln_final.weight.shape[0], clip.visual.conv1.weight.shape[0]  # d, w
        context_length = tokenize(["x"]).shape[1]  # L: 77 for OpenAI CLIP
        if args.ctx_init:
            ids = tokenize([args.ctx_init]).to(device)  # [1, L]; cut to L by the tokenizer
            self.n_ctx = int(ids.argmax(-1)) - 1  # BPE tokens between SOS and EOT: 4 here
            data.require(self.n_ctx + 2 < context_length, f"--ctx-init {args.ctx_init!r} does not "
                         f"fit the text context of {context_length} tokens with a class name")
            with torch.no_grad():
                ctx_vectors = self.token_embedding(ids)[0, 1:1 + self.n_ctx].float()  # [M, d]
            self.prefix_words = args.ctx_init
        else:
            self.n_ctx = args.n_ctx_text
            data.require(self.n_ctx + 3 < context_length, f"--n-ctx-text {self.n_ctx} does not fit "
                         f"the text context of {context_length} tokens with a class name")
            ctx_vectors = nn.init.normal_(torch.empty(self.n_ctx, ctx_dim, device=device), std=0.02)
            self.prefix_words = " ".join(["X"] * self.n_ctx)  # placeholders that ctx replaces
        depth_text = min(args.prompt_depth_text, len(clip.transformer.resblocks))
        depth_vision = min(args.prompt_depth_vision, len(clip.visual.transformer.resblocks))
        self.ctx = nn.Parameter(ctx_vectors)  # fp32 master copies, whatever the backbone's dtype
        self.text_prompts = nn.Parameter(nn.init.normal_(  # [J_T - 1, M, d]
            torch.empty(depth_text - 1, self.n_ctx, ctx_dim, device=device), std=0.02))
        self.vision_prompts = nn.Parameter(nn.init.normal_(  # [J_V, M_V, w]
            torch.empty(depth_vision, args.n_ctx_vision, width, device=device), std=0.02))
        self.set_classes(classnames)

    def set_classes(self, classnames):
        """Build the frozen parts of the prompts for these class names (base, new, another set)."""
        names = [c.replace("_", " ") for c in classnames]
        device = self.token_embedding.weight.device
        ids = self.tokenize([f"{self.prefix_words} {name}." for name in names]).to(device)  # [C, L]
        eot = ids.argmax(-1)  # [C]: EOT has the largest token id
        too_long = [name for name, e in zip(names, eot.tolist()) if e >= ids.shape[1] - 1]  # cut
        data.require(not too_long, f"the prompt '{self.prefix_words} <class>.' does not fit the "
                     f"text context of {ids.shape[1]} tokens for {len(too_long)} classes (e.g. "
                     f"{(too_long or [''])[0]!r}): use a shorter --ctx-init or fewer --n-ctx-text")
        length = int(eot.max()) + 1 if self.truncate else ids.shape[1]  # later: never in a feature
        with torch.no_grad():
            emb = self.token_embedding(ids[:, :length]).float()  # [C, n, d]
        self.register_buffer("token_prefix", emb[:, :1], persistent=False)  # SOS [C, 1, d]
        self.register_buffer("token_suffix", emb[:, 1 + self.n_ctx:], persistent=False)  # CLASS.EOS
        self.register_buffer("eot", eot, persistent=False)

    def forward(self):
        """Returns the input embeddings [C, n, d] and eot [C]."""
        ctx = self.ctx.expand(len(self.eot), -1, -1)  # [C, M, d]
        return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1), self.eot


class TextEncoder(nn.Module):
    """CLIP's text tower fed prompt embeddings, with deep prompts (IVLP): before block i = 1..J-1
    the tokens at positions 1..M are replaced by the learned set of that block, so each block sees
    new prompt tokens (what the previous block made of the old ones is dropped); blocks from J on
    carry them along. deep=None runs the blocks as they are: CLIP's own encode_text. The causal
    mask keeps the end-of-text (EOT) feature independent of later positions, so prompts cut after
    the longest EOT give exactly the features of the full context."""

    def __init__(self, clip):
        super().__init__()
        assert clip.transformer.batch_first and clip.text_pool_type == "argmax", "not open_clip's"
        self.resblocks = clip.transformer.resblocks
        self.positional_embedding = clip.positional_embedding  # [L, d]
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection  # [d, D]
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)  # [L, L], causal

    def forward(self, prompts, eot, deep=None):
        """prompts: [N, n, d] token embeddings (n <= L); eot: [N] EOT positions; deep: [J-1, M, d],
        the prompts of blocks 1..J-1, or None. Returns features [N, D]."""
        n = prompts.shape[1]
        x = prompts + self.positional_embedding[:n]  # [N, n, d]
        for i, block in enumerate(self.resblocks):
            if deep is not None and 1 <= i <= len(deep):  # positions 1..M: [SOS][P_i][CLASS . EOT]
                prompt = deep[i - 1].expand(len(x), -1, -1).to(x.dtype)
                x = torch.cat([x[:, :1], prompt, x[:, 1 + deep.shape[1]:]], dim=1)
            x = block(x, attn_mask=self.attn_mask[:n, :n])
        x = self.ln_final(x)
        return x[torch.arange(len(x), device=x.device), eot] @ self.text_projection  # [N, D]


class ImageEncoder(nn.Module):
    """CLIP's ViT with deep prompts (IVLP): M learned tokens appended after the patch tokens, before
    ln_pre; before block i = 1..J-1 the last M tokens are replaced by that block's set. prompts=None
    (or J = 0) runs the ViT as it is: CLIP's own encode_image, the frozen model."""

    def __init__(self, visual):
        super().__init__()
        ok = (getattr(visual, "transformer", None) is not None and visual.transformer.batch_first
              and visual.attn_pool is None and visual.pool_type == "tok"
              and not visual.final_ln_after_pool)
        data.require(ok, f"{type(visual).__name__}: PromptSRC prompts a ViT whose feature is its "
                     "class token (open_clip VisionTransformer, e.g. ViT-B-16); this is not one")
        self.visual = visual

    def forward(self, images, prompts=None):
        """images [B, 3, H, W]; prompts [J, M, w] (block 0's first) or None -> features [B, D]."""
        v = self.visual
        x = v.conv1(images.to(v.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [B, grid^2, w]
        cls = v.class_embedding.to(x.dtype).expand(len(x), 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # [B, 1 + grid^2, w]
        deep = prompts is not None and len(prompts) > 0
        if deep:  # [B, 1 + grid^2 + M, w]
            x = torch.cat([x, prompts[0].expand(len(x), -1, -1).to(x.dtype)], dim=1)
        x = v.ln_pre(x)
        for i, block in enumerate(v.transformer.resblocks):
            if deep and 1 <= i < len(prompts):  # replace the last M tokens with block i's prompts
                prompt = prompts[i].expand(len(x), -1, -1).to(x.dtype)
                x = torch.cat([x[:, :-prompts.shape[1]], prompt], dim=1)
            x = block(x)
        return v.ln_post(x[:, 0]) @ v.proj  # [B, D]


class PromptAverage:
    """Gaussian prompt aggregation (GPA), the readable form of kernels.GaussianPromptAverage (same
    attributes and numbers): fp32 running averages; after epoch e avg <- lerp(avg, theta_e,
    g_e / S_e), S_e = g_1 + ... + g_e: at the last epoch (S_E = 1) the official sum_e g_e theta_e"""

    def __init__(self, params, n_epochs, mu, sigma):
        self.weights = gpa_weights(n_epochs, mu, sigma)
        self.averages = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
        self.weight_seen = 0.0  # S_e

    @torch.no_grad()
    def update(self, epoch, params):
        """Fold in the prompts at the end of `epoch` (1-based)."""
        g = self.weights[epoch - 1]
        self.weight_seen += g
        factor = g / self.weight_seen if self.weight_seen > 0 else 0.0  # far epochs' g may be 0
        torch._foreach_lerp_(self.averages, [p.detach().float() for p in params], factor)

    @torch.no_grad()
    def copy_to(self, params):
        torch._foreach_copy_([p.data for p in params], self.averages)


def prompt_average(params, args, device):
    """GPA over the learned prompts: one fused kernel launch per epoch where possible."""
    if kernels is not None and kernels.kernel_available(device):
        return kernels.GaussianPromptAverage(params, args.epochs, args.gpa_mean, args.gpa_std)
    return PromptAverage(params, args.epochs, args.gpa_mean, args.gpa_std)


def gaussian_pdf(epochs, mu, sigma):
    """N(e; mu, sigma) for epochs e = 1..E (sigma a standard deviation), the official get_gauss."""
    return [math.exp(-0.5 * ((e - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
            for e in range(1, epochs + 1)]


def gpa_weights(epochs, mu, sigma):
    """GPA's epoch weights g_1..g_E: the Gaussian normalised to sum 1 over the epochs (mu 15, sigma
    1, 20 epochs: 0.054, 0.242, 0.399, 0.242, 0.054 on epochs 13-17, nearly nothing elsewhere)."""
    pdf = gaussian_pdf(epochs, mu, sigma)
    return [g / sum(pdf) for g in pdf]


def sgd(learned, args, device):
    """Dassl's SGD, its lr a tensor the schedule fills in place, so that a captured step reads each
    epoch's value (fused SGD on the GPU; float64 on the CPU: a Python float's update, exactly)."""
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    return torch.optim.SGD(learned, lr=torch.tensor(args.lr, dtype=dtype, device=device),
                           momentum=args.momentum, weight_decay=args.weight_decay,
                           fused=device.type == "cuda")


# --------------------------------------------------------------------------------------- settings
# Paper defaults (configs/trainers/PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx.yaml), then per-protocol
# and per-dataset settings of the official configs; a flag given on the command line wins over all.
PAPER = dict(epochs=20, batch_size=4, prompt_depth_text=9, prompt_depth_vision=9, gpa_mean=15.0,
             gpa_std=1.0)
PROTOCOL_SETTINGS = {  # base2new: the paper's; all: ..._ep50_batch4_4+4ctx_few_shot.yaml
    "base2new": {}, "all": dict(epochs=50, gpa_mean=30.0, gpa_std=30.0),
    "cross": dict(prompt_depth_text=3, prompt_depth_vision=3, gpa_mean=6.0, gpa_std=10.0)}
# The few-shot yaml's exceptions; the offline world (every 'shapes...' benchmark) runs the paper's.
FEW_SHOT_GPA_45_5 = ("stanford_cars", "oxford_flowers", "fgvc_aircraft", "dtd", "eurosat")
DATASET_SETTINGS = {name: {"all": dict(gpa_mean=45.0, gpa_std=5.0)} for name in FEW_SHOT_GPA_45_5}
# PromptSRC's textual diversity (trainers/imagenet_templates.py): "a photo of a {}." and the first
# 60 of OpenAI's 80 ImageNet templates without that duplicate; the same 60 for every dataset.
PROMPTSRC_TEMPLATES = ["a photo of a {}."] + [t for t in data.IMAGENET_TEMPLATES[:60]
                                               if t != "a photo of a {}."]


def frozen_templates(dataset):
    """The templates whose mean frozen text feature the text prompts are pulled towards: PromptSRC's
    60 on real data; on the offline world the tiny CLIP's own pretraining captions that name only
    the colour and the shape ("a drawing of a {c} {s}." -> "a drawing of a {}.")."""
    if not dataset.startswith(data.WORLD_PREFIX):
        return PROMPTSRC_TEMPLATES
    from world.shapes import world_class_templates  # data.load_dataset has imported world/
    return world_class_templates()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--ivlp", action="store_true", help="IVLP, the paper's baseline: the same deep prompts, "
      "cross-entropy only, no GPA (official: --trainer IVLP)")
    a("--ctx-init", default="a photo of a", help="words that initialise the input-level text "
      "context (M = their BPE token count); '' = random N(0, 0.02^2) with --n-ctx-text tokens")
    a("--n-ctx-text", type=int, default=4, help="text prompt tokens per block if no --ctx-init (4)")
    a("--n-ctx-vision", type=int, default=4, help="image prompt tokens per block (paper: 4)")
    a("--prompt-depth-text", type=int, default=None, help="text blocks that get prompts, from the "
      "first (paper: 9; cross-dataset 3); capped at the model's")
    a("--prompt-depth-vision", type=int, default=None, help="image blocks that get prompts, from "
      "the first (paper: 9; cross-dataset 3; 0: none); capped at the model's")
    a("--text-loss-weight", type=float, default=25.0, help="weight of L_SCL-text (paper: 25)")
    a("--image-loss-weight", type=float, default=10.0, help="weight of L_SCL-image (paper: 10)")
    a("--gpa-mean", type=float, default=None, help="GPA: mean of the Gaussian over epochs 1..E "
      "(paper: 15; few-shot 30 or 45; cross-dataset 6)")
    a("--gpa-std", type=float, default=None, help="GPA: its standard deviation (paper: 1; few-shot "
      "30 or 5; cross-dataset 10)")
    a("--lr", type=float, default=0.0025, help="SGD lr after warm-up, cosine (paper: 0.0025)")
    a("--momentum", type=float, default=0.9, help="SGD momentum (Dassl default: 0.9)")
    a("--weight-decay", type=float, default=5e-4, help="SGD weight decay (Dassl default: 5e-4)")
    a("--warmup-epochs", type=int, default=1, help="constant warm-up epochs (paper: 1)")
    a("--warmup-lr", type=float, default=1e-5, help="learning rate during warm-up (paper: 1e-5)")
    a("--no-truncate", action="store_true", help="run the text transformer over all context "
      "positions (slower, same result; the official code does)")
    data.add_run_flags(p, epochs_help="default: 20 (few-shot protocol 'all': 50), as the configs",
                       batch_help="default: 4, the paper value")
    return p.parse_args(argv)


def method_name(args):
    return "ivlp" if args.ivlp else "promptsrc"


def resolve_settings(args):
    """Fill the settings left at None (flag > DATASET_SETTINGS > PROTOCOL_SETTINGS > PAPER)."""
    settings = {**PAPER, **PROTOCOL_SETTINGS[args.protocol],
                **DATASET_SETTINGS.get(args.dataset, {}).get(args.protocol, {})}
    for key, value in settings.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    data.resolve_run_args(args)
    check_settings(args)
    return args


def check_settings(args):
    """Refuse, before anything is written, a setting that would run and give wrong numbers (a
    data.UsageError). The prompt's length is checked in PromptLearner, the ViT in ImageEncoder."""
    data.check_run_args(args)
    for name, least in (("prompt_depth_text", 1), ("n_ctx_vision", 1), ("prompt_depth_vision", 0)):
        data.check_int(f"--{name.replace('_', '-')}", getattr(args, name), least)
    data.check_sgd_args(args)
    for name in ("text_loss_weight", "image_loss_weight"):
        data.check_float(f"--{name.replace('_', '-')}", getattr(args, name), minimum=0)
    data.check_float("--gpa-mean", args.gpa_mean)
    data.check_float("--gpa-std", args.gpa_std, above=0)
    data.require(sum(gaussian_pdf(args.epochs, args.gpa_mean, args.gpa_std)) > 0,
                 f"--gpa-mean {args.gpa_mean} with --gpa-std {args.gpa_std} gives every epoch "
                 f"1..{args.epochs} zero weight (the Gaussian underflows): move the mean")
    data.require(args.ctx_init.strip() or args.n_ctx_text >= 1, f"--n-ctx-text {args.n_ctx_text} "
                 "with an empty --ctx-init: the prompt needs at least one token")


def learning_rate(epoch, args):
    """Dassl's schedule, stepped once per epoch: constant warm-up, then cosine over all epochs.
    eta_0 = warmup_lr; eta_e = lr/2 (1 + cos(pi (e - W) / E)) for e >= W (never reaches 0)."""
    if epoch < args.warmup_epochs:
        return args.warmup_lr
    return 0.5 * args.lr * (1 + math.cos(math.pi * (epoch - args.warmup_epochs) / args.epochs))


# ---------------------------------------------------------------------------------------- the run
def main(args):
    if args.predict:  # --predict RUN_DIR IMAGE...: a finished run as a classifier
        return data.predict(args, load_classifier)
    start_time = time.time()
    args, saved, out, device = data.start_run(args, method_name(args), resolve_settings,
                                              check_settings)  # --resume: the run's own settings
    data.print_start(args, method_name(args), device, out)
    data.seed_everything(args.seed)  # few-shot sampling, prompt init, shuffling

    # Data and model: the base half of the classes for base2new (CoCoOp's protocol), else all.
    task = data.load_task(args, device)
    model, optimizer = build(task.backbone, task.train_names, args, device)
    if args.evaluate:
        data.load_learned(model, saved["learned"])
        return data.finish_run(out, evaluate_run(model, task, args), args, start_time)
    data.make_run_folder(out, args, saved)
    train_items = data.training_items(task, args, cache=out / "fewshot.json")
    frozen = None if args.ivlp else functools.partial(model.encode_image, prompted=False)
    train_loader = data.training_batches(task, train_items, args, device, frozen)  # (x, y[, f(x)])

    # The step: SGD on the prompts, its lr a tensor the schedule fills in place; GPA on the same.
    learned = [p for p in model.parameters() if p.requires_grad]
    gpa = None if args.ivlp else prompt_average(learned, args, device)
    lr = optimizer.param_groups[0]["lr"]
    step = functools.partial(train_step, model, optimizer)
    if kernels is not None and device.type == "cuda" and not args.eager:
        step = kernels.CapturedStep(train_step, model, optimizer)  # the same step, as a CUDA graph
    depths = len(model.prompt_learner.text_prompts) + 1, len(model.prompt_learner.vision_prompts)
    print(f"learning {sum(p.numel() for p in learned):,} parameters (prompts in %d text and %d "
          "image blocks)" % depths)
    start_epoch = data.restore_checkpoint(saved, model, optimizer, train_loader.generator)
    if saved and gpa is not None:  # GPA's running average, as it was after the saved epoch
        torch._foreach_copy_(gpa.averages, saved["extra"]["averages"])
        gpa.weight_seen = saved["extra"]["weight_seen"]

    for epoch in data.epoch_bar(args, start_epoch):
        lr.fill_(learning_rate(epoch, args))  # Dassl steps the scheduler once per epoch
        steps, seen, started = [], 0, time.time()  # each step's (loss terms, number correct)
        for batch in train_loader:
            steps.append(step(*(t.to(device, non_blocking=True) for t in batch)))
            seen += len(batch[1])
        fit = data.epoch_fit(steps, seen, epoch, learning_rate(epoch, args), started)
        extra = None
        if gpa is not None:  # GPA: fold in this epoch's prompts; after the last, they are the model
            gpa.update(epoch + 1, learned)
            if epoch + 1 == args.epochs:
                gpa.copy_to(learned)
            extra = {"averages": [a.cpu() for a in gpa.averages], "weight_seen": gpa.weight_seen}
        data.save_checkpoint(out / "checkpoint.pt", args, epoch + 1, model, optimizer,
                             train_loader.generator, fit, extra)

    return data.finish_run(out, evaluate_run(model, task, args), args, start_time)


def build(backbone, classnames, args, device):
    """The model for these classes, with the frozen text features textual diversity pulls towards
    (PromptSRC), and its optimiser (what main trains; kernels/bench_steps.py too)."""
    model = PromptedCLIP(backbone.model, backbone.tokenize, classnames, args).to(device)
    if not args.ivlp:
        model.set_frozen_text_features(classnames, frozen_templates(args.dataset))
    return model, sgd([p for p in model.parameters() if p.requires_grad], args, device)


def load_classifier(run_dir, classnames=None, device=None):
    """A finished run as a callable (data.RunClassifier): images -> probabilities [N, C] over
    .classnames, with the GPA prompts the run ended with, as its evaluation."""
    run = data.load_run(run_dir, device)
    model = PromptedCLIP(run.backbone.model, run.backbone.tokenize, run.classnames, run.args)

    def text_features(names):
        model.prompt_learner.set_classes(names)
        return model.class_text_features()
    return data.RunClassifier(model.to(run.device), run, text_features, classnames)


def evaluate_run(model, task, args) -> dict:
    """Accuracy of the learned prompts and of zero-shot CLIP on the protocol's test sets
    (data.evaluation_sets), on every test image; prints the table, returns the record."""
    splits = data.evaluation_sets(task, args.protocol)
    ours, backbone = "IVLP" if args.ivlp else "PromptSRC", task.backbone
    rows, test_loss = {"zero-shot CLIP": {}, ours: {}}, {}
    for split, (items, names, source) in splits.items():
        loader = data.split_loader((items, names, source), backbone, args)
        model.prompt_learner.set_classes(names)
        metrics = data.evaluate(model, loader)
        rows[ours][split], test_loss[split] = metrics["acc"], metrics["loss"]
        rows["zero-shot CLIP"][split] = data.zero_shot_accuracy(backbone, names, source.template,
                                                                loader)
    model.prompt_learner.set_classes(task.train_names)
    return data.result_record(method_name(args), args, task, rows, ours, splits, test_loss)


if __name__ == "__main__":
    data.run_script(main, parse_args)  # a UsageError: one line, exit status 2
