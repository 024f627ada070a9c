"""nanoprompt/data.py - everything that is not a method.

The one module shared by coop.py, promptsrc.py, vprompt.py and proreg.py. It never branches on a
method. Sections, top to bottom:

  1. types: Item, Benchmark, Backbone
  2. small utilities (the UsageError type and setting checks, atomic writes, checkpoints, harmonic mean)
  3. backbones: open_clip models by name + pretrained tag (QuickGELU for OpenAI weights) or a local file
  4. class names and prompt templates as CoOp uses them
  5. the real datasets of the CoOp protocol (CoOp folder layouts, split_zhou_*.json, torchvision
     downloads where they work) and the ImageNet variants for domain generalisation; 5b. ProReg's
     benchmarks in their release layouts: DomainNet, PACS, OfficeHome, ImageNet-LT
  6. few-shot sampling, base/new split, transforms, loaders
  7. results: one JSON line per run, and `python data.py table [RUNS_DIR]` (default runs/) for the
     mean +- std table
  8. runs: what every method file does the same way (common flags and their checks, the run
     folder, checkpoints, the protocols' test sets, evaluation, the zero-shot row, results)
  9. prediction: a finished run as a classifier (load_run, RunClassifier, `--predict RUN_DIR IMAGE...`)

The built-in offline world (the 'shapes...' datasets and the 'tiny' backbone) lives in world/ beside
this file; load_dataset and load_backbone import it only when asked for it, so this file and a
method file run on real data without that folder.

API CONTRACT (used by the method files; keep these names and meanings):

  Item = (source, label, classname)      # source: a file path (str) or an int index (world)
  Benchmark(name, classnames, train, val, test, template, shifts, open_image, augment)
      classnames[label] is the name of label; train/val/test are lists of Item.
      shifts: {domain_name: list[Item]} extra test sets that share this benchmark's class names
              (world: other rendering styles; imagenet: the variants found on disk).
      open_image(source) -> PIL.Image in RGB.
      augment: True when the paper's random training augmentation applies (real datasets);
               False for the world (small rendered shapes: a random crop would cut the shape away).
      groups: {name: list[Item]} subsets of the test set scored in the whole label space (ImageNet-LT's
              many / medium / few-shot classes); mean_of: shifted sets averaged into a "mean" column.
  load_dataset(name, root, download=False, train_domain=None, test_domain=None, split_file=None)
      -> Benchmark (the domains: PACS's held-out domain, OfficeHome's pair; section 5b; the world's
      shapes_domains: the training style)
      name: a benchmark, or a folder of class folders (a name with '/': load_folder(path, split_file);
      Benchmark.folder is then its path; the run keeps its split as FOLDER_SPLIT, its class names and
      template as RUN_CLASSES); is_folder(name), dataset_name(name) (a folder's own name)
  fewshot(items, shots, seed, cache=None) -> list[Item]
  subsample_classes(items, classnames, which) -> (items relabelled from 0, classnames)
  shift_items(items, classnames) -> items of a shifted test set restricted to `classnames`, relabelled
  own_classes(items, classnames) -> (items relabelled from 0, classnames): a shifted test set in its own
      label space, the classes it holds (all of them for the world and ImageNet-V2/-Sketch, 200 for A/R)
  transfer_targets(name) -> the datasets the cross-dataset protocol evaluates after training on `name`
  Backbone(model, tokenize, name, pretrained, image_size, mean, std)
  load_backbone(model, pretrained, device) -> Backbone
  default_backbone(dataset) -> (model, pretrained)   # ('tiny', 'shapes') for the world
  WORLD_PREFIX = "shapes"                # a dataset name starting with it is the offline world's
  RandAugmentPort(n, m): RandAugment as ProReg's official port behaves (RANDAUGMENT_OPS)
  make_loader(items, benchmark, backbone, train, batch_size, seed, workers) -> DataLoader of
      (images [B, 3, H, W] float normalised, labels [B] long) on the CPU, decoded in every pass
  train_batches(items, benchmark, backbone, batch_size, seed, workers, device, memory_limit=4 GiB)
      -> the training batches, (images, labels) as make_loader's with train=True but on `device`;
      len() and .generator (CPU; its state after an epoch fixes the later epochs: checkpoint it).
      With benchmark.augment the images are decoded once and kept on `device` as uint8 (up to
      memory_limit bytes, else make_loader's path), and cropped, resized, flipped there.
  harmonic_mean(base, new); atomic_save(obj, path); atomic_write_text(text, path);
  load_checkpoint(path) -> dict (CPU, weights_only); append_result(path, record)

  UsageError(ValueError): the user's mistake (a setting, a file, a folder), with a message naming the
      value or file and what to do. Sections 1-5 and 7 raise it (or a subclass) for bad input;
      a method file ends with
          try: main(parse_args())
          except data.UsageError as err: print(f"error: {err}", file=sys.stderr); sys.exit(2)
      Subclasses: MissingFileError (also a FileNotFoundError: a dataset folder, list, checkpoint or
      weights file that is not there), WriteError (also an OSError: a write that failed, e.g. a
      full disk; the previous file is unchanged). Anything else is a bug and keeps its traceback.
  require(condition, message); check_int(name, value, minimum);
  check_float(name, value, minimum=None, above=None, below=None): setting checks that raise
      UsageError, e.g. check_float("--lr", args.lr, above=0) -> "--lr must be a finite number > 0, got nan"

Runs (section 8; a method file's main calls these, see the example at the section's head):
  add_run_flags(parser, ...); resolve_run_args(args); check_run_args(args, min_epochs, min_shots);
  check_warmup(name, value, epochs); check_sgd_args(args); eval_datasets(args); run_device(name)
  start_run(args, method, resolve, check) -> (args, saved checkpoint or None, run folder, device)
  print_start(args, method, device, out, **more); run_script(main, parse_args) (a UsageError: one line)
  make_run_folder(out, args, saved); seed_everything(seed)
  load_task(args, device) -> Task(benchmark, targets, backbone, train_classes, train_names)
  training_items(task, args, cache); evaluation_sets(task, protocol); split_loader(split, backbone, args)
  training_batches(task, items, args, device, frozen=None, images=True): the training batches (world:
  frozen features computed once); feature_batches(split, backbone, args, device, frozen): a test split's
  (features, labels) batches; zero_shot_accuracy(backbone, classnames, template, batches)
  save_checkpoint(path, args, epoch, model, optimizer, generator, train, extra);
  restore_checkpoint(saved, model, optimizer, generator) -> epochs done; load_learned(model, learned)
  epoch_bar(args, start); epoch_fit(steps, seen, epoch, lr) -> {loss, terms, acc} (stops on NaN)
  setup_distributed() -> (rank, world size); share_run(out, device, world_size, args);
  distributed(model, device, world_size); end_distributed(world_size)
  reset_peak_memory(device); peak_memory(device)
  epoch_batches(n, batch_size, seed, epoch, rank, world_size); SeededItems; IndexedBatches (a whole
  split in global batches, DDP-split); normalised_encoder(visual); FixedHead(text_features, scale)
  AdamWHF (transformers' AdamW); set_lr; warmup_linear; trainable_encoder;
  validation_loader(task, args); keep_best(out, model, acc, at, best); select_model(model, out, best)
  autocast(device); evaluate(model, loader); encode_images(encode, loader, device); ZeroShotCLIP
  print_results(title, rows, columns); result_record(method, args, task, rows, ours, splits,
  test_loss, **more); finish_run(out, record, args, start_time)
  PROTOCOLS {protocol: training classes}; LOCAL_SETTINGS (may change on --resume/--evaluate)

Prediction (section 9): load_run(run_dir, device) -> Run(folder, args, learned, backbone, classnames,
  template, device); RunClassifier(model, run, text_features, classnames) -> callable, images (PIL,
  paths or a transformed batch) -> probabilities [N, C] over .classnames (settable); a method file's
  load_classifier(run_dir, classnames=None, device=None) returns one; predict(args, load_classifier)
  is --predict; read_classes(--classes); image_files(paths); check_prompts(backbone, names, template).

Also public: CUSTOM_TEMPLATES[dataset], IMAGENET_TEMPLATES (OpenAI's 80), CLIP_MEAN/CLIP_STD,
DATASETS (the registry of real datasets), make_transform(backbone, train), read_results(dir),
results_table(records), log_curve(run_dir, key), plot_logs(run_dirs, key) (`python data.py plot`),
TRAIN_MEMORY_LIMIT (train_batches' default, bytes), CROP_SCALE/CROP_RATIO (the training crop's ranges).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import numbers
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Union

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from tqdm import tqdm

# ==================================================================================================
# 1. Types
# ==================================================================================================


class Item(NamedTuple):
    source: Union[str, int]  # image path, or an index into the world's renderer
    label: int
    classname: str


@dataclass
class Benchmark:
    """A dataset as the method files see it (see the API contract at the top)."""
    name: str
    classnames: list
    train: list
    val: list
    test: list
    template: str
    shifts: dict = field(default_factory=dict)
    open_image: Callable = None
    augment: bool = True
    groups: dict = field(default_factory=dict)  # {name: test items of a group of classes}, full label space
    mean_of: tuple = ()  # shifted sets whose mean accuracy is reported as column "mean"
    folder: Optional[str] = None  # a folder dataset's folder (--dataset PATH), else None


@dataclass
class Backbone:
    model: torch.nn.Module      # open_clip CLIP, eval mode, every parameter frozen
    tokenize: Callable          # list[str] -> LongTensor [n, context_length] (the model's own)
    name: str
    pretrained: Optional[str]
    image_size: int
    mean: tuple
    std: tuple


# ==================================================================================================
# 2. Small utilities
# ==================================================================================================


def harmonic_mean(base: float, new: float) -> float:
    """HM = 2BN / (B + N), the base-to-new summary number (0 when both are 0)."""
    return 2 * base * new / (base + new) if base + new > 0 else 0.0


class UsageError(ValueError):
    """A mistake in what the user gave (a setting, a file, a folder), with a message that names the
    value or file and says what to do. The method files catch it in `__main__` and print
    `error: <message>` (exit code 2) instead of a traceback; everything else is a bug and keeps its
    traceback."""

    def __init__(self, message: str = ""):
        # A DataLoader worker's error comes back re-made from its formatted traceback ("Caught
        # UsageError in DataLoader worker process 0.\nOriginal Traceback ... data.UsageError: <msg>"):
        # keep <msg>, the part the user needs.
        if message.startswith("Caught ") and "\nOriginal Traceback" in message:
            ends = list(re.finditer(rf"^(?:[\w.]*\.)?{type(self).__name__}: ", message, re.M))
            message = message[ends[-1].end():].rstrip("\n") if ends else message
        super().__init__(message)


class MissingFileError(UsageError, FileNotFoundError):
    """A dataset folder, image list, checkpoint or weights file that is not there (also a
    FileNotFoundError)."""


class WriteError(UsageError, OSError):
    """A file could not be written (full disk, no permission); an existing file is left unchanged."""


def require(condition: bool, message: str) -> None:
    """Raise UsageError(message) unless `condition`: a one-line check for the method files."""
    if not condition:
        raise UsageError(message)


def check_int(name: str, value, minimum: int) -> None:
    """`value` (the setting called `name`, e.g. '--epochs') is an integer >= minimum."""
    require(isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum,
            f"{name} must be an integer >= {minimum}, got {value!r}")


def check_float(name: str, value, *, minimum=None, above=None, below=None) -> None:
    """`value` is a finite number, >= minimum, > above and < below (each bound when given):
    check_float('--lr', lr, above=0), check_float('--momentum', m, minimum=0, below=1)."""
    bounds = [f"{op} {b}" for op, b in ((">=", minimum), (">", above), ("<", below)) if b is not None]
    wanted = f"{name} must be a finite number" + (" " + " and ".join(bounds) if bounds else "")
    require(isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value),
            f"{wanted}, got {value!r}")
    require((minimum is None or value >= minimum) and (above is None or value > above)
            and (below is None or value < below), f"{wanted}, got {value!r}")


def _reason(err: BaseException, limit: int = 200) -> str:
    """'Type: first sentence' of an exception, on one line (torch's messages run to paragraphs)."""
    text = re.split(r"(?<=\.)\s", " ".join(str(err).split()))[0].rstrip(".")
    text = text if len(text) <= limit else text[:limit] + " ..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _os_error(err: BaseException) -> Optional[OSError]:
    """The OSError behind `err`: torch.save reports a failed write as a RuntimeError whose context
    holds the OSError."""
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    return err


def _atomic_write(path, write: Callable) -> None:
    # Temp file in the same directory, fsync, then os.replace: a reader never sees a half-written
    # file, and a crash or a full disk leaves the old file intact.
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        umask = os.umask(0o022)
        os.umask(umask)  # (read it back: there is no other way to read the mask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's file is private (0600): give it open()'s mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the rename makes them the file
        os.replace(tmp, path)
        tmp = None
    except Exception as err:
        if tmp is not None:
            os.unlink(tmp)
        os_err = _os_error(err)
        if os_err is None:  # not the disk: e.g. an object torch.save cannot pickle, a bug
            raise
        raise WriteError(f"cannot write {path}: {os_err.strerror or os_err}. Nothing was written (an existing "
                         f"file there is unchanged). Free space on that disk, or write somewhere else.") from err
    except BaseException:  # Ctrl-C mid-write: no temp file left behind
        if tmp is not None:
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)  # POSIX: fsync the folder so that the rename survives a power cut
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_save(obj, path) -> None:
    """torch.save(obj, path), atomically. A failed write raises WriteError and changes nothing."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path) -> dict:
    """torch.load(path) of a checkpoint: onto the CPU, tensors and plain Python values only
    (weights_only: a checkpoint cannot run code). A missing, truncated or foreign file raises
    UsageError naming it."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} not found" + (" (it is a folder)" if path.is_dir() else "")
                               + ". Pass the folder of a run that completed at least one epoch (it holds checkpoint.pt).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(f"cannot read checkpoint {path} ({_reason(err)}). The file is truncated "
                         f"(an interrupted save or copy?) or was not written by torch.save of tensors and plain "
                         f"values; copy it again or rerun the training that writes it.") from err


def atomic_write_text(text: str, path) -> None:
    """Write `text` (UTF-8) to `path`, atomically."""
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# ==================================================================================================
# 3. Backbones
# ==================================================================================================

WORLD_PREFIX = "shapes"  # dataset names of the built-in offline world start with this
WORLD_BIASED = "shapes_biased"  # the world's task with a spurious cue in its training split (world/biased.py)
WORLD_DOMAINS = "shapes_domains"  # the world's DomainNet protocol: one style trains, the others test (world/domains.py)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation (every paper's INPUT)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _world(module: str):
    """world.<module>, imported on first use: only the offline world needs the world/ folder."""
    import importlib

    try:
        return importlib.import_module(f"world.{module}")
    except ModuleNotFoundError as err:
        if err.name not in ("world", f"world.{module}"):
            raise
        raise ModuleNotFoundError(f"the offline world ('{WORLD_PREFIX}...' datasets, the 'tiny' model) lives in "
                                  "world/, which is not beside data.py: copy that folder too, or use real data "
                                  "(--dataset caltech101 --model ViT-B-16 ...)", name=err.name) from err


def default_backbone(dataset: str) -> tuple:
    """(model, pretrained) the papers use for `dataset`: ViT-B/16 with OpenAI weights."""
    return ("tiny", "shapes") if dataset.startswith(WORLD_PREFIX) else ("ViT-B-16", "openai")


def _text_tower_problem(cfg: dict) -> Optional[str]:
    """Why a model config's text tower is not the CLIP transformer the method files drive by hand
    (token_embedding -> transformer with causal mask -> ln_final -> EOT = argmax pooling), or None."""
    text = cfg.get("text_cfg", {})
    if cfg.get("custom_text") or "hf_model_name" in text:
        return "its text tower is not open_clip's built-in CLIP text transformer"
    if "hf_tokenizer_name" in text:
        return "it uses a different tokenizer (the end-of-text token is not the argmax)"
    if text.get("no_causal_mask") or text.get("pool_type", "argmax") != "argmax":
        return "its text transformer has no causal mask or does not pool at the end-of-text token"
    return None


def _open_clip_kwargs(model: str, pretrained: Optional[str]) -> dict:
    """Extra create_model arguments. OpenAI weights were trained with QuickGELU, but open_clip 3.3
    builds 'ViT-B-16' with nn.GELU and only warns; the wrong activation lowers zero-shot accuracy.
    The tag's own config says which activation its weights need."""
    if pretrained is None:
        return {}
    import open_clip

    quick = pretrained == "openai" or open_clip.get_pretrained_cfg(model, pretrained).get("quick_gelu", False)
    return {"force_quick_gelu": True} if quick else {}


