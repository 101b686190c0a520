"""train.cuda_graphs: the recognizer's training forward and backward captured once as CUDA graphs and replayed at
every step (torch.cuda.make_graphed_callables), so that a small model on a fast GPU no longer waits on the launch
of each of its hundreds of kernels. A graph replays fixed shapes: the canvas is fixed (preproc.*), the batch is
train.batch_size, and a batch of another size (an epoch's shorter last one) runs eagerly. The loss, the gradient
clipping and the optimizer step stay eager."""
import logging

import torch

from utils import UserError

log = logging.getLogger("htr")


def check_cuda_graphs(cfg, device: torch.device, processes: int) -> None:
    """A clear error where train.cuda_graphs cannot apply: another device, shapes that change from batch to batch,
    or several processes."""
    if not cfg.train.cuda_graphs:
        return
    off = "or set train.cuda_graphs=false"
    if device.type != "cuda":
        raise UserError(f"train.cuda_graphs=true needs a CUDA GPU, and this run is on {device}: set device=cuda, {off}")
    if cfg.arch.audio.enabled:
        raise UserError("train.cuda_graphs=true replays fixed shapes, and arch.audio.enabled=true gives every batch "
                        f"readings of another length (dynamic shapes): train the audio model eagerly ({off})")
    if cfg.train.use_llm:
        raise UserError("train.cuda_graphs=true replays fixed shapes, and the LLM path (train.use_llm=true) feeds "
                        f"the LM texts of every length (dynamic shapes): train.use_llm=false, {off}")
    if processes > 1:
        raise UserError(f"train.cuda_graphs=true runs in one process, and this run has {processes}: launch one "
                        f"process (one GPU), {off}")


class GraphedForward:
    """The model's training forward (and so its backward), replayed from CUDA graphs for batches of the shape they
    were captured at (the first batch's); eager for any other shape, in eval mode or without gradients. The capture
    (its warm-up included) leaves the model's buffers (BatchNorm statistics) as they were. `capture` is
    torch.cuda.make_graphed_callables; the tests pass a stand-in to check this class on the CPU."""

    def __init__(self, model: torch.nn.Module, capture=None):
        self.model, self.capture = model, capture or torch.cuda.make_graphed_callables
        self.eager, self.graphed, self.shape = model.forward, None, None

    def __call__(self, images: torch.Tensor, *rest):
        if not (self.model.training and torch.is_grad_enabled()) or any(r is not None for r in rest):
            return self.eager(images, *rest)
        if self.graphed is None:
            self._capture(images)
        return self.graphed(images) if images.shape == self.shape else self.eager(images)

    def _capture(self, images: torch.Tensor) -> None:
        buffers = [(b, b.clone()) for b in self.model.buffers()]
        self.capture(self.model, (images.detach().clone(),))       # replaces model.forward with the graphed one
        self.graphed, self.model.forward = self.model.forward, self.eager
        for b, saved in buffers:
            b.copy_(saved)                                          # in place: the graphs hold these tensors
        self.shape = images.shape
        log.info("train.cuda_graphs: forward and backward captured for batches of shape %s; other shapes run "
                 "eagerly", tuple(images.shape))
