"""nanoprompt/data.py - everything that is not a method.

The one module shared by coop.py, promptsrc.py, vprompt.py and proreg.py. It never branches on a
method. Sections, top to bottom:

  1. small utilities (atomic writes, seeding, harmonic mean)
  2. backbones: open_clip models by name + pretrained tag (QuickGELU for OpenAI weights), and the
     built-in tiny CLIP of the offline world
  3. class names and prompt templates as CoOp uses them
  4. the real datasets of the CoOp protocol (CoOp folder layouts, split_zhou_*.json, torchvision
     downloads where they work) and the ImageNet variants for domain generalisation
  5. few-shot sampling, base/new split, transforms, loaders
  6. the built-in offline world (procedural shapes; tiny CLIP pretraining: `python data.py pretrain`)
  7. results: one JSON line per run, and `python data.py table RUNS_DIR` for the mean +- std table

API CONTRACT (used by the method files; keep these names and meanings):

  Item = (source, label, classname)      # source: a file path (str) or an int index (world)
  Benchmark(name, classnames, train, val, test, template, shifts, open_image, augment)
      classnames[label] is the name of label; train/val/test are lists of Item.
      shifts: {domain_name: list[Item]} extra test sets that share this benchmark's class names
              (world: other rendering styles; imagenet: the variants found on disk).
      open_image(source) -> PIL.Image in RGB.
      augment: True when the paper's random training augmentation applies (real datasets);
               False for the world (32 px shapes: a random crop would cut the shape away).
  load_dataset(name, root, download=False) -> Benchmark
  fewshot(items, shots, seed, cache=None) -> list[Item]
  subsample_classes(items, classnames, which) -> (items relabelled from 0, classnames)
  shift_items(items, classnames) -> items of a shifted test set restricted to `classnames`, relabelled
  Backbone(model, tokenize, name, pretrained, image_size, mean, std, template?)
  load_backbone(model, pretrained, device) -> Backbone
  default_backbone(dataset) -> (model, pretrained)
  make_loader(items, benchmark, backbone, train, batch_size, seed, workers) -> DataLoader of
      (images [B, 3, H, W] float normalised, labels [B] long)
  harmonic_mean(base, new); atomic_save(obj, path); atomic_write_text(text, path);
  append_result(path, record)
"""