def load_backbone(model: str, pretrained: Optional[str], device="cpu") -> Backbone:
    """Any open_clip model with the CLIP text transformer, with any pretrained tag open_clip knows, or
    a local weights file (a state_dict saved with torch.save, or .safetensors). pretrained=None gives
    random weights (tests, offline). 'tiny' is the offline world's CLIP. A tag brings its activation
    (QuickGELU for OpenAI weights); a file cannot say, so the model config's applies: name the
    '-quickgelu' model (e.g. ViT-B-16-quickgelu) for a file of OpenAI-trained weights."""
    if model == "tiny":
        return _world("tiny_clip").tiny_backbone(pretrained, device)
    import open_clip

    if model not in open_clip.list_models():
        raise UsageError(f"unknown model {model!r}. open_clip knows: {', '.join(open_clip.list_models())}"
                         " (and 'tiny', the offline world's CLIP)")
    problem = _text_tower_problem(open_clip.get_model_config(model))
    if problem:
        raise UsageError(f"model {model!r} is not supported: {problem}. Use a CLIP model such as "
                         "ViT-B-16, ViT-B-32, ViT-L-14 or RN50.")
    tags = open_clip.list_pretrained_tags_by_model(model)
    is_file = pretrained is not None and pretrained not in tags and os.path.isfile(pretrained)
    if pretrained is not None and pretrained not in tags and not is_file:
        raise UsageError(f"unknown pretrained tag {pretrained!r} for {model!r}, and no file of that name exists. "
                         f"Valid tags: {', '.join(tags) or '(none: use pretrained=None for random weights)'}. "
                         "The path of a local weights file also works (a state_dict saved with torch.save, "
                         "or .safetensors).")
    if pretrained is not None and not is_file:  # fetch first, so that only a failed download reads as one
        try:
            open_clip.download_pretrained(open_clip.get_pretrained_cfg(model, pretrained))
        except Exception as err:
            raise UsageError(f"cannot get the weights {model}/{pretrained} ({_reason(err)}). Without network: copy the "
                             "Hugging Face cache (~/.cache/huggingface) from a machine that downloaded them, or "
                             "pass the path of the weights file as the pretrained value.") from err
    try:
        clip = open_clip.create_model(model, pretrained=pretrained, device=device,
                                      **_open_clip_kwargs(model, pretrained))
    except Exception as err:
        if not is_file:
            raise
        raise UsageError(f"cannot load weights file {pretrained} into {model!r} ({_reason(err)}). It must hold "
                         f"the weights of that model (check --model), saved whole.") from err
    if not isinstance(clip, open_clip.model.CLIP):  # e.g. CoCa: a different text path
        raise UsageError(f"model {model!r} is a {type(clip).__name__}, not an open_clip CLIP")
    clip.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(model)  # context length from the model's config
    pre = getattr(clip.visual, "preprocess_cfg", {})
    size = clip.visual.image_size
    return Backbone(model=clip, tokenize=lambda texts: tokenizer(list(texts)), name=model,
                    pretrained=pretrained, image_size=size if isinstance(size, int) else size[0],
                    mean=tuple(pre.get("mean", CLIP_MEAN)), std=tuple(pre.get("std", CLIP_STD)))


# ==================================================================================================
# 4. Class names and prompt templates (CoOp trainers/zsclip.py, datasets/*.py)
# ==================================================================================================

# One hand-written template per dataset (CoOp's CUSTOM_TEMPLATES): the zero-shot baseline, and the
# text ProReg initialises its head from.
CUSTOM_TEMPLATES = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "food101": "a photo of {}, a type of food.",
    "ucf101": "a photo of a person doing {}.",
    **{name: "a photo of a {}." for name in ("stanford_cars", "sun397", "caltech101", "imagenet",
                                              "imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")},
    # ProReg's benchmarks (section 5b): the official configs' f"{prompt_template} {class}." (PACS "this
    # is"); OfficeHome and ImageNet-LT have no official config and take CLIP's plain prompt
    **{name: "a photo of a {}." for name in ("domain_net", "office_home", "imagenet_lt")},
    "pacs": "this is {}.",
}

# OpenAI's 80 ImageNet prompts (CLIP's prompt-engineering notebook; CoOp imagenet_templates.py).
IMAGENET_TEMPLATES = [
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.",
    "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.",
    "a bright photo of the {}.", "a cropped photo of a {}.", "a plastic {}.",
    "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.",
    "a close-up photo of the {}.", "a photo of a {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.",
    "art of a {}.", "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.",
    "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.",
    "itap of my {}.", "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
]
# The 7 that CoOp's ZeroshotCLIP2 ensembles.

CALTECH_IGNORED = ("BACKGROUND_Google", "Faces_easy")  # clutter class, and a duplicate of Faces
CALTECH_RENAMES = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
EUROSAT_RENAMES = {
    "AnnualCrop": "Annual Crop Land", "Forest": "Forest",
    "HerbaceousVegetation": "Herbaceous Vegetation Land", "Highway": "Highway or Road",
    "Industrial": "Industrial Buildings", "Pasture": "Pasture Land",
    "PermanentCrop": "Permanent Crop Land", "Residential": "Residential Buildings",
    "River": "River", "SeaLake": "Sea or Lake",
}


def sun397_name(category: str) -> str:
    """'/a/apse/indoor' or 'a/apse/indoor' -> 'indoor apse': drop the letter folder, qualifier first."""
    return " ".join(category.strip("/").split("/")[1:][::-1])


def ucf101_name(action: str) -> str:
    """'ApplyEyeMakeup' -> 'Apply_Eye_Makeup' (also the midframes folder name)."""
    return "_".join(re.findall("[A-Z][^A-Z]*", action))


def cars_name(meta_name: str) -> str:
    """'AM General Hummer SUV 2000' -> '2000 AM General Hummer SUV' (year first, as CoOp)."""
    *words, year = meta_name.split(" ")
    return " ".join([year, *words])


# ==================================================================================================
# 5. Real datasets: CoOp layouts, split_zhou JSONs, auto-splits, torchvision downloads
# ==================================================================================================

COOP_DATASETS_MD = "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
AUTO_SPLIT_SEED = 1  # auto-splits are fixed (independent of the run's seed), like CoOp's saved split


def open_rgb(path) -> Image.Image:
    """Open any image file as RGB. Grayscale, CMYK, palette and RGBA images are converted; a corrupt
    or truncated file raises UsageError naming it: a skipped image would change the test set."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # PIL warns when a transparent palette goes straight to RGB
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise UsageError(f"cannot read image {path}: {err}. Replace the file (download it again).") from err


def _listdir(path) -> list:
    """Sorted entries without hidden files: os.listdir order differs between file systems."""
    return sorted(p for p in os.listdir(path) if not p.startswith("."))


def _group_by_label(items: list) -> dict:
    """{label: its items}, labels in order of first appearance, items in their order."""
    groups = defaultdict(list)
    for item in items:
        groups[item.label].append(item)
    return groups


def _shuffle_split(items: list, rng: random.Random, p_train: Optional[float], p_val: float):
    """One class's items -> (train, val, test) with the official rounding: shuffle, round(n*p) for
    train and val, the rest is test. p_train=None (a train+val file): the first round(n*p_val)
    shuffled items are val, the rest train, no test (OxfordPets.split_trainval)."""
    items = list(items)
    rng.shuffle(items)
    n_val = round(len(items) * p_val)
    if p_train is None:
        return items[n_val:], items[:n_val], []
    n_train = round(len(items) * p_train)
    return items[:n_train], items[n_train:n_train + n_val], items[n_train + n_val:]


def _split_by_label(items: list, rng: random.Random, p_train: Optional[float], p_val: float):
    groups = _group_by_label(items)
    train, val, test = [], [], []
    for label in sorted(groups):
        a, b, c = _shuffle_split(groups[label], rng, p_train, p_val)
        train += a; val += b; test += c
    return train, val, test


def _folders_split(ds: Path, image_dir: str, rng, ignored=(), renames=None):
    """CoOp's DTD.read_and_split_data: one folder per class (sorted), 50/20/30 per class."""
    base = ds / image_dir
    classes = [c for c in _listdir(base) if c not in ignored and (base / c).is_dir()]
    items = [Item(str(base / c / f), label, (renames or {}).get(c, c))
             for label, c in enumerate(classes) for f in _listdir(base / c)]
    return _split_by_label(items, rng, 0.5, 0.2)


def _pets_split(ds: Path, image_dir: str, rng):
    def read(txt):  # "Abyssinian_100 1 1 1": image, class id (1-based), species, breed id
        out = []
        for line in (ds / "annotations" / txt).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                name, label = line.split()[:2]
                breed = "_".join(name.split("_")[:-1]).lower()
                out.append(Item(str(ds / image_dir / f"{name}.jpg"), int(label) - 1, breed))
        return out
    train, val, _ = _split_by_label(read("trainval.txt"), rng, None, 0.2)
    return train, val, read("test.txt")


def _loadmat(path: Path):
    try:
        from scipy.io import loadmat
    except ImportError as err:
        raise ImportError(f"reading {path} needs scipy (pip install scipy), or put CoOp's split_zhou "
                          f"JSON next to it ({COOP_DATASETS_MD})") from err
    return loadmat(path)


def _flowers_split(ds: Path, image_dir: str, rng):
    names_file = ds / "cat_to_name.json"
    if names_file.exists():
        names = json.loads(names_file.read_text())  # {"1": "pink primrose", ...}
    else:  # torchvision's download has no cat_to_name.json; its class list holds the same names
        from torchvision.datasets import Flowers102
        names = {str(i + 1): n for i, n in enumerate(Flowers102.classes)}
    labels = _loadmat(ds / "imagelabels.mat")["labels"][0]
    items = [Item(str(ds / image_dir / f"image_{i + 1:05d}.jpg"), int(y) - 1, names[str(int(y))])
             for i, y in enumerate(labels)]
    return _split_by_label(items, rng, 0.5, 0.2)


def _cars_split(ds: Path, image_dir: str, rng):
    meta = _loadmat(ds / "devkit" / "cars_meta.mat")["class_names"][0]

    def read(folder, anno):
        annos = _loadmat(ds / anno)["annotations"][0]
        return [Item(str(ds / folder / a["fname"][0]), int(a["class"][0, 0]) - 1,
                     cars_name(str(meta[int(a["class"][0, 0]) - 1][0]))) for a in annos]
    train, val, _ = _split_by_label(read("cars_train", "devkit/cars_train_annos.mat"), rng, None, 0.2)
    return train, val, read("cars_test", "cars_test_annos_withlabels.mat")


def _aircraft_split(ds: Path, image_dir: str, rng):
    classes = [l.strip() for l in (ds / "variants.txt").read_text().splitlines() if l.strip()]
    label_of = {c: i for i, c in enumerate(classes)}

    def read(txt):  # "1025794 Boeing 707-320": image id, variant name (may contain spaces)
        rows = [l.strip().split(" ", 1) for l in (ds / txt).read_text().splitlines() if l.strip()]
        return [Item(str(ds / image_dir / f"{img}.jpg"), label_of[name], name) for img, name in rows]
    return tuple(read(f"images_variant_{s}.txt") for s in ("train", "val", "test"))


def _sun397_split(ds: Path, image_dir: str, rng):
    classes = [l.strip()[1:] for l in (ds / "ClassName.txt").read_text().splitlines() if l.strip()]
    label_of = {c: i for i, c in enumerate(classes)}  # "a/abbey" -> 0

    def read(txt):  # "/a/abbey/sun_aaalbzqrimafwbiv.jpg"
        out = []
        for line in (ds / txt).read_text().splitlines():
            if line.strip():
                rel = line.strip()[1:]
                cat = os.path.dirname(rel)
                out.append(Item(str(ds / image_dir / rel), label_of[cat], sun397_name(cat)))
        return out
    train, val, _ = _split_by_label(read("Training_01.txt"), rng, None, 0.2)
    return train, val, read("Testing_01.txt")


def _ucf101_split(ds: Path, image_dir: str, rng):
    lists = ds / "ucfTrainTestlist"
    label_of = {}
    for line in (lists / "classInd.txt").read_text().splitlines():  # "1 ApplyEyeMakeup"
        if line.strip():
            idx, action = line.split()
            label_of[action] = int(idx) - 1

    def read(txt):  # "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1": the midframe is a .jpg
        out = []
        for line in (lists / txt).read_text().splitlines():
            if line.strip():
                action, video = line.split()[0].split("/")
                name = ucf101_name(action)
                out.append(Item(str(ds / image_dir / name / video.replace(".avi", ".jpg")), label_of[action], name))
        return out
    train, val, _ = _split_by_label(read("trainlist01.txt"), rng, None, 0.2)
    return train, val, read("testlist01.txt")


def _read_classnames(path: Path) -> dict:
    """classnames.txt: 'n01440764 tench' per line -> {wnid: name}, in file order."""
    names = {}
    for line in path.read_text().splitlines():
        if line.strip():
            wnid, name = line.strip().split(" ", 1)
            names[wnid] = name
    return names


def _imagenet_classnames(ds: Path) -> dict:
    # CoOp asks for a copy of imagenet/classnames.txt in every variant folder; fall back to ImageNet's.
    for path in (ds / "classnames.txt", ds.parent / "imagenet" / "classnames.txt"):
        if path.exists():
            return _read_classnames(path)
    raise MissingFileError(f"{ds / 'classnames.txt'} not found: copy imagenet/classnames.txt there "
                            f"(the 'wnid name' list of CoOp's DATASETS.md: {COOP_DATASETS_MD})")


def _wnid_folders(ds: Path, image_dir: str, names: dict, wnids=None) -> list:
    """Items from <image_dir>/<wnid>/*: labels follow the sorted folder order (or `wnids`' order)."""
    base = ds / image_dir
    wnids = wnids or [w for w in _listdir(base) if (base / w).is_dir()]
    return [Item(str(base / w / f), label, names[w]) for label, w in enumerate(wnids) for f in _listdir(base / w)]


def _imagenet_split(ds: Path, image_dir: str, rng):
    names, base = _imagenet_classnames(ds), ds / image_dir / "train"
    wnids = [w for w in _listdir(base) if (base / w).is_dir()]  # labels: sorted train folders
    test = _wnid_folders(ds, f"{image_dir}/val", names, wnids)
    return _wnid_folders(ds, f"{image_dir}/train", names, wnids), test, test  # val is the test set, as CoOp


def _variant_split(ds: Path, image_dir: str, rng):
    """Test-only ImageNet variants. V2's folders '0'..'999' index classnames.txt's order; the others
    are <wnid>/ folders (A and R: 200 of them), labelled in sorted folder order as CoOp does."""
    names = _imagenet_classnames(ds)
    if image_dir.startswith("imagenetv2"):
        return [], [], [Item(str(ds / image_dir / str(i) / f), i, names[w])
                        for i, w in enumerate(names) for f in _listdir(ds / image_dir / str(i))]
    return [], [], _wnid_folders(ds, image_dir, names)


def _wnid(source: str, wnids: list) -> str:
    folder = Path(source).parent.name
    return wnids[int(folder)] if folder.isdigit() else folder  # ImageNetV2's numbered folders


@dataclass(frozen=True)
class _Spec:
    folder: str                # under root
    image_dir: str             # under folder; split_zhou paths are relative to it
    example: str               # one image under image_dir, to show the layout
    files: tuple               # what else the reader needs when there is no split JSON
    split_json: Optional[str]  # CoOp's split file (None: the protocol has none)
    reader: Callable           # (dataset_dir, image_dir, rng) -> (train, val, test), without the JSON
    source: str
    torchvision: Optional[tuple] = None  # (torchvision class, folder of its download holding the files)

    def layout(self) -> str:
        lines = [f"{self.folder}/", f"  {os.path.join(self.image_dir, self.example)} ...",
                 *(f"  {f}" for f in self.files)]
        if self.split_json:
            lines.append(f"  {self.split_json}  (optional: CoOp's split, for numbers comparable with the papers)")
        return "\n".join(lines)


