"""The hook that applies instance masks to one module's output (or input) units."""

from __future__ import annotations

import torch
from torch import nn

from .config import TurnoverConfig
from .context import TurnoverState, current_state
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
        paired = state.mode == "own" and getattr(state, "paired", False)
        n, rows = state.ids.numel() * (2 if paired else 1), x.shape[0]
        if rows != n and not (state.broadcast and rows == 1):
            raise RuntimeError(
                f"Turn-over layer {self.name!r} got {rows} rows but {n} instance ids"
                f"{' (own and flipped halves)' if paired else ''}. Something changed the batch size between "
                "the input and this layer (an adapter composition such as Parallel that replicates the "
                "batch?); turn-over masks need one id per row."
            )
        values = self._values(state, x.shape[self.unit_dim], x.device, x.dtype, paired)  # (n, d)
        shape = [n] + [1] * (x.dim() - 1)
        shape[self.unit_dim] = values.shape[1]
        return x * values.view(shape)

    def _values(
        self, state: TurnoverState, width: int, device: torch.device, dtype: torch.dtype, paired: bool
    ) -> torch.Tensor:
        config = self.config
        bits = keep_bits(
            state.ids.to(device),
            width,
            self.name,
            p=config.p,
            seed=config.seed,
            scheme=config.scheme,
            codebook_size=config.codebook_size,
            codebook_k=config.codebook_k,
        )  # (B, d)
        if paired:
            return torch.cat(
                [mask_values(bits, "own", config.p, dtype), mask_values(bits, "flip", config.p, dtype)]
            )
        return mask_values(bits, state.mode, config.p, dtype)

    def forward_hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return self.apply(module, output)

    def forward_pre_hook(self, module: nn.Module, args: tuple) -> tuple:
        return (self.apply(module, args[0]), *args[1:])

    def register(self, module: nn.Module) -> torch.utils.hooks.RemovableHandle:
        if self.where == "output":
            return module.register_forward_hook(self.forward_hook)
        return module.register_forward_pre_hook(self.forward_pre_hook)
