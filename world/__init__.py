"""nanoprompt's built-in offline world: a procedural shapes universe and a tiny CLIP pretrained on it.

No machine of this project can download CLIP or a dataset, yet what the methods are for (gain on the
task, keep zero-shot generality) has to be shown with numbers. The world renders 8 shapes x 8
colours at two sizes on dull textured backgrounds from a seed; a tiny open_clip CLIP is pretrained
contrastively on clean "photo" renderings of 48 of the 64 colour-shape pairs; the downstream task
('shapes') lives in a shifted domain (shapes drawn as outlines), where zero-shot CLIP is weak, as
real CLIP is on EuroSAT or DTD: a prompt can gain there, and overfit.

  world/shapes.py     renderer, pretraining captions, the 'shapes...' benchmarks
  world/tiny_clip.py  the tiny CLIP: config, pretraining, checkpoint loader, zero-shot check
  world/__main__.py   `python -m world pretrain`, `python -m world zero-shot`

data.py imports these lazily, only when a 'shapes...' dataset or the 'tiny' backbone is asked for;
data.py and a method file run on real data without this folder. Design and history: world/README.md.
"""