_VGG = "https://www.robots.ox.ac.uk/~vgg/data/"
_CLASSNAMES = ("classnames.txt  (a copy of imagenet/classnames.txt)",)
DATASETS = {
    "caltech101": _Spec(
        "caltech-101", "101_ObjectCategories", "<class>/image_0001.jpg", (), "split_zhou_Caltech101.json",
        lambda ds, d, rng: _folders_split(ds, d, rng, CALTECH_IGNORED, CALTECH_RENAMES),
        "https://data.caltech.edu/records/mzrjq-6wc02 (101_ObjectCategories)", ("Caltech101", "caltech101")),
    "oxford_pets": _Spec(
        "oxford_pets", "images", "Abyssinian_1.jpg", ("annotations/trainval.txt, test.txt",),
        "split_zhou_OxfordPets.json", _pets_split, _VGG + "pets/ (images.tar.gz, annotations.tar.gz)",
        ("OxfordIIITPet", "oxford-iiit-pet")),
    "stanford_cars": _Spec(
        "stanford_cars", "", "cars_train/00001.jpg",
        ("cars_test/00001.jpg ...", "devkit/cars_meta.mat, cars_train_annos.mat", "cars_test_annos_withlabels.mat"),
        "split_zhou_StanfordCars.json", _cars_split, "https://ai.stanford.edu/~jkrause/cars/car_dataset.html "
        "(links dead: mirrors in CoOp issue #61 and torchvision issue #7545)"),
    "oxford_flowers": _Spec(
        "oxford_flowers", "jpg", "image_00001.jpg", ("imagelabels.mat", "cat_to_name.json"),
        "split_zhou_OxfordFlowers.json", _flowers_split, _VGG + "flowers/102/ (102flowers.tgz, imagelabels.mat)",
        ("Flowers102", "flowers-102")),
    "food101": _Spec(
        "food-101", "images", "<class>/<id>.jpg", ("meta/",), "split_zhou_Food101.json",
        lambda ds, d, rng: _folders_split(ds, d, rng),
        "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/", ("Food101", "food-101")),
    "fgvc_aircraft": _Spec(
        "fgvc_aircraft", "images", "1025794.jpg",
        ("variants.txt", "images_variant_train.txt, images_variant_val.txt, images_variant_test.txt"), None,
        _aircraft_split, _VGG + "fgvc-aircraft/ (fgvc-aircraft-2013b.tar.gz: data/ renamed fgvc_aircraft/)",
        ("FGVCAircraft", "fgvc-aircraft-2013b/data")),
    "sun397": _Spec(
        "sun397", "SUN397", "a/abbey/sun_aaalbzqrimafwbiv.jpg", ("ClassName.txt, Training_01.txt, Testing_01.txt",),
        "split_zhou_SUN397.json", _sun397_split,
        "https://vision.princeton.edu/projects/2010/SUN/ (SUN397.tar.gz, Partitions.zip)"),
    "dtd": _Spec(
        "dtd", "images", "<texture>/<texture>_0001.jpg", ("imdb/", "labels/"), "split_zhou_DescribableTextures.json",
        lambda ds, d, rng: _folders_split(ds, d, rng), _VGG + "dtd/ (dtd-r1.0.1.tar.gz)", ("DTD", "dtd/dtd")),
    "eurosat": _Spec(
        "eurosat", "2750", "AnnualCrop/AnnualCrop_1.jpg", (), "split_zhou_EuroSAT.json",
        lambda ds, d, rng: _folders_split(ds, d, rng, renames=EUROSAT_RENAMES),
        "https://github.com/phelber/eurosat (EuroSAT RGB zip)", ("EuroSAT", "eurosat")),
    "ucf101": _Spec(
        "ucf101", "UCF-101-midframes", "Apply_Eye_Makeup/v_ApplyEyeMakeup_g01_c01.jpg",
        ("ucfTrainTestlist/classInd.txt, trainlist01.txt, testlist01.txt",), "split_zhou_UCF101.json", _ucf101_split,
        "UCF-101-midframes.zip via CoOp's DATASETS.md; ucfTrainTestlist from https://www.crcv.ucf.edu/data/UCF101.php"),
    "imagenet": _Spec(
        "imagenet", "images", "train/n01440764/n01440764_10026.JPEG",
        ("images/val/n01440764/ILSVRC2012_val_00000293.JPEG ...", "classnames.txt  ('n01440764 tench' per line)"),
        None, _imagenet_split, "https://image-net.org/ (ILSVRC2012 train, and val sorted into <wnid>/ folders)"),
    "imagenetv2": _Spec(
        "imagenetv2", "imagenetv2-matched-frequency-format-val", "0/<id>.jpeg (folders 0..999)", _CLASSNAMES, None,
        _variant_split, "https://github.com/modestyachts/ImageNetV2 (matched-frequency)"),
    "imagenet_sketch": _Spec("imagenet-sketch", "images", "n01440764/sketch_0.JPEG", _CLASSNAMES, None,
                             _variant_split, "https://github.com/HaohanWang/ImageNet-Sketch"),
    "imagenet_a": _Spec("imagenet-adversarial", "imagenet-a", "n01498041/<id>.jpg (200 classes)", _CLASSNAMES,
                        None, _variant_split, "https://github.com/hendrycks/natural-adv-examples"),
    "imagenet_r": _Spec("imagenet-rendition", "imagenet-r", "n01443537/<id>.jpg (200 classes)", _CLASSNAMES,
                        None, _variant_split, "https://github.com/hendrycks/imagenet-r"),
}
IMAGENET_VARIANTS = ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r")


def _missing(name: str, root: Path, what: str, download_hint: bool = True) -> MissingFileError:
    spec = DATASETS[name]
    hint = " Or pass download=True (--download): torchvision fetches it." if spec.torchvision and download_hint else ""
    return MissingFileError(
        f"{name}: {what}.\nGet it from {spec.source}; CoOp's instructions and split files: "
        f"{COOP_DATASETS_MD}.{hint}\nExpected layout under {root}:\n{spec.layout()}")


def _read_split_json(path: Path, image_dir: Path):
    """split_zhou JSON: {"train"|"val"|"test": [[relative path, label, classname], ...]}."""
    fix = (f"It should be CoOp's split file, unchanged: download it again ({COOP_DATASETS_MD}), or delete "
           f"it to use the seeded auto-split (numbers then not comparable with the papers').")
    try:
        split = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise UsageError(f"{path} is not a text file (byte {err.start} is not UTF-8). {fix}") from err
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}. {fix}") from err
    try:
        return tuple([Item(str(image_dir / rel), int(label), name) for rel, label, name in split[s]]
                     for s in ("train", "val", "test"))
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(f"{path} is JSON but not a split file ({type(err).__name__}: {err}); expected "
                         f'{{"train"|"val"|"test": [[relative path, label, classname], ...]}}. {fix}') from err


def _download(name: str, root: Path) -> None:
    """torchvision download into <folder>/_torchvision, then its inner folder's files moved up into
    CoOp's layout (the same code then reads downloads and hand-made folders). A failed download
    (no network, a dead link, a bad checksum) removes what it created and raises MissingFileError."""
    spec = DATASETS[name]
    if spec.torchvision is None:
        raise _missing(name, root, "torchvision cannot download it (dead links, video-only, or manual)")
    import torchvision.datasets

    cls, inner = spec.torchvision
    ds, tmp = root / spec.folder, root / spec.folder / "_torchvision"
    created = [p for p in (root, ds) if not p.exists()]  # outermost first: what a failure removes
    try:
        getattr(torchvision.datasets, cls)(str(tmp), download=True)
        for child in (tmp / inner).iterdir():
            if not (ds / child.name).exists():
                shutil.move(str(child), str(ds / child.name))
    except BaseException as err:
        shutil.rmtree(created[0] if created else tmp, ignore_errors=True)  # never a folder that was there
        if not isinstance(err, Exception):  # Ctrl-C: cleaned up, stop as asked
            raise
        raise _missing(name, root, f"the download failed (torchvision.datasets.{cls}: {_reason(err)}); nothing "
                       f"was kept. Without network, download it by hand", download_hint=False) from err
    shutil.rmtree(tmp)  # the archives


def _classnames(name: str, splits) -> list:
    """classnames[label] from the items, checking that labels are 0..n-1 with one name each."""
    names = {}
    for item in (it for split in splits for it in split):
        if names.setdefault(item.label, item.classname) != item.classname:
            raise UsageError(f"{name}: label {item.label} has two names: {names[item.label]!r}, {item.classname!r} "
                             f"(e.g. {item.source}). The split file or image lists were edited or mixed; get "
                             f"them again ({COOP_DATASETS_MD})")
    if sorted(names) != list(range(len(names))):
        raise UsageError(f"{name}: labels are not 0..{len(names) - 1} (found {min(names)}..{max(names)}). The split "
                         f"file or image lists were edited or mixed; get them again ({COOP_DATASETS_MD})")
    return [names[i] for i in range(len(names))]


def _absent(splits) -> list:
    """Listed images that are not on disk, found with one listing per folder (a stat per image is
    slow on network file systems, and ImageNet has 1.3 M of them)."""
    present, absent = {}, []
    for item in (it for split in splits for it in split):
        folder, file = os.path.split(item.source)
        if folder not in present:
            present[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
        if file not in present[folder]:
            absent.append(item.source)
    return absent


def _read_dataset(name: str, root: Path):
    spec = DATASETS[name]
    ds = root / spec.folder
    if not (ds / spec.image_dir).is_dir():
        raise _missing(name, root, f"{ds / spec.image_dir} does not exist")
    json_path = ds / spec.split_json if spec.split_json else None
    if json_path and json_path.exists():
        splits = _read_split_json(json_path, ds / spec.image_dir)
    else:
        if json_path:
            print(f"note: {json_path} not found; using the seeded auto-split rule of CoOp's code. Numbers "
                  f"will not be comparable with the papers' (get the file from {COOP_DATASETS_MD}).", file=sys.stderr)
        try:
            splits = spec.reader(ds, spec.image_dir, random.Random(AUTO_SPLIT_SEED))
        except (FileNotFoundError, KeyError) as err:
            raise _missing(name, root, f"incomplete folder ({err})") from err
    absent = _absent(splits)
    if absent:
        raise _missing(name, root, f"{len(absent)} listed images are missing, e.g. {absent[0]}")
    if not any(splits):
        raise _missing(name, root, f"no images found under {ds}")
    return splits


def load_dataset(name: str, root, download: bool = False, train_domain=None, test_domain=None,
                 split_file=None) -> Benchmark:
    """A benchmark by name: the offline world ('shapes...'), a CoOp dataset or a ProReg benchmark (5b) under
    `root`, or a folder of class folders (a name with a '/': load_folder, with the run's `split_file`).
    train_domain / test_domain: the domains of PACS (test), OfficeHome (both), shapes_domains (train: a style);
    None: defaults."""
    domains = {k: v for k, v in (("--train-domain", train_domain), ("--test-domain", test_domain)) if v}
    require(not domains or name in DOMAIN_DATASETS, f"{' and '.join(domains)} apply to "
            f"{', '.join(DOMAIN_DATASETS)} only, not {name}: leave them out")
    if is_folder(name):
        return load_folder(name, split_file)
    if name in SHIFT_DATASETS:
        return SHIFT_DATASETS[name].load(Path(root).expanduser(), train_domain, test_domain)
    if name == WORLD_BIASED:  # the world's biased-data task (ProReg's benchmark), in a file of its own
        return _world("biased").biased_benchmark(name)
    if name == WORLD_DOMAINS:  # the world's counterpart of DomainNet's protocol (--train-domain: a style)
        return _world("domains").domains_benchmark(train_domain, test_domain)
    if name.startswith(WORLD_PREFIX):
        return _world("shapes").world_benchmark(name)
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}. Known: {', '.join([*DATASETS, *SHIFT_DATASETS])}, the "
                         f"offline world's '{WORLD_PREFIX}...' benchmarks, and a folder of class folders "
                         f"(./{name} in this folder)")
    root = Path(root).expanduser()
    spec = DATASETS[name]
    if download and not (root / spec.folder / spec.image_dir).is_dir():
        _download(name, root)
    train, val, test = _read_dataset(name, root)
    classnames = _classnames(name, (train, val, test))
    shifts = {}
    if name == "imagenet":  # DG test sets found next to it, in ImageNet's label space (by wnid)
        wnids = list(_imagenet_classnames(root / spec.folder))
        label_of = {Path(it.source).parent.name: it.label for it in train}  # ImageNet's <wnid> folders
        for variant in IMAGENET_VARIANTS:
            if (root / DATASETS[variant].folder / DATASETS[variant].image_dir).is_dir():
                items = _read_dataset(variant, root)[2]
                labels = [label_of[_wnid(it.source, wnids)] for it in items]
                shifts[variant] = [Item(it.source, y, classnames[y]) for it, y in zip(items, labels)]
    return Benchmark(name, classnames, train, val, test, CUSTOM_TEMPLATES[name], shifts, open_rgb, augment=True)


# --------------------------------------------------------------------------------------------------
# 5b. ProReg's benchmarks, in the layouts their releases unpack to, read with their published lists.
# The official code (BeierZhu/ProReg) reads them from .arrow files it built from these lists; which list
# trains, validates and tests follows its vilt/datasets/*.py.
def _read_list(path: Path, image_dir: Path, names: Optional[dict] = None, offset: int = 0) -> list:
    """'<relative path> <label>' per line (DomainNet, PACS: 1-based, offset -1; ImageNet-LT) -> Items
    named by `names`[label] or by the path's class folder."""
    items = []
    for line in path.read_text().splitlines():
        if line.strip():
            rel, label = line.rsplit(maxsplit=1)
            folder = rel.split("/")[-2]
            items.append(Item(str(image_dir / rel), int(label) + offset, names[folder] if names else folder))
    return items


def _domain_folders(ds: Path, domain: str) -> list:
    """OfficeHome: every image of <domain>/<Class>/, labelled in sorted class order, lower-case names."""
    classes = [c for c in _listdir(ds / domain) if (ds / domain / c).is_dir()]
    return [Item(str(ds / domain / c / f), label, c.lower()) for label, c in enumerate(classes)
            for f in _listdir(ds / domain / c)]


def _domain_net(ds, train, test):  # vilt/datasets/domain_net_dataset.py
    read = lambda domain, split: _read_list(ds / f"{domain}_{split}.txt", ds)  # noqa: E731
    return read("sketch", "train"), read("sketch", "test"), read("sketch", "test"), \
        {d: read(d, "test") for d in ("clipart", "painting", "real")}, {}


def _pacs(ds, train, test):  # vilt/datasets/pacs_dataset.py: leave one domain out
    lists = ds / "pacs_label" if (ds / "pacs_label").is_dir() else ds
    read = lambda domain, split: _read_list(lists / f"{domain}_{split}_kfold.txt", ds / "kfold", offset=-1)  # noqa
    others = [d for d in SHIFT_DATASETS["pacs"].domains if d != test]
    return ([it for d in others for it in read(d, "train")], [it for d in others for it in read(d, "crossval")],
            read(test, "test"), {}, {})


def _office_home(ds, train, test):  # vilt/datasets/officehome_dataset.py: one domain -> another
    folder = {d: next((f for f in (d.title(), d.title().replace("_", " ")) if (ds / f).is_dir()), d.title())
              for d in (train, test)}
    return _domain_folders(ds, folder[train]), [], _domain_folders(ds, folder[test]), {}, {}


def lt_group(n_train: int) -> str:
    """A class's long-tail group by its training images (Liu et al., CVPR 2019): > 100, 20-100, < 20."""
    return "many" if n_train > 100 else "few" if n_train < 20 else "medium"


def _imagenet_lt(ds, train, test):
    names, images = _imagenet_classnames(ds.parent / "imagenet"), ds.parent / "imagenet" / "images"
    train, val, test = (_read_list(ds / f"ImageNet_LT_{s}.txt", images, names) for s in ("train", "val", "test"))
    counts = defaultdict(int)
    for item in train:
        counts[item.label] += 1
    groups = {g: [it for it in test if lt_group(counts[it.label]) == g] for g in ("many", "medium", "few")}
    return train, val, test, {}, groups


