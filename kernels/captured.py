"""The captured training step: one CUDA graph per batch shape, replayed (CUDA only).

A method's step has fixed shapes (fixed batch size and class set), so its ~1,000 kernels can be
launched as one graph instead of one by one from Python: the step then takes about its GPU time
(kernels/README.md has the measurements). The method file's eager step is the readable form and the
fallback: `python coop.py --eager`, any CPU run, and a copy of a method file without kernels/ beside it
run that step as it is.

What a step must do to be captured (said here once; every method file's train_step does it):
- step(model, optimizer, *batch) -> tuple of tensors or of dicts of tensors (e.g. the loss and its
  terms, and the number correct), all on the device: nothing in it may wait for the host (no
  .item(), no Python branch on a tensor's value);
- the optimiser's lr lives in a device tensor that the schedule fills in place (torch.optim accepts a
  tensor lr; fused SGD and capturable Adam(W) read it on the GPU), so that each replay reads the
  epoch's or the step's value;
- random draws (dropout, sampled prompts) come from torch's CUDA generator, which graph capture
  registers: each replay draws fresh numbers, as the eager step would.
"""
import torch


class CapturedStep:
    """step(model, optimizer, *batch), recorded once per batch shape as a CUDA graph and replayed.

    Recording runs three warm-up steps on a side stream (the kernels pick their algorithms, the
    optimiser makes its state), after which the learned tensors and the optimiser state are put back
    as they were (state created by the warm-up is zeroed: the fresh state of SGD with dampening 0 and
    of Adam with capturable=True), then records one step into the graph."""

    def __init__(self, step, model, optimizer):
        self.step, self.model, self.optimizer, self.graphs = step, model, optimizer, {}

    def __call__(self, *batch):
        shapes = tuple(t.shape for t in batch)
        if shapes not in self.graphs:
            self.graphs[shapes] = self._record(batch)
        graph, inputs, outputs = self.graphs[shapes]
        for static, t in zip(inputs, batch):
            static.copy_(t, non_blocking=True)
        graph.replay()  # the outputs copied out of the graph's buffers (the next replay rewrites)
        return tuple({k: v.clone() for k, v in t.items()} if isinstance(t, dict) else t.clone()
                     for t in outputs)

    def warm_up(self, inputs, steps=3):
        """Run `steps` steps on `inputs`, then put the learned tensors and the optimiser state back."""
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

