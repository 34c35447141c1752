"""The hook that applies instance masks to one module's output (or input) units."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import TurnoverConfig
from .context import TurnoverState, current_state
from .masks import keep_bits, mask_values

_CHANNEL_FIRST = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

# (module, rows, width, device, dtype) -> per-row unit values (n, width), or None for "leave the units alone".
UnitValues = Callable[[nn.Module, int, int, torch.device, torch.dtype], "torch.Tensor | None"]


class TurnoverHook:
    """Scales the units of one module per row by the current instances' masks.

    ``where="output"`` masks the module's output units (``nn.Linear`` features, bottleneck units of an adapter,
    ``nn.Conv*`` channels); ``where="input"`` masks the units entering it (a classification head). Masks
    broadcast over every other dimension (sequence positions, pixels).

    :meth:`register` can scale the same units by other per-row values (the linearized scorer's probes of ones):
    a subclass that masks units inside a module (LoRA's rank units) overrides :meth:`register` and
    :meth:`positions`, and every caller keeps working.
    """

    def __init__(self, name: str, module: nn.Module, where: str, config: TurnoverConfig) -> None:
        self.name = name
        self.where = where
        self.config = config
        self.unit_dim = 1 if isinstance(module, _CHANNEL_FIRST) and where == "output" else -1

    def mask(
        self, module: nn.Module, rows: int, width: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """Mask values ``(n, width)`` of this call's instances for ``rows`` activation rows, or ``None`` when the
        units stay as they are (mode "full", or no context in eval mode)."""
        state = current_state()
        if state is None:
            if module.training:
                raise RuntimeError(
                    f"Turn-over layer {self.name!r} ran in training mode without instance ids. Train with "
                    "hf_turnover.TurnoverTrainer, or wrap the forward and backward in "
                    "`with hf_turnover.turnover_context(instance_ids):`."
                )
            return None
        if state.mode == "full":
            return None
        paired = state.mode == "own" and getattr(state, "paired", False)
        n = state.ids.numel() * (2 if paired else 1)
        if rows != n and not (state.broadcast and rows == 1):
            raise RuntimeError(
                f"Turn-over layer {self.name!r} got {rows} rows but {n} instance ids"
                f"{' (own and flipped halves)' if paired else ''}. Something changed the batch size between "
                "the input and this layer (an adapter composition such as Parallel that replicates the "
                "batch?); turn-over masks need one id per row."
            )
        return self._values(state, width, device, dtype, paired)  # (n, d)

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

    def apply(self, module: nn.Module, x: torch.Tensor, values: UnitValues | None = None) -> torch.Tensor:
        """``x`` with its units scaled per row by ``values`` (default: this hook's masks)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"Turn-over layer {self.name!r} got a {type(x).__name__}, expected a tensor.")
        scale = (values or self.mask)(module, x.shape[0], x.shape[self.unit_dim], x.device, x.dtype)
        if scale is None:
            return x
        shape = [scale.shape[0]] + [1] * (x.dim() - 1)
        shape[self.unit_dim] = scale.shape[1]
        return x * scale.view(shape)

    def positions(self, args: tuple, output: Any) -> int:
        """Positions per row (tokens, pixels; 1 for a head) at the masked units, from one call's input and output."""
        x = output if self.where == "output" else args[0]
        if isinstance(x, torch.Tensor) and x.dim() >= 2:
            return max(1, x[0].numel() // x.shape[self.unit_dim])
        return 1

    def register(
        self, module: nn.Module, values: UnitValues | None = None
    ) -> torch.utils.hooks.RemovableHandle:
        """Scale ``module``'s units by ``values`` (default: this hook's masks) in every forward."""
        if self.where == "output":
            return module.register_forward_hook(lambda m, args, out: self.apply(m, out, values))
        return module.register_forward_pre_hook(lambda m, args: (self.apply(m, args[0], values), *args[1:]))