@dataclass(frozen=True)
class _ShiftSpec:
    folder: str
    layout: str
    source: str
    reader: Callable  # (dataset dir, train domain, test domain) -> (train, val, test, shifts, groups)
    domains: tuple = ()
    default: tuple = (None, None)  # (train domain, test domain)
    mean_of: tuple = ()

    def load(self, root: Path, train=None, test=None) -> Benchmark:
        name = next(k for k, v in SHIFT_DATASETS.items() if v is self)
        train, test = train or self.default[0], test or self.default[1]
        for flag, domain in (("--train-domain", train), ("--test-domain", test)):
            require(domain is None or domain in self.domains, f"{flag} {domain!r} is not a domain of {name}: "
                    f"one of {', '.join(self.domains)}")
        require(train is None or train != test, f"--train-domain and --test-domain are both {train}: the "
                "protocol tests on another domain")
        missing = lambda what: MissingFileError(  # noqa: E731
            f"{name}: {what}.\nGet it from {self.source}\nExpected layout under {root}:\n{self.layout}")
        ds = root / self.folder
        if not ds.is_dir():
            raise missing(f"{ds} does not exist")
        try:
            train_items, val, test_items, shifts, groups = self.reader(ds, train, test)
        except (FileNotFoundError, KeyError, ValueError) as err:
            raise missing(f"incomplete folder ({_reason(err)})") from err
        splits = (train_items, val, test_items, *shifts.values())
        absent = _absent(splits)
        if absent or not train_items or not test_items:
            raise missing(f"{len(absent)} listed images are missing, e.g. {absent[0]}" if absent else
                          f"no images found under {ds}")
        return Benchmark(name, _classnames(name, splits), train_items, val, test_items, CUSTOM_TEMPLATES[name],
                         shifts, open_rgb, augment=True, groups=groups, mean_of=self.mean_of)


SHIFT_DATASETS = {
    "domain_net": _ShiftSpec(
        "domain_net", "domain_net/\n  sketch/aircraft_carrier/sketch_001_000001.jpg ... (clipart, painting, real "
        "alike)\n  sketch_train.txt, sketch_test.txt, clipart_test.txt, painting_test.txt, real_test.txt  "
        "('sketch/aircraft_carrier/sketch_001_000001.jpg 0' per line)",
        "http://ai.bu.edu/M3SDA/ (the domains' zips and their _train/_test lists; 345 classes)", _domain_net,
        mean_of=("clipart", "painting", "real")),
    "pacs": _ShiftSpec(
        "pacs", "pacs/\n  kfold/art_painting/dog/pic_001.jpg ... (cartoon, photo, sketch alike)\n  pacs_label/"
        "<domain>_train_kfold.txt, <domain>_crossval_kfold.txt, <domain>_test_kfold.txt for the four domains  "
        "('art_painting/dog/pic_001.jpg 1' per line, labels from 1)",
        "https://domaingeneralization.github.io/ (PACS: kfold/ images and the *_kfold.txt lists)", _pacs,
        domains=("photo", "art_painting", "cartoon", "sketch"), default=(None, "sketch")),
    "office_home": _ShiftSpec(
        "office_home", "office_home/  (OfficeHomeDataset_10072016, renamed)\n  Art/Alarm_Clock/00001.jpg ...\n"
        "  Clipart/, Product/, Real World/ (or Real_World/): the same 65 class folders",
        "https://www.hemanthdv.org/officeHomeDataset.html", _office_home,
        domains=("art", "clipart", "product", "real_world"), default=("art", "clipart")),
    "imagenet_lt": _ShiftSpec(
        "imagenet_lt", "imagenet_lt/ImageNet_LT_train.txt, ImageNet_LT_val.txt, ImageNet_LT_test.txt  ('train/"
        "n01440764/n01440764_190.JPEG 0' per line)\nimagenet/images/train/<wnid>/, imagenet/images/val/<wnid>/, "
        "imagenet/classnames.txt  (the imagenet dataset above)",
        "https://github.com/zhmiao/OpenLongTailRecognition-OLTR (the lists); ImageNet from https://image-net.org/",
        _imagenet_lt),
}
DOMAIN_DATASETS = ("pacs", "office_home", WORLD_DOMAINS)  # the ones --train-domain / --test-domain apply to


# -------------------------------------------------------------------------------- your own folder
# --dataset PATH: a folder of class folders (torchvision's ImageFolder layout), or one with train/,
# test/ (and optionally val/) folders of class folders. A name with a '/' (or starting with '~') is
# a path; any other name is a benchmark's (write ./NAME for a folder in the current directory).
FOLDER_TEMPLATE = "a photo of a {}."  # a folder's hand-written prompt, unless --template says otherwise
FOLDER_SPLIT = "split.json"  # a run on a folder keeps its split here (in the run folder, as split_zhou)


def is_folder(name: str) -> bool:
    """Whether a --dataset value names a folder (has a '/' or starts with '~') rather than a benchmark."""
    return "/" in name or os.sep in name or name.startswith("~")


def dataset_name(name: str) -> str:
    """The name a run and the results table show: a folder's own name, a benchmark's name."""
    return Path(name).name if is_folder(name) else name


def _image_extensions() -> set:
    Image.init()
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def _class_images(base: Path) -> dict:
    """{class folder: its image files, sorted (subfolders included)} of the class folders under `base`.
    Refuses (one line) a file that is not an image, an empty class folder and fewer than two classes."""
    classes = [c for c in _listdir(base) if (base / c).is_dir()]
    require(len(classes) >= 2, f"{base} holds {len(classes)} class folder(s) ({', '.join(classes) or 'none'}): "
            "a classifier needs at least two, one folder of images per class")
    images, extensions = {}, _image_extensions()
    for c in classes:
        files = []
        for top, dirs, names in os.walk(base / c):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            files += [Path(top) / f for f in sorted(names) if not f.startswith(".")]
        bad = [f for f in files if f.suffix.lower() not in extensions]
        require(not bad, f"{bad[0] if bad else ''} is not an image (by its extension): move it out of {base}")
        require(files, f"class folder {base / c} holds no images: add some or remove the folder")
        images[c] = [str(f) for f in files]
    return images


def _folder_names(folder: Path, classes: list) -> list:
    """The class names of the class folders: classnames.txt's ('folder<TAB>name' per line) when the
    folder has one, else the folder names with '_' and '-' read as spaces."""
    path = folder / "classnames.txt"
    if path.exists():
        given = {}
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                require("\t" in line, f"{path}:{n}: expected 'folder<TAB>name', got {line!r}")
                key, name = line.split("\t", 1)
                given[key.strip()] = name.strip()
        missing = [c for c in classes if not given.get(c)]
        require(not missing, f"{path} names no class for folder {(missing or [''])[0]!r}: add a line "
                f"'{(missing or [''])[0]}<TAB>name'")
        names = [given[c] for c in classes]
    else:
        names = [" ".join(c.replace("_", " ").replace("-", " ").split()) for c in classes]
    twice = [n for n in names if names.count(n) > 1]
    require(not twice, f"two class folders of {folder} have the name {(twice or [''])[0]!r}: rename one "
            "(or name them in classnames.txt)")
    return names


def load_folder(path, split_file=None) -> Benchmark:
    """A folder of class folders as a Benchmark (labels: the class folders, sorted). With train/ and
    test/ (optionally val/) those are the splits; otherwise CoOp's rule, 50/20/30 per class with a
    fixed seed. `split_file`: a run's saved split (FOLDER_SPLIT), read instead when it exists."""
    folder = Path(path).expanduser().resolve()
    if not folder.is_dir():
        raise MissingFileError(f"--dataset {path}: no such folder (a folder of class folders, or of train/ "
                               "and test/ folders of class folders)")
    template = FOLDER_TEMPLATE
    if split_file is not None and Path(split_file).exists():  # the run's own split, as it was
        splits = _read_split_json(Path(split_file), folder)
        absent = _absent(splits)
        require(not absent, f"{len(absent)} images of the run's split ({split_file}) are no longer in "
                f"{folder}, e.g. {absent[0] if absent else ''}: put them back")
        return Benchmark(folder.name, _classnames(folder.name, splits), *splits, template, {}, open_rgb,
                         augment=True, folder=str(folder))
    parts = [s for s in ("train", "val", "test") if (folder / s).is_dir()]
    if parts:
        require({"train", "test"} <= set(parts), f"{folder} has {'/, '.join(parts)}/ but not "
                f"{'train' if 'train' not in parts else 'test'}/: give both (val/ is optional), or put the "
                "class folders directly in it for a 50/20/30 split")
        per_split = {s: _class_images(folder / s) for s in parts}
        classes = list(per_split["train"])
        for s in parts:
            odd = sorted(set(per_split[s]) ^ set(classes))
            require(not odd, f"the classes of {folder}/{s}/ and train/ differ (e.g. {odd[0] if odd else ''}): "
                    "every split needs the same class folders")
        names = _folder_names(folder, classes)
        splits = [[Item(f, label, names[label]) for label, c in enumerate(classes) for f in per_split[s][c]]
                  if s in per_split else [] for s in ("train", "val", "test")]
    else:
        images = _class_images(folder)
        classes = list(images)
        names = _folder_names(folder, classes)
        items = [Item(f, label, names[label]) for label, c in enumerate(classes) for f in images[c]]
        splits = _split_by_label(items, random.Random(AUTO_SPLIT_SEED), 0.5, 0.2)
        for label, c in enumerate(classes):
            counts = [sum(it.label == label for it in split) for split in (splits[0], splits[2])]
            require(all(counts), f"class folder {folder / c} has {len(images[c])} image(s): too few for the "
                    "50/20/30 split (it needs a training and a test image); add images")
    return Benchmark(folder.name, names, *splits, template, {}, open_rgb, augment=True, folder=str(folder))


def save_folder_split(benchmark: Benchmark, path) -> None:
    """Write a folder benchmark's split as the run's split file (paths relative to the folder)."""
    rel = lambda items: [[os.path.relpath(s, benchmark.folder), y, c] for s, y, c in items]
    atomic_write_text(json.dumps({s: rel(getattr(benchmark, s)) for s in ("train", "val", "test")}), path)


# ==================================================================================================
# 6. Few-shot sampling, base/new split, transforms, loaders
# ==================================================================================================


def fewshot(items: list, shots: int, seed: int, cache=None) -> list:
    """K items per class, CoOp's rule: group by label in order of first appearance, random.sample K
    from each group - from a Random(seed) of its own, so the draw does not depend on what else used
    the global RNG. A class with fewer than K items keeps all of them (CoOp's repeat=False) with a
    warning. `cache`: a JSON path; an existing file is reused (checked against shots, seed, items)."""
    check_int("shots", shots, 1)
    items = [Item(*it) for it in items]
    if cache is not None and Path(cache).exists():
        try:
            saved = json.loads(Path(cache).read_text())
            chosen = [Item(*it) for it in saved["items"]]
        except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
            raise UsageError(f"few-shot cache {cache} is damaged ({type(err).__name__}: {err}); delete it "
                             f"(it is rebuilt from the seed)") from err
        if saved.get("shots") != shots or saved.get("seed") != seed or not set(chosen) <= set(items):
            raise UsageError(f"few-shot cache {cache} was made for other data (shots {saved.get('shots')}, seed "
                             f"{saved.get('seed')}); delete it or pass another path")
        return chosen
    groups = _group_by_label(items)
    rng = random.Random(seed)
    chosen, short = [], []
    for label, group in groups.items():
        if len(group) < shots:
            short.append(f"{group[0].classname} ({len(group)})")
        chosen += rng.sample(group, shots) if len(group) >= shots else group
    if short:
        warnings.warn(f"{len(short)} classes have fewer than {shots} items; all of their items are used: "
                      + ", ".join(short[:10]) + (" ..." if len(short) > 10 else ""))
    if cache is not None:
        atomic_write_text(json.dumps({"shots": shots, "seed": seed, "items": chosen}), cache)
    return chosen


def subsample_classes(items: list, classnames: list, which: str):
    """Base-to-new split (CoCoOp): the first ceil(n/2) labels are base, the rest new; each half is
    relabelled from 0. Returns (items of that half, its classnames). 'all' returns both unchanged."""
    if which not in ("all", "base", "new"):
        raise ValueError(f"which must be 'all', 'base' or 'new', got {which!r}")
    if which == "all":
        return list(items), list(classnames)
    m = math.ceil(len(classnames) / 2)
    return _keep_classes(items, classnames, range(m) if which == "base" else range(m, len(classnames)))


def _keep_classes(items: list, classnames: list, keep) -> tuple:
    """The items whose label is in `keep` (labels, in order), relabelled from 0, and their classnames."""
    new_label = {old: new for new, old in enumerate(keep)}
    return ([Item(s, new_label[y], c) for s, y, c in items if y in new_label], [classnames[y] for y in keep])


def shift_items(items: list, classnames: list) -> list:
    """Items of a shifted test set whose class is in `classnames`, relabelled to its index there.
    ImageNet's list repeats a few names ('crane': a bird and a machine). A repeated name is resolved
    by the offset between the two label spaces that the unrepeated names agree on (0 for base, the
    base count for new); when they do not agree it is an error rather than a silent mislabel."""
    index, source_labels = defaultdict(list), defaultdict(set)
    for i, name in enumerate(classnames):
        index[name].append(i)
    for _, label, name in items:
        source_labels[name].add(label)
    unique = lambda name: len(index[name]) == 1 and len(source_labels[name]) == 1
    offsets = {label - index[name][0] for name, labels in source_labels.items() if name in index and unique(name)
               for label in labels}
    out = []
    for source, label, name in items:
        if name not in index:
            continue
        if unique(name):
            out.append(Item(source, index[name][0], name))
        elif len(offsets) != 1:
            raise ValueError(f"class name {name!r} is repeated and the label spaces do not line up: "
                             f"cannot relabel {source}")
        else:
            (offset,) = offsets
            if 0 <= label - offset < len(classnames) and classnames[label - offset] == name:
                out.append(Item(source, label - offset, name))
    return out


def own_classes(items: list, classnames: list):
    """A shifted test set in its own label space (domain generalisation): the classes that occur in it,
    in the benchmark's label order, relabelled from 0 -> (items, their classnames). For the world and
    ImageNet-V2/-Sketch that is every class; ImageNet-A and -R hold 200 (CoCoOp Table 3)."""
    return _keep_classes(items, classnames, sorted({label for _, label, _ in items}))


