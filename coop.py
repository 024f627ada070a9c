"""CoOp and CoCoOp: learning the context words of CLIP's prompts, in one file.

CoOp   Zhou et al. "Learning to Prompt for Vision-Language Models." IJCV 2022.
CoCoOp Zhou et al. "Conditional Prompt Learning for Vision-Language Models." CVPR 2022.

CLIP classifies an image by the cosine between its feature and the text feature of one prompt per
class ("a photo of a {class}."). CoOp freezes both encoders and learns the context words as M
continuous vectors, [SOS][v_1]..[v_M][CLASS][.][EOS], with cross-entropy on a few labelled images of
the base classes. CoCoOp adds a small meta-net that maps each image feature to one shift added to
every context vector, so the prompt depends on the image; it transfers better to classes never
trained on, at the price of one text pass per (image, class) pair.

  python coop.py                                    # offline world (shapes, tiny CLIP), CoOp
  python coop.py --conditional                      # offline world, CoCoOp
  python coop.py --dataset caltech101 --root ~/data # paper setting: ViT-B/16 openai, 16 shots
  python coop.py --resume RUN_DIR                   # continue a killed run
  python coop.py --evaluate RUN_DIR                 # re-evaluate a finished run
  python coop.py --protocol all --shots 4           # few-shot on all classes (CoOp's main table)
  python coop.py --protocol cross --dataset imagenet --root ~/data  # cross-dataset transfer
  python coop.py --evaluate RUN_DIR --eval-datasets dtd,eurosat     # a saved run on other datasets

Protocols (--protocol; data.evaluation_sets): base2new (default, CoCoOp's: train on the base half,
test base and new, each in its own label space, and their HM), all (CoOp's few-shot: every class),
cross (as all, then other datasets, each in its own label space).

Differs from the official code (KaiyangZhou/CoOp) in:
- open_clip instead of OpenAI's clip package (QuickGELU forced for the `openai` weights, as theirs).
- fp32 learned tensors (context and meta-net) with bf16 autocast on CUDA, where the official code
  runs everything in fp16; bf16 is coarser than fp16 per value, but needs no loss scaling.
- the text transformer runs only up to the longest prompt's end-of-text token (exact, see
  TextEncoder); frozen image features are computed once where no random augmentation applies
  (the offline world), and once per evaluation split.
- the context length M of --ctx-init counts BPE tokens ("itap of a" is 4 tokens); the official
  code counts words (3 there) and so mis-sizes the context for such words.
- CoCoOp is batched over images (one text pass for a chunk of images), not a loop per image.
- --csc with --ctx-init starts every class from the words (the official code drops --csc).
- on CUDA the step is replayed as a CUDA graph (kernels.CapturedStep, when kernels/ is beside this
  file); the lr is a tensor filled in place each epoch, SGD the fused implementation (same update).
- training images are decoded once; their random crops and flips are tensor ops on the step's
  device (data.train_batches: torchvision's distribution, other draws). A checkpoint each epoch.

Reading map: PromptLearner (the learned context), PromptedCLIP (the logits), train_step (the
objective), then main (the recipe); data.py holds the run machinery, kernels/ the captured step.
"""
import argparse
import functools
import math
import time
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

import data

try:  # kernels/ beside this file: the captured CUDA-graph step; without it the eager step runs
    import kernels
except ImportError:
    kernels = None

PROMPTS_PER_PASS = 4096  # CoCoOp: at most this many (image, class) prompts in one text pass


