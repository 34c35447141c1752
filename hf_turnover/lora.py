"""Turn-over masks on the rank units of LoRA modules: the ``r`` outputs of the A projection.

A LoRA update is ``scaling * B(A(x))``; masking its ``r`` rank units per instance gives each instance its own
rows of ``A`` and columns of ``B``, as a bottleneck adapter's units do for its down and up projections.

* **peft**: ``lora_A[adapter]`` is an ``nn.Linear`` whose outputs are the rank units, so the plain
  :class:`~hf_turnover.layer.TurnoverHook` masks them. Target ``PEFT_LORA_MODULES`` (``.*\\.lora_A\\.[^.]+``),
  and ``PEFT_HEAD_MODULES`` for the input of the classifier copy that peft trains.
* **adapters**: ``LoRA.forward`` computes ``dropout(x) @ A.T @ B.T`` in one expression, so its rank units have
  no module boundary. :class:`LoRARankHook` is a forward hook on the ``LoRA`` module that returns the output
  recomputed the way ``LoRA.forward`` computes it, with the rank units scaled per row; the module's own product
  is discarded, so no gradient of it reaches a flipped unit. Target ``ADAPTERS_LORA_MODULES``
  (``.*\\.loras\\.[^.]+``). Masked forwards compute the (small) LoRA product twice; "full" forwards keep the
  module's own output untouched.

Only plain LoRA keeps each instance's update on its own units: DoRA (its weight norm reads all of ``A`` and
``B``), merged weights (the LoRA modules are not called), adapters' fused-QKV layers (they compute the product
without calling the module), IA3, VeRA and MTL-LoRA are refused by :func:`make_hook` with the reason. LoRA
gating weights (``use_gating``) and a peft ``lora_B`` bias are shared by every instance, like a base layer's bias.

This file travels with Hub models as remote code: installed packages and sibling modules only.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from adapters.methods.lora import IA3, LoRA, LoRAMergedLinear, Vera
from torch import nn

from .config import TurnoverConfig
from .layer import TurnoverHook, UnitValues

ADAPTERS_LORA_MODULES = r".*\.loras\.[^.]+"
PEFT_LORA_MODULES = r".*\.lora_A\.[^.]+"
# The classifier of a peft sequence-classification model is a copy inside ModulesToSaveWrapper.
PEFT_HEAD_MODULES = r".*\.(classifier|score)\.modules_to_save\.[^.]+"


class LoRARankHook(TurnoverHook):
    """Masks the ``r`` rank units of an ``adapters`` ``LoRA`` module (``x @ A.T``, before ``B``).

    The forward hook recomputes ``LoRA.forward``'s ``(hidden_states, gate)`` output as
    ``((dropout(x) @ A.T) * m) @ B.T``, times the module's gate (``use_gating``) or its ``scaling``, where ``x`` is
    the ``hidden_states`` argument, or ``layer_input`` when that is ``None`` (adapters 1.3 ``LoRA.forward``).
    """

    def __init__(self, name: str, module: nn.Module, where: str, config: TurnoverConfig) -> None:
        if where != "output":
            raise ValueError(
                f"{name!r} is an adapters LoRA module; its rank units are masked as a target (target_modules), "
                "not as a head (head_modules)."
            )
        super().__init__(name, module, where, config)
        self.unit_dim = -1

    def register(
        self, module: nn.Module, values: UnitValues | None = None
    ) -> torch.utils.hooks.RemovableHandle:
        return module.register_forward_hook(partial(self._recompute, values=values), with_kwargs=True)

    def _recompute(
        self, module: LoRA, args: tuple, kwargs: dict, output: tuple, values: UnitValues | None = None
    ) -> tuple:
        names = ("hidden_states", "layer_input")
        inputs = {**dict(zip(names, args, strict=False)), **kwargs}
        hidden_states, layer_input = inputs["hidden_states"], inputs["layer_input"]
        x = layer_input if hidden_states is None else hidden_states  # (B, T, in)
        rank = module.lora_A.shape[0]
        scale = (values or self.mask)(module, x.shape[0], rank, x.device, output[0].dtype)
        if scale is None:
            return output
        units = module.lora_dropout(x) @ torch.t(module.lora_A)  # (B, T, r)
        shape = [scale.shape[0]] + [1] * (units.dim() - 2) + [rank]
        hidden = (units * scale.view(shape)) @ torch.t(module.lora_B)  # (n, T, out)
        gate = output[1]
        hidden = hidden * gate if module.use_gating else hidden * module.scaling
        return hidden, gate

    def positions(self, args: tuple, output: Any) -> int:
        hidden = output[0]  # (B, T, out): the positions of the rank units
        return max(1, hidden[0].numel() // hidden.shape[-1]) if hidden.dim() >= 2 else 1


def make_hook(model: nn.Module, name: str, where: str, config: TurnoverConfig) -> TurnoverHook:
    """The hook that masks module ``name`` of ``model``: :class:`LoRARankHook` for an ``adapters`` LoRA, else a
    :class:`~hf_turnover.layer.TurnoverHook`; LoRA set-ups whose units cannot be isolated are refused."""
    module = model.get_submodule(name)
    if isinstance(module, (LoRA, IA3, Vera)):
        _check_adapters_lora(model, name, module)
        return LoRARankHook(name, module, where, config)
    _check_peft_lora(model, name)
    return TurnoverHook(name, module, where, config)


def _parent(model: nn.Module, name: str, marker: str) -> tuple[nn.Module, str]:
    """The layer that owns the LoRA ``...<layer>.<marker>.<adapter>`` and the adapter's name."""
    layer, adapter = name.rsplit(f".{marker}.", 1)
    return model.get_submodule(layer), adapter


