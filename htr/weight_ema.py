"""An exponential moving average of the recognizer's weights (train.ema_decay), as timm's ModelEmaV3 and YOLO keep
one: the averaged copy is what a run validates, saves as best.pt and ships, while the optimizer steps the raw weights.

Built on torch.optim.swa_utils.AveragedModel with BatchNorm's running statistics averaged too (use_buffers). The
decay warms up as min(decay, (1 + n) / (10 + n)) after n updates, so the early average is not dominated by the random
initial weights (with 0.999 and no warm-up they would still weigh 74 % after 300 steps).
"""
import torch
from torch.optim.swa_utils import AveragedModel

from utils import UserError


def warm_decay(decay: float, updates: int) -> float:
    """The decay used for update number `updates` + 1."""
    return min(decay, (1 + updates) / (10 + updates))


class WeightEMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise UserError(f"train.ema_decay must be in (0, 1) (e.g. 0.999), or 0 for no average; got {decay}")
        self.decay = decay
        self.average = AveragedModel(model, multi_avg_fn=self._lerp, use_buffers=True).requires_grad_(False)

    def _lerp(self, averaged: list, current: list, num_averaged: torch.Tensor) -> None:
        """AveragedModel's update of one group of same-dtype tensors."""
        if not averaged[0].is_floating_point():                            # BatchNorm's num_batches_tracked
            torch._foreach_copy_(averaged, current)
            return
        d = warm_decay(self.decay, int(num_averaged))
        torch._foreach_lerp_(averaged, current, 1 - d)                     # averaged += (1 - d) (current - averaged)

    @property
    def module(self) -> torch.nn.Module:
        """The averaged recognizer (an HTRNet with the average's weights)."""
        return self.average.module

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """One more step into the average (the first copies the weights)."""
        self.average.update_parameters(model)

    @property
    def updates(self) -> int:
        return int(self.average.n_averaged)

    def restore(self, weights: dict, updates: int) -> None:
        """Continue the average saved as `weights` (a state_dict) after `updates` updates."""
        self.module.load_state_dict(weights)
        self.average.n_averaged.fill_(updates)