# --------------------------------------------------------------------------------------- the method
class PromptLearner(nn.Module):
    """The learned context V ([M, d], or [C, M, d] with --csc) and, for CoCoOp, the meta-net.
    Returns the prompt embeddings [SOS][V][CLASS][.][EOS][pad] for the current class names."""

    def __init__(self, clip, tokenize, classnames, args):
        super().__init__()
        self.tokenize, self.token_embedding = tokenize, clip.token_embedding
        self.position, self.truncate = args.class_token_position, not args.no_truncate
        device, n_cls = clip.token_embedding.weight.device, len(classnames)
        ctx_dim = clip.ln_final.weight.shape[0]  # text width d (512 for ViT-B/16)
        context_length = tokenize(["x"]).shape[1]  # L: 77 for OpenAI CLIP
        if args.ctx_init:
            ids = tokenize([args.ctx_init]).to(device)  # [1, L]; cut to L by the tokenizer
            self.n_ctx = int(ids.argmax(-1)) - 1  # BPE tokens: 4 for "a photo of a"
            data.require(self.n_ctx + 2 < context_length, f"--ctx-init {args.ctx_init!r} does not "
                         f"fit the text context of {context_length} tokens with a class name")
            with torch.no_grad():
                ctx_vectors = self.token_embedding(ids)[0, 1:1 + self.n_ctx].float()  # [M, d]
            if args.csc:  # every class starts from the words: [C, M, d]
                ctx_vectors = ctx_vectors.repeat(n_cls, 1, 1)
            self.prefix_words = args.ctx_init
        else:
            self.n_ctx = args.n_ctx
            data.require(self.n_ctx + 3 < context_length, f"--n-ctx {self.n_ctx} does not fit the "
                         f"text context of {context_length} tokens with a class name: use fewer")
            shape = (n_cls, self.n_ctx, ctx_dim) if args.csc else (self.n_ctx, ctx_dim)
            ctx_vectors = torch.empty(shape, device=device)
            nn.init.normal_(ctx_vectors, std=0.02)
            self.prefix_words = " ".join(["X"] * self.n_ctx)  # placeholders that V replaces
        self.ctx = nn.Parameter(ctx_vectors)  # fp32 master copy, whatever the backbone's precision
        self.meta_net = None
        if args.conditional:  # CoCoOp's h_theta: Linear(D, D/16) - ReLU - Linear(D/16, d)
            vis_dim = clip.text_projection.shape[1]  # image and text features share the dimension D
            self.meta_net = nn.Sequential(OrderedDict(  # the official layer names
                linear1=nn.Linear(vis_dim, vis_dim // 16), relu=nn.ReLU(inplace=True),
                linear2=nn.Linear(vis_dim // 16, ctx_dim))).to(device)
        self.set_classes(classnames)

    def set_classes(self, classnames):
        """Build the frozen parts of the prompts of these classes (base to train, new to test)."""
        names = [c.replace("_", " ") for c in classnames]
        device = self.token_embedding.weight.device
        ids = self.tokenize([f"{self.prefix_words} {name}." for name in names]).to(device)  # [C, L]
        eot = ids.argmax(-1)  # [C]: EOT has the largest token id
        too_long = [name for name, e in zip(names, eot.tolist()) if e >= ids.shape[1] - 1]  # cut
        data.require(not too_long, f"the prompt '{self.prefix_words} <class>.' does not fit the "
                     f"text context of {ids.shape[1]} tokens for {len(too_long)} classes (e.g. "
                     f"{(too_long or [''])[0]!r}): use a shorter --ctx-init or fewer --n-ctx")
        # Truncation: positions after the longest prompt's EOT never reach a feature (causal mask).
        length = int(eot.max()) + 1 if self.truncate else ids.shape[1]
        ids = ids[:, :length]
        with torch.no_grad():
            emb = self.token_embedding(ids).float()  # [C, n, d]
        self.register_buffer("token_prefix", emb[:, :1], persistent=False)  # SOS [C, 1, d]
        self.register_buffer("token_suffix", emb[:, 1 + self.n_ctx:], persistent=False)  # CLASS.EOS
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
        """shift: [B, d] meta-net output (CoCoOp) or None. Returns prompts [C, n, d] or
        [B, C, n, d], and eot [C]."""
        n_cls = len(self.eot)
        ctx = self.ctx if self.ctx.dim() == 3 else self.ctx.expand(n_cls, -1, -1)  # [C, M, d]
        prefix, suffix = self.token_prefix, self.token_suffix
        if shift is not None:  # CoCoOp: v_m(x) = v_m + pi(x), one shift for every context token
            ctx = ctx + shift[:, None, None, :]  # [B, C, M, d]
            prefix, suffix = (t.expand(len(shift), -1, -1, -1) for t in (prefix, suffix))
        prompts = torch.cat([prefix, ctx, suffix], dim=-2)  # [(B,) C, n, d], 'end' layout
        if self.position != "end":
            prompts = prompts[..., torch.arange(n_cls, device=ctx.device)[:, None], self.order, :]
        return prompts, self.eot


class PromptedCLIP(nn.Module):
    """Frozen CLIP + learned prompts: logits = s cos(f(x), g(t_c)), s CLIP's exp(logit_scale)."""

    def __init__(self, clip, tokenize, classnames, args):
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self.prompt_learner = PromptLearner(clip, tokenize, classnames, args)
        self.text_encoder = TextEncoder(clip)

    @torch.no_grad()
    # [B, 3, H, W] -> L2-normalised [B, D]; frozen in CoOp and CoCoOp
    def encode_image(self, images):
        return F.normalize(self.clip.encode_image(images).float(), dim=-1)

    def class_text_features(self):
        """[C, D] normalised class prompt features, computed once per evaluation; None when the
        prompts depend on the image (CoCoOp)."""
        if self.prompt_learner.meta_net is not None:
            return None
        prompts, eot = self.prompt_learner()
        return F.normalize(self.text_encoder(prompts, eot).float(), dim=-1)

    def forward(self, x, text_features=None):
        """x: images [B, 3, H, W], or their precomputed features [B, D] (frozen tower)"""
        image_features = x if x.dim() == 2 else self.encode_image(x)  # [B, D]
        scale = self.clip.logit_scale.exp()
        if self.prompt_learner.meta_net is None:  # CoOp: one prompt per class, shared by all images
            text_features = self.class_text_features() if text_features is None else text_features
            return scale * image_features @ text_features.t()  # [B, C]
        logits, n_cls = [], len(self.prompt_learner.eot)
        for chunk in image_features.split(max(1, PROMPTS_PER_PASS // n_cls)):  # CoCoOp: C per image
            prompts, eot = self.prompt_learner(self.prompt_learner.meta_net(chunk))  # [b, C, n, d]
            text_features = self.text_encoder(prompts.flatten(0, 1), eot.repeat(len(chunk)))
            text_features = F.normalize(text_features.float(), dim=-1).view(len(chunk), n_cls, -1)
            logits.append(scale * torch.einsum("bd,bcd->bc", chunk, text_features))
        return torch.cat(logits)  # [B, C]


def train_step(model, optimizer, x, y):
    """One SGD step on a batch already on the device. Returns the loss and its terms (CE alone here)
    and the number correct, as tensors, so that nothing waits for the device here."""
    with data.autocast(x.device):
        logits = model(x)  # [B, C]
    loss = F.cross_entropy(logits.float(), y)  # CE over the base classes: CoOp's whole objective
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach(), "ce": loss.detach()}, (logits.argmax(-1) == y).sum()


def sgd(learned, args, device):
    """Dassl's SGD, its lr a tensor the schedule fills in place, so that a captured step reads each
    epoch's value (fused SGD on the GPU; float64 on the CPU: a Python float's update, exactly)."""
    dtype = torch.float64 if device.type == "cpu" else torch.float32
    return torch.optim.SGD(learned, lr=torch.tensor(args.lr, dtype=dtype, device=device),
                           momentum=args.momentum, weight_decay=args.weight_decay,
                           fused=device.type == "cuda")


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
def coop_epochs(shots):  # CoOp's epochs follow the shot count (scripts/coop/main.sh)
    return 50 if shots <= 1 else 100 if shots <= 4 else 200


# Paper defaults, then per-dataset exceptions; a flag on the command line wins over both. The
# official configs use the same settings in every protocol (cross-dataset: ImageNet, 16 shots).
PAPER = {"coop": dict(batch_size=32), "cocoop": dict(batch_size=1, epochs=10)}
DATASET_SETTINGS = {
    "imagenet": {"coop": dict(epochs=50)},  # CoOp's *_ep50 configs, for every shot count
    # The offline world (every 'shapes...' benchmark) runs the paper settings as they are: with
    # the tiny CLIP and cached image features, CoOp's 200 epochs take ~1 min on 2 CPU cores.
    "shapes": {},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--conditional", action="store_true",
      help="CoCoOp: the meta-net shifts the context per image (official: --trainer CoCoOp)")
    a("--n-ctx", type=int, default=4, help="context tokens M when --ctx-init is empty (paper: 4)")
    a("--ctx-init", default="a photo of a", help="words that initialise the context (M = their BPE "
      "token count); '' = random N(0, 0.02^2) (CoCoOp paper: a photo of a)")
    a("--csc", action="store_true", help="CoOp: class-specific context, one per class (paper: off)")
    a("--class-token-position", default="end", choices=["end", "middle", "front"],
      help="CoOp: where the class name sits (paper: end)")
    a("--lr", type=float, default=0.002, help="SGD lr after warm-up, then cosine (paper: 0.002)")
    a("--momentum", type=float, default=0.9, help="SGD momentum (Dassl default: 0.9)")
    a("--weight-decay", type=float, default=5e-4, help="SGD weight decay (Dassl default: 5e-4)")
    a("--warmup-epochs", type=int, default=1, help="constant warm-up epochs before the cosine (1)")
    a("--warmup-lr", type=float, default=1e-5, help="learning rate during warm-up (paper: 1e-5)")
    a("--no-truncate", action="store_true",
      help="run the text transformer over all positions (slower, same result; as the official)")
    data.add_run_flags(p, epochs_help="default: CoOp 50/100/200 for 1/2-4/8-16 shots (ImageNet "
                       "50), CoCoOp 10",
                       batch_help="default: CoOp 32, CoCoOp 1, the paper values")
    return p.parse_args(argv)


def method_name(args):
    return "cocoop" if args.conditional else "coop"


def resolve_settings(args):
    """Fill the settings left at None (command line > DATASET_SETTINGS > paper), then check them."""
    method = method_name(args)
    paper = dict(PAPER[method], epochs=PAPER[method].get("epochs", coop_epochs(args.shots)))
    dataset = "shapes" if args.dataset.startswith(data.WORLD_PREFIX) else args.dataset
    for key, value in {**paper, **DATASET_SETTINGS.get(dataset, {}).get(method, {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    data.resolve_run_args(args)
    check_settings(args)
    return args


def check_settings(args):
    """Refuse, before anything is written, a setting that would run and give wrong numbers (a
    data.UsageError: one line that names the value). The prompt's length is checked where it is
    tokenized (PromptLearner)."""
    data.check_run_args(args)
    data.check_sgd_args(args)
    data.require(args.ctx_init.strip() or args.n_ctx >= 1,
                 f"--n-ctx {args.n_ctx} with an empty --ctx-init: the prompt needs a context token")
    data.require(not (args.csc and args.conditional),
                 "--csc is CoOp's class-specific context; CoCoOp (--conditional) has a shared one")
    data.require(not (args.csc and data.eval_datasets(args)),
                 "--csc learns one context per training class: other datasets have no prompt")


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
    data.print_start(args, method_name(args), device, out)
    data.seed_everything(args.seed)  # few-shot sampling, context init, shuffling

    # Data and model: the base half of the classes for base2new, every class otherwise.
    task = data.load_task(args, device)
    model, optimizer = build(task.backbone, task.train_names, args, device)
    if args.evaluate:
        data.load_learned(model, saved["learned"])
        return data.finish_run(out, evaluate_run(model, task, args, device), args, start_time)
    data.make_run_folder(out, args, saved)
    train_items = data.training_items(task, args, cache=out / "fewshot.json")
    # (images or, where no augmentation applies, their frozen features computed once, labels)
    train_loader = data.training_batches(task, train_items, args, device, model.encode_image,
                                         images=False)

    # The step: SGD on the context (and CoCoOp's meta-net); the schedule fills its lr tensor.
    lr = optimizer.param_groups[0]["lr"]
    step = functools.partial(train_step, model, optimizer)
    if kernels is not None and device.type == "cuda" and not args.eager:
        step = kernels.CapturedStep(train_step, model, optimizer)  # replayed as a CUDA graph
    learned = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"learning {learned:,} parameters on {len(train_items)} {task.train_classes} images")
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
    """A finished run as a callable: images (PIL, paths or a batch) -> probabilities [N, C] over
    .classnames, the run's training classes unless other names are given (data.RunClassifier)."""
    run = data.load_run(run_dir, device)
    model, _ = build(run.backbone, run.classnames, run.args, run.device)

    def text_features(names):  # the learned prompts of these names, as the evaluation builds them
        data.require(not run.args.csc or names == run.classnames, "a --csc run has a context for "
                     "each of its training classes only, in their order: predict among those")
        model.prompt_learner.set_classes(names)
        return model.class_text_features()
    return data.RunClassifier(model, run, text_features, classnames)


def evaluate_run(model, task, args, device) -> dict:
    """Accuracy of the learned prompts and of zero-shot CLIP on the protocol's test sets
    (data.evaluation_sets), on image features computed once per split; prints the table, returns the
    record."""
    splits = data.evaluation_sets(task, args.protocol)
    ours = "CoCoOp" if args.conditional else "CoOp"
    rows, test_loss = {"zero-shot CLIP": {}, ours: {}}, {}
    for split, (items, names, source) in splits.items():
        if args.csc and names != task.train_names:
            print(f"--csc: the learned contexts belong to the training classes; none for {split}")
            continue
        backbone = task.backbone  # image features computed once per split, for both rows
        batches = data.feature_batches(splits[split], backbone, args, device, model.encode_image)
        model.prompt_learner.set_classes(names)
        metrics = data.evaluate(model, batches)
        rows[ours][split], test_loss[split] = metrics["acc"], metrics["loss"]
        rows["zero-shot CLIP"][split] = data.zero_shot_accuracy(backbone, names, source.template,
                                                                batches)
    model.prompt_learner.set_classes(task.train_names)
    return data.result_record(method_name(args), args, task, rows, ours, splits, test_loss)


if __name__ == "__main__":
    data.run_script(main, parse_args)  # a UsageError: one line, exit status 2
