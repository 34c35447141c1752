"""The hook that applies instance masks to one module's output (or input) units."""

from __future__ import annotations

import torch
from torch import nn

from .config import TurnoverConfig
from .context import current_state
from .masks import keep_bits, mask_values

_CHANNEL_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class TurnoverHook:
    """Scales the units of one module per row by the current instances' masks.

    ``where="output"`` masks the module's output units (``nn.Linear`` features, bottleneck units of an adapter,
    ``nn.Conv*`` channels); ``where="input"`` masks the units entering it (a classification head). Masks
    broadcast over every other dimension (sequence positions, pixels).
    """

    def __init__(self, name: str, module: nn.Module, where: str, config: TurnoverConfig) -> None:
        self.name = name
        self.where = where
        self.config = config
        self.unit_dim = 1 if isinstance(module, _CHANNEL_FIRST) and where == "output" else -1

    def apply(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        state = current_state()
        if state is None:
            if module.training:
                raise RuntimeError(
                    f"Turn-over layer {self.name!r} ran in training mode without instance ids. Train with "
                    "hf_turnover.TurnoverTrainer, or wrap the forward and backward in "
                    "`with hf_turnover.turnover_context(instance_ids):`."
                )
            return x
        if state.mode == "full":
            return x
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Turn-over layer {self.name!r} got a {type(x).__name__}, expected a tensor.")
        n, rows = state.ids.numel(), x.shape[0]
        if rows != n and not (state.broadcast and rows == 1):
            raise RuntimeError(
                f"Turn-over layer {self.name!r} got {rows} rows but {n} instance ids. Something changed the "
                "batch size between the input and this layer (an adapter composition such as Parallel that "
                "replicates the batch?); turn-over masks need one id per row."
            )
        width = x.shape[self.unit_dim]
        bits = keep_bits(
            state.ids.to(x.device),
            width,
            self.name,
            p=self.config.p,
            seed=self.config.seed,
            scheme=self.config.scheme,
            codebook_size=self.config.codebook_size,
            codebook_k=self.config.codebook_k,
        )  # (n, d)
        values = mask_values(bits, state.mode, self.config.p, x.dtype)
        shape = [n] + [1] * (x.dim() - 1)
        shape[self.unit_dim] = width
        return x * values.view(shape)

    def forward_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.apply(module, output)

    def forward_pre_hook(self, module: nn.Module, args: tuple) -> tuple:
        return (self.apply(module, args[0]), *args[1:])

    def register(self, module: nn.Module) -> torch.utils.hooks.RemovableHandle:
        if self.where == "output":
            return module.register_forward_hook(self.forward_hook)
        return module.register_forward_pre_hook(self.forward_pre_hook)