# Cross-dataset transfer (CoCoOp Table 2): from ImageNet to the other ten datasets, each in its own label
# space; the world's counterpart is its other task (world/shapes.py: world_other_task).
CROSS_DATASET_TARGETS = {"imagenet": ("caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                                      "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101")}


def transfer_targets(name: str) -> list:
    """The datasets the cross-dataset protocol evaluates on after training on `name`; [] when the
    protocol names none for it (then the user lists them)."""
    if name.startswith(WORLD_PREFIX):
        return [_world("shapes").world_other_task(name)]
    return list(CROSS_DATASET_TARGETS.get(name, ()))


CROP_SCALE = (0.08, 1.0)  # the training crop's area fraction (the papers')...
CROP_RATIO = (3 / 4, 4 / 3)  # ...and aspect ratio (torchvision's default)


def make_transform(backbone: Backbone, train: bool):
    """The papers' transforms (Dassl INPUT of every CoOp config). Train: random resized crop with
    scale (0.08, 1), bicubic, and a horizontal flip. Test: shorter side to the input size, centre
    crop. Both normalise with the backbone's mean/std (CLIP's for OpenAI weights)."""
    from torchvision import transforms as T

    bicubic, size = T.InterpolationMode.BICUBIC, backbone.image_size
    head = ([T.RandomResizedCrop(size, scale=CROP_SCALE, ratio=CROP_RATIO, interpolation=bicubic),
             T.RandomHorizontalFlip()]
            if train else [T.Resize(size, interpolation=bicubic), T.CenterCrop(size)])
    return T.Compose(head + [T.ToTensor(), T.Normalize(backbone.mean, backbone.std)])


class ImageItems(torch.utils.data.Dataset):
    def __init__(self, items, open_image, transform):
        self.items, self.open_image, self.transform = list(items), open_image, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        source, label, _ = self.items[i]
        return self.transform(self.open_image(source)), label  # [3, H, W], int


def make_loader(items, benchmark: Benchmark, backbone: Backbone, train: bool, batch_size: int,
                seed: int = 0, workers: int = 0):
    """A DataLoader of (images [B, 3, H, W], labels [B]) on the CPU that opens and transforms every
    image in each pass (make_transform, PIL), in `workers` processes. Training: augmented when
    benchmark.augment, shuffled by a generator seeded with `seed`, and drop_last only when there is
    at least one full batch (Dassl). Evaluation: fixed order, no augmentation. The method files'
    training batches come from train_batches, which decodes each image once (or falls back to
    this)."""
    augment = train and benchmark.augment
    return torch.utils.data.DataLoader(
        ImageItems(items, benchmark.open_image, make_transform(backbone, augment)),
        batch_size=batch_size, shuffle=train, num_workers=workers,
        generator=torch.Generator().manual_seed(seed),  # the shuffle order and the workers' seeds
        drop_last=train and len(items) >= batch_size,
        pin_memory=torch.cuda.is_available(), persistent_workers=workers > 0)


def _signed(v: float) -> float:  # the port's random sign: -v with probability 1/2 (torch's RNG)
    return -v if torch.rand(()).item() > 0.5 else v


def _affine(coefficients):
    return lambda img, v: img.transform(img.size, Image.Transform.AFFINE, coefficients(_signed(v)))


def _solarize_add(img, v):  # add v to every channel (clipped), then solarize at 128
    return ImageOps.solarize(Image.fromarray(np.clip(np.asarray(img, np.int64) + v, 0, 255).astype(np.uint8)), 128)


# (name, op(image, v), min, max): the official port's 14 ops and ranges, in its order
RANDAUGMENT_OPS = [
    ("AutoContrast", lambda img, v: ImageOps.autocontrast(img), 0, 1),
    ("Equalize", lambda img, v: ImageOps.equalize(img), 0, 1),
    ("Rotate", lambda img, v: img.rotate(_signed(v)), 0, 30),
    ("Posterize", lambda img, v: ImageOps.posterize(img, max(1, int(v))), 0, 4),
    ("Solarize", lambda img, v: ImageOps.solarize(img, v), 0, 256),
    ("SolarizeAdd", _solarize_add, 0, 110),
    *((kind, lambda img, v, kind=kind: getattr(ImageEnhance, kind)(img).enhance(v), 0.1, 1.9)
      for kind in ("Color", "Contrast", "Brightness", "Sharpness")),
    ("ShearX", _affine(lambda v: (1, v, 0, 0, 1, 0)), 0.0, 0.3),
    ("ShearY", _affine(lambda v: (1, 0, 0, v, 1, 0)), 0.0, 0.3),
    ("TranslateXabs", _affine(lambda v: (1, 0, v, 0, 1, 0)), 0.0, 100),
    ("TranslateYabs", _affine(lambda v: (1, 0, 0, 0, 1, v)), 0.0, 100),
]


class RandAugmentPort:
    """RandAugment(n, m) as ProReg's official code runs it (its vilt/transforms/randaug.py, a port of
    rpmcruz/autoaugment), not torchvision's: n ops drawn with replacement from RANDAUGMENT_OPS, each at
    v = m / 30 * (max - min) + min; rotations, shears and translations with a random sign; PIL's defaults
    (nearest, black fill). At m = 9: posterize to 1 bit (int(1.2)), solarize at 76.8, SolarizeAdd +33
    (where torchvision has Identity), one enhance factor 0.64, rotate 9 degrees, shear 0.09, translate
    30 px. Draws come from torch's global RNG (SeededItems seeds it per image), not Python's random."""

    def __init__(self, n: int = 2, m: int = 9):
        self.n, self.m = n, m

    def __call__(self, img):
        for k in torch.randint(len(RANDAUGMENT_OPS), (self.n,)).tolist():
            _, op, lo, hi = RANDAUGMENT_OPS[k]
            img = op(img, self.m / 30 * (hi - lo) + lo)
        return img


# Training batches from images decoded once. The few-shot sets are small (16 shots x 50 classes
# of Caltech101's ~300x200 images: 144 MB as uint8), so decoding them every epoch, as a DataLoader
# does, is the wasted work; the crop, resize, flip and normalisation run as tensor ops on the
# device.
TRAIN_MEMORY_LIMIT = 4 * 2**30  # bytes of decoded training images train_batches keeps by default


def train_batches(items, benchmark: Benchmark, backbone: Backbone, batch_size: int, seed: int = 0,
                  workers: int = 0, device="cpu", memory_limit: int = TRAIN_MEMORY_LIMIT):
    """The training batches of a run: an iterable with len() of (images [B, 3, S, S] float32
    normalised, labels [B] long), both on `device`, S = backbone.image_size, and `.generator`, the
    CPU torch.Generator (seeded with `seed`) that draws every random choice of an epoch; its state
    after an epoch determines all later epochs (the method files checkpoint it as rng "loader").

    benchmark.augment (real datasets): the images are decoded once, at source resolution, in
    max(1, workers) threads, and kept on `device` as uint8 (DecodedBatches); each epoch draws a
    permutation, then per image a RandomResizedCrop box (scale CROP_SCALE, ratio CROP_RATIO,
    torchvision's algorithm) and a flip with p = 0.5, all from `.generator`, and resizes the crop on
    the device (bicubic, antialias). Same distribution as make_loader(items, ..., True, ...), not
    the same draws. A smaller stored copy cannot give the same pixels: a crop may cover 8 % of the
    image and is resized from its own pixels, so the source resolution is kept. When the decoded
    images pass `memory_limit` bytes it prints so and falls back to make_loader(items, ..., True,
    ...) (decoding every epoch in `workers` processes), batches moved to `device` (DeviceLoader).
    Without benchmark.augment (the world) it is that DataLoader too: the test transform, shuffled.
    """
    device = torch.device(device)
    if benchmark.augment:
        images = _decode_within(items, benchmark.open_image, workers, memory_limit, device)
        if images is not None:
            labels = torch.tensor([label for _, label, _ in items], dtype=torch.long)
            return DecodedBatches(images, labels, backbone, batch_size, seed, device)
        print(f"train_batches: the {len(items)} training images take more than "
              f"{memory_limit / 2**30:.3g} GiB decoded (memory_limit): decoding them every epoch "
              f"in the DataLoader instead")
    loader = make_loader(items, benchmark, backbone, True, batch_size, seed, workers)
    return DeviceLoader(loader, device)


def _decode_within(items, open_image, workers: int, memory_limit: int, device):
    """Each item's image as a uint8 tensor [3, h, w] on `device` (a view of PIL's h x w x 3
    pixels, not a transposed copy; PIL decodes in threads: it releases the GIL), or None as soon as
    their bytes pass memory_limit."""
    from concurrent.futures import ThreadPoolExecutor
    from torchvision.transforms.functional import pil_to_tensor

    sources = [source for source, _, _ in items]
    images, total = [], 0
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        for image in pool.map(lambda source: pil_to_tensor(open_image(source)), sources):
            total += image.numel()
            if total > memory_limit:
                return None
            images.append(image.to(device))
    finally:
        pool.shutdown(cancel_futures=True)
    return images


def _crop_box(height: int, width: int, generator: torch.Generator) -> tuple:
    """(top, left, h, w): torchvision's RandomResizedCrop.get_params(scale=CROP_SCALE,
    ratio=CROP_RATIO) draw for draw, from `generator` instead of the global RNG: up to 10 tries of
    an area fraction uniform in CROP_SCALE and a log aspect ratio uniform in log CROP_RATIO, the
    first box that fits placed uniformly; else the centre crop of the whole image, its aspect ratio
    clamped to CROP_RATIO."""
    area = height * width
    log_lo, log_hi = torch.log(torch.tensor(CROP_RATIO)).tolist()  # float32, as in torchvision
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(*CROP_SCALE, generator=generator).item()
        log_ratio = torch.empty(1).uniform_(log_lo, log_hi, generator=generator)
        aspect_ratio = torch.exp(log_ratio).item()
        w = round(math.sqrt(target_area * aspect_ratio))
        h = round(math.sqrt(target_area / aspect_ratio))
        if 0 < w <= width and 0 < h <= height:
            top = torch.randint(0, height - h + 1, size=(1,), generator=generator).item()
            left = torch.randint(0, width - w + 1, size=(1,), generator=generator).item()
            return top, left, h, w
    if width / height < min(CROP_RATIO):
        w, h = width, round(width / min(CROP_RATIO))
    elif width / height > max(CROP_RATIO):
        w, h = round(height * max(CROP_RATIO)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _draw_view(height: int, width: int, generator: torch.Generator) -> tuple:
    """The random draws of one training view, in make_transform's order: (crop box, flip)."""
    box = _crop_box(height, width, generator)
    return box, torch.rand(1, generator=generator).item() < 0.5  # RandomHorizontalFlip(p=0.5)


def _resized_crop(image: torch.Tensor, box: tuple, size: int) -> torch.Tensor:
    """The crop `box` = (top, left, h, w) of a uint8 image [3, H, W], resized to [3, size, size]
    with bicubic antialias as float in 0..255, not yet clamped or rounded (torchvision's tensor path
    resizes in float32 the same way; the caller clamps and rounds a whole batch at once)."""
    top, left, h, w = box
    crop = image[None, :, top:top + h, left:left + w]
    crop = crop.to(torch.float32, memory_format=torch.contiguous_format)  # [1, 3, h, w]
    return torch.nn.functional.interpolate(crop, size=(size, size), mode="bicubic", antialias=True,
                                           align_corners=False)[0]


class DecodedBatches:
    """train_batches' in-memory path: uint8 images [3, h, w] on the device, augmented there per
    batch (see train_batches). Batches follow make_loader's rules: shuffled each epoch, drop_last
    only when there is at least one full batch."""

    def __init__(self, images: list, labels: torch.Tensor, backbone: Backbone, batch_size: int,
                 seed: int, device: torch.device):
        self.images, self.batch_size, self.device = images, batch_size, device
        self.labels = labels.to(device)  # [N] long
        self.size = backbone.image_size
        self.mean = torch.tensor(backbone.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(backbone.std, device=device).view(1, 3, 1, 1)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        n = len(self.images)
        return n // self.batch_size if n >= self.batch_size else 1

    def __iter__(self):
        order = torch.randperm(len(self.images), generator=self.generator)
        order_on_device = order.to(self.device)  # once an epoch: no host-to-device copy per batch
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            chosen = order[start:start + self.batch_size].tolist()
            views = []
            for k in chosen:  # crops differ in size: one resize per image
                image = self.images[k]
                box, flip = _draw_view(image.shape[1], image.shape[2], self.generator)
                view = _resized_crop(image, box, self.size)
                views.append(view.flip(-1) if flip else view)
            x = torch.stack(views).clamp_(0, 255).round_()  # [B, 3, S, S] as a uint8 resize keeps
            x = x.div_(255).sub_(self.mean).div_(self.std)  # ToTensor, then Normalize
            yield x, self.labels[order_on_device[start:start + self.batch_size]]


class DeviceLoader:
    """A DataLoader whose batches arrive on `device` (train_batches' DataLoader path); its
    .generator is the DataLoader's (the shuffle order and the workers' seeds)."""

    def __init__(self, loader: torch.utils.data.DataLoader, device: torch.device):
        self.loader, self.device, self.generator = loader, device, loader.generator

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for x, y in self.loader:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


# ==================================================================================================
# 7. Results: one JSON line per run, and the README table
# ==================================================================================================


def append_result(path, record: dict) -> None:
    """Append one run as one JSON line. The table reads: method, dataset, backbone, pretrained,
    shots, seed, base, new (accuracies in %; None for all-class runs, which have `all`), shifts, transfer
    (other datasets), protocol; wall_s and more may follow. One os.write on an
    O_APPEND descriptor, so parallel runs appending to one file do not interleave lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


RESULT_KEYS = ("method", "dataset", "backbone", "shots", "protocol")  # what every record needs to be placed in the table


def read_results(runs_dir) -> list:
    """Every record of every *.jsonl file under runs_dir but the runs' epoch logs (log.jsonl). A line
    that is not a JSON record with RESULT_KEYS is skipped with a warning naming file and line."""
    records = []
    for path in sorted(Path(runs_dir).rglob("*.jsonl")):
        if path.name == "log.jsonl":  # a run's epoch log (append_log), not results
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    warnings.warn(f"{path}:{n}: not a JSON line, skipped")
                    continue
                missing = [k for k in RESULT_KEYS if k not in record] if isinstance(record, dict) else RESULT_KEYS
                if missing:
                    warnings.warn(f"{path}:{n}: not a result record (no {', '.join(missing)}), skipped")
                    continue
                records.append(record)
    return records


def _mean_std(values: list) -> str:
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0  # sample std over seeds
    return f"{statistics.fmean(values):.2f} ± {std:.2f}"


def _settings(record: dict) -> dict:
    """The settings of a run that change its numbers: its args but LOCAL_SETTINGS, the seed (averaged
    over), the other datasets (columns of their own) and anything path-like (*_dir, *_file, *_path)."""
    ignored = (*LOCAL_SETTINGS, "seed", "eval_datasets")
    out = {k: v for k, v in (record.get("args") or {}).items() if k not in ignored and not k.endswith(("_dir", "_file", "_path"))}
    out["protocol"] = record["protocol"]
    return out


def _zero_shot_records(records: list) -> list:
    """The zero-shot CLIP numbers that method runs record beside their own, as rows of their own
    (method 'zero-shot', 0 shots), once per (dataset, backbone, tag, protocol, seed)."""
    out, seen = [], set()
    for r in records:
        key = (r["dataset"], r["backbone"], r.get("pretrained"), json.dumps(r.get("protocol")), r.get("seed"))
        if r.get("zero_shot") and key not in seen:
            seen.add(key)
            zs = r["zero_shot"]
            out.append({**{k: r[k] for k in ("dataset", "backbone", "pretrained", "seed", "protocol") if k in r},
                        "method": "zero-shot", "shots": 0, "base": zs.get("base"), "new": zs.get("new"),
                        "all": zs.get("all"),
                        "shifts": {k: v for k, v in zs.items() if k not in ("base", "new", "hm", "all")}})
    return out


def _show(value) -> str:
    return repr(value) if isinstance(value, str) and (not value or " " in value) else str(value)


def results_table(records: list) -> str:
    """Markdown table: mean ± std over runs per (method, dataset, backbone/tag, shots, settings), with
    a zero-shot row from the runs' own zero-shot numbers and one column per shifted test set. Runs
    whose settings differ (any argument but LOCAL_SETTINGS and the seed, e.g. lr, epochs, n_ctx) are never
    averaged together; a 'settings' column then shows the ones that differ between rows that would
    otherwise look alike. 'runs' counts records (a repeated seed counts twice, as it is averaged twice).
    HM is the HM of the mean base and mean new accuracies, and each 'average' row takes the HM of the
    averaged base and new accuracies over datasets, as the papers' Average rows do (METHODS.md §0).
    All-class runs (protocols 'all' and 'cross') fill an 'all' column instead of base/new/HM, and the
    other datasets of a cross-dataset run get columns beside the shifted test sets."""
    records = list(records) + _zero_shot_records(records)
    columns = lambda r: {**(r.get("shifts") or {}), **(r.get("transfer") or {})}  # shifted sets, other datasets
    shifts = list(dict.fromkeys(s for r in records for s in columns(r)))
    with_all = any(r.get("all") is not None for r in records)  # all-class runs (protocols 'all', 'cross')
    groups, settings = defaultdict(list), {}
    for r in records:
        backbone = f"{r['backbone']}/{r['pretrained']}" if r.get("pretrained") else r["backbone"]
        key = (r["method"], r["dataset"], backbone, r["shots"],
               tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in _settings(r).items())))
        groups[key].append(r)
        settings[key] = _settings(r)
    # the settings that tell apart groups whose other columns are equal (a setting absent from one differs too)
    alike = defaultdict(list)  # (method, dataset, backbone, shots) -> the settings of its groups
    for key in groups:
        alike[key[:4]].append(dict(key[4]))
    differing = sorted({k for group in alike.values() for a in group for b in group
                        for k in a.keys() | b.keys() if a.get(k) != b.get(k)})

    def cell(key) -> str:
        return " ".join(f"{k}={_show(settings[key][k])}" for k in differing if k in settings[key]) or "-"

    head = ["method", "dataset", "backbone", "shots", *(["settings"] if differing else []), "runs",
            "base", "new", "HM", *(["all"] if with_all else []), *shifts]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    averages = defaultdict(list)

    def row(columns, runs, base, new, base_cell, new_cell, shift_cells, all_cell="-"):
        hm = f"{harmonic_mean(base, new):.2f}" if base is not None and new is not None else "-"
        rows.append("| " + " | ".join(map(str, (*columns, runs, base_cell, new_cell, hm,
                                                  *([all_cell] if with_all else []), *shift_cells))) + " |")

    for key, runs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        method, dataset, backbone, shots, _ = key
        base = [r["base"] for r in runs if r.get("base") is not None]
        new = [r["new"] for r in runs if r.get("new") is not None]
        mb = statistics.fmean(base) if base else None
        mn = statistics.fmean(new) if new else None
        shift_cells = [_mean_std([columns(r)[s] for r in runs if s in columns(r)]) for s in shifts]
        all_cell = _mean_std([r["all"] for r in runs if r.get("all") is not None])
        shown = [cell(key)] if differing else []
        row((method, dataset, backbone, shots, *shown), len(runs), mb, mn, _mean_std(base), _mean_std(new), shift_cells,
            all_cell)
        averages[(method, backbone, shots, *shown)].append((mb, mn))
    for (method, backbone, shots, *shown), means in sorted(averages.items(), key=lambda kv: tuple(map(str, kv[0]))):
        if len(means) > 1 and all(b is not None for b, _ in means):
            mb = statistics.fmean(b for b, _ in means)
            mn = statistics.fmean(n for _, n in means) if all(n is not None for _, n in means) else None
            row((method, f"average ({len(means)})", backbone, shots, *shown), "", mb, mn,
                f"{mb:.2f}", "-" if mn is None else f"{mn:.2f}", ["-"] * len(shifts))
    return "\n".join(rows)


# ==================================================================================================
# 8. Runs: the machinery every method file shares
# ==================================================================================================
# A method file keeps its flags and paper settings, its model, objective, step, optimiser and
# schedule; everything else a run does is here, once. Its main reads as the recipe:
#
#     args, saved, out, device = data.start_run(args, "coop", resolve_settings, check_settings)
#     data.print_start(...); seed_everything(args.seed); task = data.load_task(args, device)
#     model, optimizer = build(...)                   # the method's own
#     data.make_run_folder(out, args, saved)          # a new run, once everything could be built
#     items = data.training_items(task, args, out)    # few-shot sample of the training classes
#     batches = data.training_batches(task, items, args, device, frozen_encoder)
#     start = data.restore_checkpoint(saved, model, optimizer, batches.generator)
#     for epoch in data.epoch_bar(args, start):
#         steps.append(step(x, y)) ...; fit = data.epoch_fit(steps, seen, epoch, lr, started)
#         data.save_checkpoint(out / "checkpoint.pt", args, epoch + 1, model, optimizer, generator, fit)
#     record = evaluate_run(...)   # its own: data.evaluation_sets, data.feature_batches, data.evaluate,
#     data.finish_run(out, record, args, start_time)   # data.zero_shot_accuracy, data.result_record

PROTOCOLS = {"base2new": "base", "all": "all", "cross": "all"}  # protocol -> the classes it trains on

# Settings that say where and how a run executes, not what it learns. A resumed or re-evaluated run
# takes these from its command line and every other setting from its saved args; the results table
# does not tell runs apart by them (nor by the seed, which it averages over).
LOCAL_SETTINGS = ("resume", "evaluate", "root", "download", "device", "workers", "test_batch_size", "eager",
                  "results_file", "output_dir", "overwrite", "no_truncate", "loss_impl", "predict", "classes",
                  "top_k")
MAX_SEED = 2 ** 32 - 1  # NumPy's seeds are 32-bit


def add_run_flags(parser, *, dataset="shapes", protocol="base2new", shots=16, shots_help=None,
                  epochs_help="training epochs", batch_help="training batch size") -> None:
    """The flags every method file has, with their defaults; the method adds its own before these."""
    a = parser.add_argument
    a("--dataset", default=dataset, help="benchmark name for data.load_dataset (shapes = the built-in offline "
      "world; the papers: the 11 CoOp datasets, e.g. caltech101), or PATH/ a folder of class folders (with "
      "train/ and test/ folders, or split 50/20/30; names from the folders or classnames.txt)")
    a("--template", default=None, help="the hand-written prompt of the zero-shot row (and ProReg's head), e.g. "
      "'a satellite photo of a {}.'; default: the dataset's (CoOp's; 'a photo of a {}.' for a folder)")
    a("--root", default="~/data", help="folder holding the datasets in CoOp's layout, as DATASET.ROOT")
    a("--download", action="store_true",
      help="let data.py download what torchvision can download (the papers: manual download)")
    a("--model", default=None, help="open_clip model name; default: data.default_backbone(dataset)")
    a("--pretrained", default=None,
      help="open_clip pretrained tag, 'none' for random init; required with --model (paper: openai)")
    a("--protocol", default=protocol, choices=list(PROTOCOLS),
      help="base2new: train on the base half, test base and new (CoCoOp); all: train and test on every "
           "class (few-shot); cross: as all, then test on --eval-datasets (cross-dataset transfer)")
    a("--eval-datasets", default=None, metavar="A,B,C",
      help="other datasets to test on after training, each in its own label space; default for --protocol "
           "cross: imagenet -> the other ten CoOp datasets, shapes -> shapes2. With --evaluate: test a "
           "saved run on these")
    a("--shots", type=int, default=shots, help=shots_help or "training images per class, sampled on all "
      "classes before the base/new split (paper: 16)")
    a("--epochs", type=int, default=None, help=epochs_help)
    a("--batch-size", type=int, default=None, help=batch_help)
    a("--test-batch-size", type=int, default=100, help="evaluation batch size (Dassl: 100)")
    a("--workers", type=int, default=min(4, os.cpu_count() or 1),
      help="data-loader worker processes (Dassl: 4, here capped at the CPU count)")
    a("--seed", type=int, default=1, help="seed for sampling, initialisation and shuffling (papers: 1, 2, 3)")
    a("--eager", action="store_true", help="CUDA: run each training step op by op instead of replaying "
      "its CUDA graph (kernels.CapturedStep; same numbers, slower)")
    a("--output-dir", default=None, help="run folder; default runs/<method>-<dataset>-<shots>shot-seed<seed>-<time>")
    a("--overwrite", action="store_true", help="replace a run folder that already holds a checkpoint, all of it")
    a("--results-file", default=None,
      help="JSON-lines file that gets one line per run; default <output-dir>/../results.jsonl")
    a("--resume", default=None, metavar="RUN_DIR",
      help="continue a run from its last completed epoch with its saved settings (or finish its evaluation)")
    a("--evaluate", default=None, metavar="RUN_DIR",
      help="re-evaluate a finished run with its saved settings, without training; writes RUN_DIR/eval.json")
    a("--device", default=None, help="torch device; default cuda if available, else cpu")
    a("--train-domain", default=None, help="office_home: the domain trained on (art, clipart, product, "
      "real_world; default art); shapes_domains: the style (photo, noisy, outline, vivid, lowcontrast; "
      "default outline)")
    a("--test-domain", default=None, help="pacs: the held-out domain (photo, art_painting, cartoon, sketch; "
      "default sketch); office_home: the domain tested on (default clipart)")
    a("--predict", nargs="+", default=None, metavar=("RUN_DIR", "IMAGE"), help="classify images (files or "
      "folders of them) with a finished run: prints each image's top classes and their probabilities")
    a("--classes", default=None, metavar="A,B,C", help="with --predict: classify among these class names (or "
      "those of a file, one per line) instead of the run's training classes")
    a("--top-k", type=int, default=5, help="with --predict: how many classes to print per image")


def resolve_run_args(args) -> None:
    """Fill the common settings left at None: the dataset's default backbone, 'none' -> random init, and
    the cross-dataset targets of --protocol cross. A folder dataset is recorded by its absolute path."""
    if is_folder(args.dataset):
        args.dataset = str(Path(args.dataset).expanduser().resolve())
    if args.model is None:
        args.model, default_pretrained = default_backbone(args.dataset)
        args.pretrained = default_pretrained if args.pretrained is None else args.pretrained
    else:  # never fall back to random weights silently
        require(args.pretrained is not None, "--model needs --pretrained (an open_clip tag, a weights file, "
                "or 'none' for random init)")
    if args.pretrained in ("none", "None", ""):
        args.pretrained = None
    if args.eval_datasets is None and args.protocol == "cross":
        args.eval_datasets = ",".join(transfer_targets(args.dataset))


def check_run_args(args, min_epochs=1, min_shots=1) -> None:
    """Refuse a common setting that cannot run or would give wrong numbers (UsageError, one line)."""
    check_int("--epochs", args.epochs, min_epochs)
    check_int("--shots", args.shots, min_shots)
    for name in ("batch_size", "test_batch_size"):
        check_int(f"--{name.replace('_', '-')}", getattr(args, name), 1)
    check_int("--workers", args.workers, 0)
    check_int("--seed", args.seed, 0)
    require(not args.classes, "--classes goes with --predict RUN_DIR IMAGE... (class names "
            "to classify among); a training run takes its classes from --dataset")
    template = args.template
    require(template is None or (isinstance(template, str) and template.count("{}") == 1 and
                                 "{" not in template.replace("{}", "", 1)),
            f"--template must hold one '{{}}' where the class name goes (e.g. 'a photo of a {{}}.'), got {template!r}")
    require(args.seed <= MAX_SEED, f"--seed must be at most {MAX_SEED} (NumPy's seeds are 32-bit), got {args.seed}")
    require(args.protocol in PROTOCOLS, f"--protocol must be one of {', '.join(PROTOCOLS)}, got {args.protocol!r}")
    require(args.protocol != "cross" or eval_datasets(args), f"--protocol cross names no default targets for "
            f"{args.dataset}: list them with --eval-datasets")
    run_device(args.device)


def check_warmup(name: str, value, epochs) -> None:
    """A warm-up (epochs, or a fraction when `epochs` is None) must leave some of the run after it."""
    if epochs is None:
        check_float(name, value, minimum=0, below=1)
    else:
        check_int(name, value, 0)
        require(value < epochs, f"{name} {value} is not shorter than --epochs {epochs}: the whole run would be "
                "warm-up; use fewer warm-up epochs")


def check_sgd_args(args) -> None:
    """Dassl's SGD and schedule flags (coop.py, promptsrc.py, vprompt.py): --lr > 0; --momentum,
    --weight-decay, --warmup-lr >= 0; --warmup-epochs shorter than --epochs."""
    check_float("--lr", args.lr, above=0)
    for name in ("momentum", "weight_decay", "warmup_lr"):
        check_float(f"--{name.replace('_', '-')}", getattr(args, name), minimum=0)
    check_warmup("--warmup-epochs", args.warmup_epochs, args.epochs)


def eval_datasets(args) -> list:
    """The other datasets a run is tested on (--eval-datasets), as a list."""
    return [name.strip() for name in (args.eval_datasets or "").split(",") if name.strip()]


def run_device(name) -> torch.device:
    """The device of --device (default: cuda when present, else cpu); one that is not there is refused."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        require(count > (device.index or 0), f"--device {name}: this machine has {count} CUDA device(s) "
                "(torch.cuda.is_available() says so); leave --device out to run on the CPU")
    else:
        require(device.type == "cpu", f"--device {name}: only cpu and cuda are supported")
    return device


def start_run(args, method: str, resolve: Callable, check: Callable):
    """The settings, saved state, folder and device of a run. A new run: resolve(args) fills and checks
    its settings. --resume RUN_DIR: the run's saved settings and last checkpoint. --evaluate RUN_DIR: a
    finished run's (--eval-datasets may name other test sets). LOCAL_SETTINGS come from the command line.
    Returns (args, saved checkpoint or None, run folder, device); nothing is written here."""
    run_dir = args.resume or args.evaluate
    if run_dir:
        saved = load_checkpoint(Path(run_dir) / "checkpoint.pt")
        other_datasets = args.eval_datasets if args.evaluate else None
        local = {k: v for k, v in vars(args).items() if k in LOCAL_SETTINGS}
        args = argparse.Namespace(**{**saved["args"], **local})
        args.eval_datasets = other_datasets or args.eval_datasets
        check(args)
        out = Path(run_dir)
        finished = (out / "results.json").exists()
        require(not (args.resume and finished), f"{out} is finished (results.json exists): re-evaluate it "
                f"with --evaluate {out}")
        require(not args.evaluate or saved["epoch"] >= args.epochs, f"{out} stopped after epoch "
                f"{saved['epoch']} of {args.epochs}: finish it with --resume {out}")
    else:
        saved, args = None, resolve(args)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        protocol = "" if args.protocol == "base2new" else f"{args.protocol}-"
        shots = f"{args.shots}shot-" if args.shots else ""
        name = dataset_name(args.dataset)
        out = Path(args.output_dir or f"runs/{method}-{name}-{protocol}{shots}seed{args.seed}-{stamp}")
        require(args.overwrite or not (out / "checkpoint.pt").exists(), f"{out} already holds a checkpoint: "
                "pass --overwrite to replace the run, --resume to continue it, or another --output-dir")
    return args, saved, out, run_device(args.device)


def run_script(main, parse_args) -> None:
    """A method file run as a script: main(parse_args()); a UsageError (a mistake the user can fix)
    prints one line that says what to do, no traceback, and exits with status 2."""
    try:
        main(parse_args())
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def print_start(args, method: str, device, out, **more) -> None:
    """The run's first line: method, dataset, protocol, backbone, shots, seed, epochs, batch, `more`."""
    extra = "".join(f", {key} {value}" for key, value in more.items())
    print(f"{method} on {args.dataset} ({args.protocol}): {args.model}/{args.pretrained}, {args.shots} shots, "
          f"seed {args.seed}, {args.epochs} epochs, batch {args.batch_size}{extra}, device {device} -> {out}")


def make_run_folder(out: Path, args, saved) -> None:
    """Create a new run's folder with its args.json (--overwrite: the old run goes, all of it). Call it
    once the data, weights and model exist, so that a run that cannot start leaves no folder."""
    if saved is not None:
        return
    if args.overwrite and (out / "checkpoint.pt").exists():
        shutil.rmtree(out)  # no file of the old run is left beside the new results
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(vars(args), indent=2), out / "args.json")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch: everything random in a run follows --seed."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Task:
    """What a run reads: its benchmark, the other datasets it is tested on, the backbone, and the class
    names of the classes it trains on (the base half for base2new)."""
    benchmark: Benchmark
    targets: dict
    backbone: Backbone
    train_classes: str
    train_names: list


def load_task(args, device) -> Task:
    """Read the benchmark (a folder: with the run's saved split on --resume/--evaluate), every
    --eval-datasets target (a missing one stops the run here, before training) and the backbone; the
    benchmark's template is --template's when given, and every class name must fit it in the text
    context."""
    run_dir = args.resume or args.evaluate
    split_file = Path(run_dir) / FOLDER_SPLIT if run_dir else None
    benchmark = load_dataset(args.dataset, args.root, args.download, args.train_domain, args.test_domain,
                             split_file=split_file)
    if args.template:
        benchmark = dataclasses.replace(benchmark, template=args.template)
    targets = {name: load_dataset(name, args.root, download=args.download) for name in eval_datasets(args)}
    backbone = load_backbone(args.model, args.pretrained, device)
    check_prompts(backbone, benchmark.classnames, benchmark.template)
    train_classes = PROTOCOLS[args.protocol]
    _, train_names = subsample_classes(benchmark.test, benchmark.classnames, train_classes)
    return Task(benchmark, targets, backbone, train_classes, train_names)


def check_prompts(backbone: Backbone, classnames: list, template: str) -> None:
    """Refuse a class name whose prompt (the template with the name) does not fit the text context."""
    ids = backbone.tokenize([template.format(c.replace("_", " ")) for c in classnames])
    cut = [c for c, eot in zip(classnames, ids.argmax(-1).tolist()) if eot >= ids.shape[1] - 1]
    require(not cut, f"the class name {(cut or [''])[0]!r} is too long for the text context of {ids.shape[1]} "
            f"tokens in the prompt {template!r}: shorten it (a folder's classnames.txt can name it)")


RUN_CLASSES = "classes.json"  # a run's training class names and template (what --predict reads)


def training_items(task: Task, args, cache) -> list:
    """The training images: --shots per class sampled on all classes (0: the whole split; `cache`: the
    run's fewshot.json), then those of the training classes, relabelled from 0. Beside `cache` go the
    run's class names and template (RUN_CLASSES) and a folder dataset's split (FOLDER_SPLIT)."""
    if cache is not None:
        run = Path(cache).parent
        atomic_write_text(json.dumps({"classnames": task.train_names, "template": task.benchmark.template}),
                          run / RUN_CLASSES)
        if task.benchmark.folder and not (run / FOLDER_SPLIT).exists():
            save_folder_split(task.benchmark, run / FOLDER_SPLIT)
    items = task.benchmark.train
    if args.shots:
        items = fewshot(items, args.shots, args.seed, cache=cache)
    return subsample_classes(items, task.benchmark.classnames, task.train_classes)[0]


def evaluation_sets(task: Task, protocol: str) -> dict:
    """{split: (items, classnames, benchmark they come from)}, each split in the label space it is tested
    in. base2new: the base and new halves, and the shifted sets restricted to the base classes. all,
    cross: the whole test set, each shifted set in its own label space (the classes it holds) and each
    group of classes (benchmark.groups) in the whole one. Then the other datasets (targets), each on its
    whole test set with all its classes."""
    benchmark = task.benchmark
    if protocol == "base2new":
        splits = {half: (*subsample_classes(benchmark.test, benchmark.classnames, half), benchmark)
                  for half in ("base", "new")}
        splits.update({name: (shift_items(items, task.train_names), task.train_names, benchmark)
                       for name, items in {**benchmark.shifts, **benchmark.groups}.items()})
    else:
        splits = {"all": (benchmark.test, benchmark.classnames, benchmark)}
        splits.update({name: (*own_classes(items, benchmark.classnames), benchmark)
                       for name, items in benchmark.shifts.items()})
        splits.update({name: (items, benchmark.classnames, benchmark) for name, items in benchmark.groups.items()})
    splits.update({name: (target.test, target.classnames, target) for name, target in task.targets.items()})
    return splits


def split_loader(split, backbone: Backbone, args):
    """The fixed-order, unaugmented batches of an evaluation split (items, classnames, benchmark)."""
    items, _, source = split
    return make_loader(items, source, backbone, False, args.test_batch_size, args.seed, args.workers)


# -------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, args, epoch: int, model, optimizer, generator=None, train=None, extra=None) -> None:
    """After each epoch, atomically: the learned tensors (the parameters that require grad) and what the
    next epoch depends on: the optimiser state, the random states of Python, NumPy, torch (CUDA too) and
    of `generator` (the training batches' shuffling), the epoch's training fit (`train`, epoch_fit's)
    and a method's own state (`extra`, e.g. PromptSRC's prompt average). Plain tensors, numbers and
    strings only, so that it loads with weights_only=True. The fit is also appended to log.jsonl
    beside it (see append_log), before the checkpoint, so that a resumed run repeats no epoch there."""
    if train is not None:
        append_log(Path(path).parent / "log.jsonl", {"epoch": epoch, **train})
    python_state, numpy_state = random.getstate(), np.random.get_state()
    atomic_save({
        "learned": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "args": vars(args), "epoch": epoch, "metrics": None, "train": train, "extra": extra,
        "optimizer": optimizer.state_dict(),
        "rng": {"python": [python_state[0], list(python_state[1]), python_state[2]],
                "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), *numpy_state[2:]],
                "torch": torch.get_rng_state(), "loader": None if generator is None else generator.get_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }, path)


def append_log(path, entry: dict) -> None:
    """log.jsonl, one JSON line per epoch: the lines of earlier epochs, then `entry`, written whole
    and atomically (a run resumed after a kill rewrites the epoch it repeats, never doubles it). A
    run's line: {"epoch", "loss", "terms": {the loss's terms, e.g. "ce", "kl"}, "acc", "lr", "s"}
    (epoch_fit; means over the epoch's steps, the terms unweighted as the method names them)."""
    path = Path(path)
    lines = path.read_text().splitlines() if path.exists() else []
    kept = [line for line in lines if line.strip() and json.loads(line)["epoch"] < entry["epoch"]]
    atomic_write_text("".join(f"{line}\n" for line in [*kept, json.dumps(entry)]), path)


def read_log(run_dir) -> list:
    """The epochs of a run's log.jsonl, as dicts (empty when it has none)."""
    path = Path(run_dir) / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@torch.no_grad()
def load_learned(model, learned: dict) -> None:
    """Copy saved learned tensors ({parameter name: tensor}, as save_checkpoint writes them) into the model."""
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.copy_(learned[name])


def restore_checkpoint(saved, model, optimizer, generator=None) -> int:
    """Put a saved epoch back (see save_checkpoint); returns the number of epochs already done (0 for a
    new run, saved None). The optimiser keeps its own lr tensors, which a captured step reads."""
    if saved is None:
        return 0
    load_learned(model, saved["learned"])
    lrs = [group["lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(saved["optimizer"])
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    rng = saved["rng"]
    random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
    np.random.set_state((rng["numpy"][0], rng["numpy"][1].numpy().astype(np.uint32), *rng["numpy"][2:]))
    torch.set_rng_state(rng["torch"])
    if generator is not None:
        generator.set_state(rng["loader"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    print(f"resuming after epoch {saved['epoch']} of {saved['args']['epochs']}")
    return saved["epoch"]


# -------------------------------------------------------------------------------- processes
def setup_distributed():
    """(rank, world size) as torchrun sets them (WORLD_SIZE, LOCAL_RANK): one process per GPU (nccl),
    or gloo on CPUs; (0, 1) without torchrun."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return 0, 1
    import torch.distributed as dist
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size()


def share_run(out: Path, device, world_size: int, args):
    """Under torchrun: rank 0's run folder for every process (whatever each one's clock says) and
    this process's GPU -> (out, device); unchanged in one process. --evaluate runs in one process."""
    if world_size == 1:
        return out, device
    require(not args.evaluate, "--evaluate runs in one process: use python, not torchrun")
    import torch.distributed as dist
    box = [out]
    dist.broadcast_object_list(box, src=0)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return box[0], device


def distributed(model, device, world_size: int):
    """Under torchrun: the model wrapped in DistributedDataParallel (gradients averaged over the
    processes in backward); the model itself in one process."""
    if world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def end_distributed(world_size: int) -> None:
    """Under torchrun: wait for every process, then close the process group (nothing in one process)."""
    if world_size > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def reset_peak_memory(device) -> None:
    """Start CUDA's allocator peak afresh (training's peak, not the set-up's); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> dict:
    """The peak memory: CUDA's allocator peak on a GPU (reset it before training), else the process's
    peak RSS."""
    if device.type == "cuda":
        return dict(peak_memory_mb=round(torch.cuda.max_memory_allocated(device) / 2 ** 20),
                    peak_memory_of="cuda max_memory_allocated")
    import resource
    return dict(peak_memory_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                peak_memory_of="process peak RSS (CPU)")


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list:
    """This process's share of every global batch of one epoch, as index lists: one permutation seeded by
    (seed, epoch), cut into batches of batch_size (the last incomplete one dropped), each split into
    world_size contiguous shares. Every process, and a resumed run, draws the same."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order, share = torch.randperm(n, generator=generator).tolist(), batch_size // world_size
    return [order[b * batch_size + rank * share: b * batch_size + (rank + 1) * share] for b in range(n // batch_size)]


class SeededItems(ImageItems):
    """(image, label) of a list of items; with `augment`, each image's random transform draws from torch's
    RNG seeded by (seed, epoch, index), whatever process or worker loads it (exact resume, DDP)."""

    def __init__(self, items, open_image, transform, seed: int, augment: bool):
        super().__init__(items, open_image, transform)
        self.seed, self.epoch, self.augment = seed, 0, augment

    def __getitem__(self, i):
        if not self.augment:
            return super().__getitem__(i)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, i)) % 2 ** 63)
            return super().__getitem__(i)


class IndexedBatches:
    """A whole training split in global batches (epoch_batches): .epoch(epoch, rank, world_size) yields
    this process's share of each batch as (images [b, 3, H, W], labels [b], item indices [b]) on `device`.
    A deterministic transform (augment False) runs once, the images kept in memory ([N, 3, H, W],
    .images); a random one runs in `workers` loader processes, each image's draw seeded (SeededItems)."""

    def __init__(self, items, open_image, transform, augment: bool, batch_size: int, seed: int,
                 workers: int, device):
        self.dataset = SeededItems(items, open_image, transform, seed, augment)
        self.n, self.batch_size, self.seed, self.workers, self.device = len(items), batch_size, seed, workers, device
        self.labels = torch.tensor([it.label for it in items])
        self.images = None if augment else torch.stack([self.dataset[i][0] for i in range(self.n)])

    def epoch(self, epoch: int, rank: int = 0, world_size: int = 1):
        index_lists = epoch_batches(self.n, self.batch_size, self.seed, epoch, rank, world_size)
        if self.images is not None:
            for idx in map(torch.tensor, index_lists):
                yield self.images[idx].to(self.device), self.labels[idx].to(self.device), idx
            return
        self.dataset.epoch = epoch
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=index_lists, num_workers=self.workers,
                                             pin_memory=self.device.type == "cuda")
        for (x, y), idx in zip(loader, index_lists):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), torch.tensor(idx)


def normalised_encoder(visual):
    """An image tower, put in eval mode, as an encoder: images -> L2-normalised features [B, D]."""
    visual.eval()
    return lambda images: torch.nn.functional.normalize(visual(images).float(), dim=-1)


class FixedHead(torch.nn.Module):
    """Fixed class features [C, D] (normalised here) and logit scale over L2-normalised image features
    [B, D]: e.g. zero-shot CLIP's prompt features with CLIP's scale."""

    def __init__(self, text_features, logit_scale):
        super().__init__()
        self.text_features = torch.nn.Parameter(torch.nn.functional.normalize(text_features.float(), dim=-1),
                                                requires_grad=False)
        self.logit_scale = torch.nn.Parameter(logit_scale.detach().clone(), requires_grad=False)

    def class_text_features(self):
        return self.text_features

    def forward(self, x, text_features=None):
        text_features = self.text_features if text_features is None else text_features
        return self.logit_scale.exp() * x @ text_features.t()


def warmup_linear(step: int, total: int, warmup: float) -> float:
    """transformers' polynomial schedule with power 1 and end lr 0 (get_polynomial_decay_schedule_with_warmup),
    per step: linear warm-up from 0 over int(warmup * total) steps, then linear decay to 0 at total."""
    warm = int(warmup * total)
    if step < warm:
        return step / warm
    return max(0.0, (total - step) / max(1, total - warm))


def trainable_encoder(visual):
    """CLIP's image tower, to be trained in place (no copy); a pretraining patch dropout (the world's tiny
    CLIP: 0.5, active in train mode only) is switched off, so that fine-tuning sees every patch."""
    if not isinstance(getattr(visual, "patch_dropout", torch.nn.Identity()), torch.nn.Identity):
        visual.patch_dropout = torch.nn.Identity()
    return visual.requires_grad_(True)


def set_lr(optimizer, factor: float, tensors: bool = False):
    """Every group's lr = its base_lr x factor; a tensor lr (or, with tensors=True, a new one on the group's
    device) is filled in place, where a captured CUDA-graph step reads it. Returns the optimizer."""
    for g in optimizer.param_groups:
        lr = g["base_lr"] * factor
        if tensors and not torch.is_tensor(g["lr"]):
            g["lr"] = torch.tensor(lr, device=g["params"][0].device)
        g["lr"] = g["lr"].fill_(lr) if torch.is_tensor(g["lr"]) else lr
    return optimizer


class AdamWHF(torch.optim.Optimizer):
    """AdamW as the transformers library computes it (transformers.optimization.AdamW with correct_bias,
    the optimiser of ViLT-based code such as ProReg's): eps is added to sqrt(v) before the bias correction,
    which scales the step, and the decay is applied after the update, to the updated weights:
        p <- p - lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps);   p <- p (1 - lr wd)
    torch.optim.AdamW decays first and adds eps to the bias-corrected sqrt(v). The lr may be a tensor and
    the step count is one (float64, on the parameter's device): no host sync, so a CUDA graph can capture
    the update, and a restored checkpoint continues bit for bit."""

    def __init__(self, params, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            (b1, b2), lr, eps, wd = g["betas"], g["lr"], g["eps"], g["weight_decay"]
            for p in (p for p in g["params"] if p.grad is not None):
                state = self.state[p]
                if not state:
                    state.update(step=torch.zeros((), dtype=torch.float64, device=p.device),
                                 exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] = state["step"].to(p.device, torch.float64)  # restored: on the CPU (no-op else)
                state["step"] += 1
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                step_size = lr * (1 - b2 ** state["step"]).sqrt() / (1 - b1 ** state["step"])
                p.sub_(m / (v.sqrt() + eps) * step_size)
                if wd > 0:
                    p.mul_(1 - lr * wd)


# -------------------------------------------------------------------------------- model selection
def validation_loader(task, args):
    """The fixed-order batches of the benchmark's validation items in the training classes' label space
    (one loader, iterated at every validation: its workers persist); None without a validation split."""
    items = subsample_classes(task.benchmark.val, task.benchmark.classnames, task.train_classes)[0]
    return split_loader((items, task.train_names, task.benchmark), task.backbone, args) if items else None


def keep_best(out: Path, model, acc: float, at: float, best: Optional[dict]) -> dict:
    """Model selection on validation accuracy: when `acc` beats best["acc"] (or there is none yet) the
    learned tensors go atomically to out/best.pt and the result is {acc, at} (`at`: the epoch, e.g. 7.5)."""
    if best is not None and acc <= best["acc"]:
        return best
    atomic_save({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}, out / "best.pt")
    return {"acc": acc, "at": at}


def select_model(model, out: Path, best: Optional[dict]) -> dict:
    """The model a run tests: the best validation (out/best.pt, loaded into `model`) where there was one,
    else the last epoch; returns what the record says of it."""
    if not best:
        return {"by": "last epoch"}
    load_learned(model, load_checkpoint(out / "best.pt"))
    return {"by": "validation", "epoch": best["at"], "val_acc": best["acc"]}


# -------------------------------------------------------------------------------- the epochs
def epoch_bar(args, start: int):
    """range(start, epochs) with a progress bar."""
    return tqdm(range(start, args.epochs), desc="train", initial=start, total=args.epochs)


def epoch_fit(steps: list, seen: int, epoch: int, lr=None, started=None) -> dict:
    """The epoch's training fit from its steps' outputs, train_step's (terms, number correct) with
    terms a dict of 0-d device tensors: "loss", the step's loss, and the loss's terms as the method
    names them (e.g. "ce", "kl"); one wait for the device per epoch. Returns {"loss": the steps'
    mean loss, "terms": {name: the steps' mean}, "acc": accuracy (%), "lr", "s": seconds since
    `started` (time.time() at its start)}, log.jsonl's line; a non-finite loss stops the run
    (UsageError) before anything is recorded as a result."""
    names = list(steps[0][0])  # "loss" and the method's terms
    values = [torch.stack([terms[n].float() for terms, _ in steps]) for n in names]
    values = torch.stack(values).cpu()  # [names, steps]
    correct = int(torch.stack([c for _, c in steps]).sum())
    losses = values[names.index("loss")]
    if not torch.isfinite(losses).all():
        bad = int((~torch.isfinite(losses)).nonzero()[0])
        at = "" if lr is None else f" (lr {lr:.3g})"
        raise UsageError(f"the loss became {losses[bad].item()} at epoch {epoch + 1}, step {bad + 1}{at}; "
                         "nothing was recorded as a result. Lower --lr.")
    terms = {n: float(f"{float(v.mean()):.5g}") for n, v in zip(names, values) if n != "loss"}
    fit = {"loss": round(float(losses.mean()), 4), "terms": terms,
           "acc": round(100 * correct / max(seen, 1), 2)}
    if lr is not None:
        fit["lr"] = float(lr)
    if started is not None:
        fit["s"] = round(time.time() - started, 3)
    return fit


# -------------------------------------------------------------------------------- evaluation
def autocast(device):
    """The one precision switch: bf16 autocast on CUDA (learned tensors stay fp32), fp32 elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def evaluate(model, loader) -> dict:
    """Top-1 accuracy in %, micro-averaged over the test items (Dassl's evaluator), and the mean
    cross-entropy (a continuous number: two evaluations that agree on it used the same model).
    model(x, text_features) -> logits [B, C]; model.class_text_features() -> [C, D], or None when the
    text side depends on the image. loader: batches of (images or frozen features, labels)."""
    model.eval()
    device = next(model.parameters()).device
    correct = total = loss = 0
    with autocast(device):
        text_features = model.class_text_features()  # once per evaluation, not per test batch
        for x, labels in tqdm(loader, desc="eval", leave=False):
            logits = model(x.to(device), text_features)
            correct += (logits.argmax(-1) == labels.to(device)).sum().item()
            loss += torch.nn.functional.cross_entropy(logits.float(), labels.to(device), reduction="sum").item()
            total += len(labels)
    return {"acc": 100.0 * correct / max(total, 1), "loss": loss / max(total, 1), "n": total}


@torch.no_grad()
def encode_images(encode: Callable, loader, device):
    """Image features of a whole split, once: encode(images) -> [B, D] for every batch; returns
    ([N, D] float, labels [N]) on the device."""
    features, labels = [], []
    for images, y in tqdm(loader, desc="image features", leave=False):
        with autocast(device):
            features.append(encode(images.to(device)))
        labels.append(y)
    return torch.cat(features), torch.cat(labels).to(device)


def training_batches(task, items, args, device, frozen=None, images=True):
    """A run's training batches. With task.benchmark.augment (real data): train_batches' (images,
    labels) on `device`, a new random crop of each image every epoch. Without (the world) every image
    is one fixed tensor, so what a frozen encoder makes of it is computed once (exact): batches of
    (images, labels, frozen(images)), or (frozen(images), labels) with images=False, or (images,
    labels) with no `frozen`; shuffled by `.generator` (seeded with --seed, checkpointed)."""
    benchmark, backbone = task.benchmark, task.backbone
    if benchmark.augment:
        return train_batches(items, benchmark, backbone, args.batch_size, args.seed, args.workers, device)
    print(f"no training augmentation on {args.dataset}: the {len(items)} training images and what the "
          "frozen encoder makes of them are computed once (exact)")
    plain = make_loader(items, benchmark, backbone, False, args.test_batch_size, args.seed, args.workers)
    pixels, labels = (torch.cat(t) for t in zip(*plain))
    features, size = None, args.test_batch_size
    if frozen is not None:
        with torch.no_grad():
            features, _ = encode_images(frozen, zip(pixels.split(size), labels.split(size)), device)
    tensors = [t for t in ((pixels, labels, features) if images else (features, labels)) if t is not None]
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(*tensors), batch_size=args.batch_size, shuffle=True,
        drop_last=len(labels) >= args.batch_size, generator=torch.Generator().manual_seed(args.seed))


def feature_batches(split, backbone, args, device, frozen) -> list:
    """A test split's batches of (frozen(images) [B, D], labels), the features computed once."""
    features, labels = encode_images(frozen, split_loader(split, backbone, args), device)
    return list(zip(features.split(args.test_batch_size), labels.split(args.test_batch_size)))


def zero_shot_accuracy(backbone, classnames, template, batches) -> float:
    """The zero-shot row: CLIP's accuracy in % with the hand-written `template` on these batches."""
    return evaluate(ZeroShotCLIP(backbone.model, backbone.tokenize, classnames, template), batches)["acc"]


class ZeroShotCLIP(torch.nn.Module):
    """The zero-shot row: CLIP's own text path on a hand-written template, e.g. "a photo of a {}."."""

    def __init__(self, clip, tokenize, classnames, template):
        super().__init__()
        self.clip, self.tokenize, self.classnames, self.template = clip, tokenize, classnames, template

    def class_text_features(self):
        ids = self.tokenize([self.template.format(c.replace("_", " ")) for c in self.classnames])
        features = self.clip.encode_text(ids.to(self.clip.logit_scale.device)).float()
        return torch.nn.functional.normalize(features, dim=-1)

    def forward(self, x, text_features=None):
        """x: images [B, 3, H, W], or their normalised features [B, D]."""
        if x.dim() != 2:
            x = torch.nn.functional.normalize(self.clip.encode_image(x).float(), dim=-1)
        text_features = self.class_text_features() if text_features is None else text_features
        return self.clip.logit_scale.exp() * x @ text_features.t()


# -------------------------------------------------------------------------------- results
def print_results(title: str, rows: dict, columns: list) -> None:
    """The results table of a run: one row per model ({name: {column: accuracy}}), '-' where none."""
    width = {c: max(12, len(c) + 1) for c in columns}
    names = max(16, max(len(name) for name in rows) + 1)
    print(f"\n{title}\n{'':{names}}" + "".join(f"{c:>{width[c]}}" for c in columns))
    for name, row in rows.items():
        cells = [f"{row[c]:{width[c]}.2f}" if row.get(c) is not None else f"{'-':>{width[c]}}" for c in columns]
        print(f"{name:{names}}" + "".join(cells))


def result_record(method: str, args, task: Task, rows: dict, ours: str, splits: dict, test_loss: dict,
                  **more) -> dict:
    """The record of a run (results.json, one line of results.jsonl): the accuracies of rows[ours] per
    protocol column, the zero-shot row, each split's class count and test loss, and the args. Adds the
    harmonic mean to every row that has base and new, and prints the table."""
    benchmark, backbone = task.benchmark, task.backbone
    for row in rows.values():
        row["hm"] = harmonic_mean(row["base"], row["new"]) if "new" in row else None
        if benchmark.mean_of and all(s in row for s in benchmark.mean_of):  # e.g. DomainNet's test domains
            row["mean"] = statistics.fmean(row[s] for s in benchmark.mean_of)
    extra = [*benchmark.shifts, *benchmark.groups, *(["mean"] if benchmark.mean_of else [])]
    head = ["base", "new", "hm"] if args.protocol == "base2new" else ["all"]
    shots = f"{args.shots} shots" if args.shots else "all shots"
    print_results(f"{dataset_name(args.dataset)} ({args.protocol}), {shots}, seed {args.seed}, epoch "
                  f"{args.epochs}, {backbone.name}/{backbone.pretrained}", rows, [*head, *extra, *task.targets])
    row = rows[ours]
    return dict(method=method, protocol=args.protocol, dataset=dataset_name(args.dataset), backbone=backbone.name,
                pretrained=backbone.pretrained, shots=args.shots, seed=args.seed, epoch=args.epochs,
                base=row.get("base"), new=row.get("new"), hm=row["hm"], all=row.get("all"),
                shifts={s: row[s] for s in extra if s in row},
                transfer={t: row[t] for t in task.targets if t in row}, zero_shot=rows["zero-shot CLIP"],
                test_loss=test_loss, classes={split: len(names) for split, (_, names, _) in splits.items()},
                **more, args=vars(args))


def finish_run(out: Path, record: dict, args, start_time: float) -> dict:
    """Record a finished run: results.json, the metrics in its checkpoint, and one line of the results
    file (--evaluate: RUN_DIR/eval.json only, the run's own results stay as they are)."""
    if args.evaluate:
        atomic_write_text(json.dumps(record, indent=2), out / "eval.json")
        print(f"wrote {out / 'eval.json'}")
        return record
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    record["train"] = checkpoint["train"]  # the last epoch's training loss, its terms, accuracy (%)
    record["wall_s"] = round(time.time() - start_time, 1)
    record["train_s"] = round(sum(e.get("s", 0) for e in read_log(out)), 1)  # the epochs' own time
    atomic_write_text(json.dumps(record, indent=2), out / "results.json")
    atomic_save({**checkpoint, "metrics": record}, out / "checkpoint.pt")
    append_result(Path(args.results_file or out.parent / "results.jsonl"), record)
    print(f"wrote {out / 'results.json'}, {out / 'checkpoint.pt'}")
    return record


# -------------------------------------------------------------------------------- epoch curves
def log_curve(run_dir, key: str) -> list:
    """[(epoch, value)] of `key` in a run's log.jsonl ('loss', 'acc', 'lr', or a term as 'terms.ce')."""
    epochs = read_log(run_dir)
    require(epochs, f"{run_dir}: no log.jsonl (a run folder of a method file holds one, a line per epoch)")
    points = []
    for record in epochs:
        value = record
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        require(value is not None, f"{run_dir}/log.jsonl: epoch {record.get('epoch')} has no {key!r}; it has "
                f"{', '.join([*record, *('terms.' + t for t in record.get('terms', {}))])}")
        points.append((record["epoch"], float(value)))
    return points


def plot_logs(run_dirs, key: str = "loss", width: int = 640, height: int = 360) -> str:
    """An SVG line plot (no plotting library needed) of `key` per epoch, one line per run folder."""
    curves = {str(run): log_curve(run, key) for run in run_dirs}
    xs = [x for c in curves.values() for x, _ in c]
    ys = [y for c in curves.values() for _, y in c]
    (x0, x1), (y0, y1) = (min(xs), max(xs)), (min(ys), max(ys))
    left, right, top, bottom = 60, width - 170, 20, height - 40

    def at(x, y):  # data -> pixels (y grows downwards)
        u = left + (x - x0) / ((x1 - x0) or 1) * (right - left)
        return f"{u:.1f},{bottom - (y - y0) / ((y1 - y0) or 1) * (bottom - top):.1f}"
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
           f'<polyline points="{left},{top} {left},{bottom} {right},{bottom}" fill="none" stroke="black"/>',
           f'<text x="{left - 5}" y="{top + 4}" text-anchor="end">{y1:.4g}</text>',
           f'<text x="{left - 5}" y="{bottom}" text-anchor="end">{y0:.4g}</text>',
           f'<text x="{left}" y="{bottom + 16}" text-anchor="middle">{x0}</text>',
           f'<text x="{right}" y="{bottom + 16}" text-anchor="middle">{x1}</text>',
           f'<text x="{(left + right) / 2}" y="{height - 8}" text-anchor="middle">epoch</text>',
           f'<text x="{left - 5}" y="{(top + bottom) / 2}" text-anchor="end">{key}</text>']
    for i, (name, curve) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        points = " ".join(at(x, y) for x, y in curve)
        out.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        label = name.rstrip("/").split("/")[-1].replace("&", "&amp;").replace("<", "&lt;")
        out.append(f'<text x="{right + 10}" y="{top + 16 * i + 4}" fill="{colour}">{label}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"


# ==================================================================================================
# 9. Prediction: a finished run as a classifier (--predict RUN_DIR IMAGE..., a method's load_classifier)
# ==================================================================================================


@dataclass
class Run:
    """A finished run as prediction reads it: its folder, saved settings, learned tensors, backbone
    (on `device`), training class names and hand-written template."""
    folder: Path
    args: argparse.Namespace
    learned: dict
    backbone: Backbone
    classnames: list
    template: str
    device: torch.device


def load_run(run_dir, device=None) -> Run:
    """Read a finished run folder (its checkpoint and RUN_CLASSES) and load its backbone on `device`
    (default: cuda if present)."""
    folder = Path(run_dir)
    if not folder.is_dir():
        raise MissingFileError(f"{run_dir}: no such run folder (the folder a method file's run wrote: "
                               "runs/<method>-<dataset>-... or its --output-dir)")
    saved = load_checkpoint(folder / "checkpoint.pt")
    args = argparse.Namespace(**saved["args"])
    require(saved["epoch"] >= args.epochs, f"{folder} stopped after epoch {saved['epoch']} of {args.epochs}: "
            f"finish it with --resume {folder}")
    require((folder / RUN_CLASSES).exists(), f"{folder} has no {RUN_CLASSES} (its class names and template, "
            "written when its training starts): not a run folder of these method files")
    device = run_device(device)
    backbone = load_backbone(args.model, args.pretrained, device)
    names = json.loads((folder / RUN_CLASSES).read_text())
    classnames, template = names["classnames"], names["template"]
    return Run(folder, args, saved["learned"], backbone, classnames, template, device)


class RunClassifier:
    """A trained run as a plain callable: classifier(images) -> probabilities [N, C] over
    classifier.classnames (the run's training classes, or any names assigned to it). images: PIL
    images or image paths (opened and transformed as the evaluation does, make_transform(train=False)),
    or a batch [N, 3, S, S] already transformed. `model` follows data.evaluate's contract (model(x,
    text_features) -> logits, or log-probabilities); text_features(classnames) gives its second
    argument, computed once per call as the evaluation does once per test split."""

    def __init__(self, model, run: Run, text_features: Callable, classnames=None, batch_size: int = 100):
        mine = {name for name, p in model.named_parameters() if p.requires_grad}
        require(mine == set(run.learned), f"{run.folder} was not trained by this method file (its learned "
                f"tensors: {', '.join(sorted(run.learned)[:3])}, ...): predict with the file that trained it")
        load_learned(model, run.learned)
        self.model, self.run, self.text_features, self.batch_size = model.eval(), run, text_features, batch_size
        self.transform = make_transform(run.backbone, train=False)
        self.classnames = run.classnames if classnames is None else classnames

    @property
    def classnames(self) -> list:
        return self._classnames

    @classnames.setter
    def classnames(self, names) -> None:
        names = [str(n).strip() for n in names]
        twice = [n for n in names if names.count(n) > 1]
        require(len(names) >= 2 and all(names) and not twice, f"class names must be two or more distinct, "
                f"non-empty names, got {names[:5]}{' ...' if len(names) > 5 else ''}")
        check_prompts(self.run.backbone, names, self.run.template)
        self._classnames = names

    def _batches(self, images):
        if torch.is_tensor(images):
            yield from images.split(self.batch_size)
            return
        images = list(images)
        for i in range(0, len(images), self.batch_size):
            yield torch.stack([self.transform(im.convert("RGB") if isinstance(im, Image.Image) else open_rgb(im))
                               for im in images[i:i + self.batch_size]])

    @torch.no_grad()
    def __call__(self, images) -> torch.Tensor:
        device = self.run.device
        with autocast(device):
            features = self.text_features(self.classnames)
            logits = [self.model(x.to(device), features).float() for x in self._batches(images)]
        return torch.cat(logits).softmax(-1).cpu()


def read_classes(value: str) -> list:
    """--classes: names separated by commas, or a file of one name per line ('folder<TAB>name' lines,
    as a folder's classnames.txt, give the name)."""
    if Path(value).expanduser().is_file():
        lines = Path(value).expanduser().read_text(encoding="utf-8").splitlines()
        return [line.split("\t")[-1].strip() for line in lines if line.strip()]
    return [name.strip() for name in value.split(",") if name.strip()]


def image_files(paths) -> list:
    """The image files among `paths` (a folder: its images, sorted, subfolders included); one line for
    a path that does not exist or a file that is not an image."""
    files, extensions = [], _image_extensions()
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(Path(top) / f for top, _, names in os.walk(p) for f in names if not f.startswith("."))
            files += [str(f) for f in found if f.suffix.lower() in extensions]
            continue
        if not p.exists():
            raise MissingFileError(f"{p}: no such image or folder")
        require(p.suffix.lower() in extensions, f"{p} is not an image (by its extension): give image files "
                "or folders of them after the run folder")
        files.append(str(p))
    require(files, f"no images in {', '.join(map(str, paths))}")
    return files


def predict(args, load_classifier: Callable) -> torch.Tensor:
    """--predict RUN_DIR IMAGE...: print each image's --top-k classes with their probabilities, among
    the run's training classes or --classes. load_classifier(run_dir, classnames, device): the
    method file's. Returns the probabilities [N, C]."""
    run_dir, *paths = args.predict
    require(paths, "--predict RUN_DIR IMAGE...: name images (or folders of them) after the run folder")
    if not Path(run_dir).is_dir():
        load_run(run_dir)  # its one line, before the images'
    check_int("--top-k", args.top_k, 1)
    files = image_files(paths)
    classifier = load_classifier(run_dir, read_classes(args.classes) if args.classes else None, args.device)
    probs = classifier(files)
    top = probs.topk(min(args.top_k, probs.shape[1]), dim=-1)
    for path, values, indices in zip(files, top.values.tolist(), top.indices.tolist()):
        lines = [f"  {100 * p:6.2f} %  {classifier.classnames[i]}" for p, i in zip(values, indices)]
        print("\n".join([path, *lines]))
    return probs


# ==================================================================================================
# The command line: python data.py table [RUNS_DIR]; plot RUN_DIR...
# ==================================================================================================

def _cmd_table(argv) -> None:
    parser = argparse.ArgumentParser(prog="data.py table", description="mean ± std table of a runs folder")
    parser.add_argument("runs_dir", nargs="?", default="runs", help="folder searched recursively for *.jsonl "
                        "result files (default: runs, where the method files' default --results-file is)")
    args = parser.parse_args(argv)
    records = read_results(args.runs_dir)
    if not records:
        where = "" if Path(args.runs_dir).is_dir() else " (no such folder)"
        raise UsageError(f"no results (*.jsonl) under {args.runs_dir}{where}. A method run appends one line to "
                         "<output-dir>/../results.jsonl (runs/results.jsonl by default) or to --results-file; "
                         "pass the folder that holds it.")
    print(results_table(records))


def _cmd_plot(argv) -> None:
    parser = argparse.ArgumentParser(prog="data.py plot", description="an epoch curve of run folders, as SVG")
    parser.add_argument("run_dirs", nargs="+", help="run folders (each holds log.jsonl)")
    parser.add_argument("--key", default="loss", help="loss, acc, lr or a term of the loss, e.g. terms.ce")
    parser.add_argument("--out", default="curves.svg", help="the SVG file to write (default curves.svg)")
    args = parser.parse_args(argv)
    atomic_write_text(plot_logs(args.run_dirs, args.key), args.out)
    print(f"wrote {args.out}")


COMMANDS = {"table": _cmd_table, "plot": _cmd_plot}  # `python data.py <command> ...`


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        sys.exit(f"usage: python data.py {{{','.join(COMMANDS)}}} ...")
    try:
        COMMANDS[argv[0]](argv[1:])
    except UsageError as err:  # the user's mistake: one line, no traceback (as the method files do)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