def _check_adapters_lora(model: nn.Module, name: str, module: nn.Module) -> None:
    if type(module) is not LoRA:
        raise ValueError(
            f"{name!r} is an adapters {type(module).__name__} module; turn-over masks the rank units of plain LoRA "
            "(adapters.LoRAConfig with composition_mode='add', no vera_d/vera_b, not MTL-LoRA) only."
        )
    if module.use_dora:
        raise ValueError(
            f"{name!r} uses DoRA: its weight norm reads every rank unit, so an instance would update the flipped "
            "units too. Use LoRAConfig(use_dora=False)."
        )
    layer, _ = _parent(model, name, "loras")
    if isinstance(layer, LoRAMergedLinear):
        raise ValueError(
            f"{name!r} sits in a fused QKV layer ({type(layer).__name__}), which computes the LoRA product without "
            "calling the LoRA module, so its rank units cannot be masked. Target LoRA on separate projections."
        )
    if getattr(layer, "merged", False):
        raise ValueError(
            f"The LoRA {name!r} is merged into its layer's weights; reset it (model.reset_adapter()) before "
            "adding turn-over masks."
        )


def _check_peft_lora(model: nn.Module, name: str) -> None:
    """peft layers: refuse variants (DoRA...) and merged weights; duck-typed, so peft is never imported."""
    if ".lora_A." not in name:
        return
    layer, adapter = _parent(model, name, "lora_A")
    variants = getattr(layer, "lora_variant", None) or {}  # DoRA and other variants; use_dora flags DoRA too
    if adapter in variants or (getattr(layer, "use_dora", None) or {}).get(adapter):
        variant = type(variants[adapter]).__name__ if adapter in variants else "DoRA"
        raise ValueError(
            f"The peft LoRA {name!r} uses a variant ({variant}) that reads its rank units outside lora_A, so an "
            "instance would update its flipped units too; turn-over masks plain LoRA only (e.g. "
            "LoraConfig(use_dora=False))."
        )
    if getattr(layer, "merged", False):
        raise ValueError(
            f"The peft LoRA {name!r} is merged into its layer's weights; unmerge it (model.unmerge_adapter()) "
            "before adding turn-over masks."
        )
