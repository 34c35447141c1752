"""Inject turn-over masks into a model by module name (peft style), and remove them again."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from .config import CONFIG_KEY, TurnoverConfig
from .layer import TurnoverHook
from .lora import make_hook

_HOOKS_ATTR = "_turnover_hooks"


def _matches(name: str, patterns: str | Sequence[str] | None) -> bool:
    """peft's rule: a string is a regex that must match the whole name; a list holds names or suffixes."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_modules(model: nn.Module, patterns: str | Sequence[str] | None, exclude=None) -> list[str]:
    """Names of the submodules of ``model`` matched by ``patterns`` and not by ``exclude``."""
    return [
        name
        for name, _ in model.named_modules()
        if name and _matches(name, patterns) and not _matches(name, exclude)
    ]


def _require_match(model: nn.Module, option: str, patterns, names: list[str]) -> None:
    if patterns is not None and not names:
        sample = [n for n, _ in model.named_modules() if n][-8:]
        raise ValueError(
            f"TurnoverConfig.{option}={patterns!r} matched no module of {type(model).__name__} (after "
            f"exclude_modules). Some module names: {sample}. Fix the pattern, add the adapters first "
            f"(adapters.init(model); model.add_adapter(...)), or set {option}=None."
        )


def add_turnover(model: nn.Module, config: TurnoverConfig | None = None) -> nn.Module:
    """Patch ``model`` in place with turn-over masks and return it.

    Modules matched by ``config.target_modules`` get their output units masked (a LoRA module: its rank
    units, see :mod:`hf_turnover.lora`), modules matched by ``config.head_modules`` their input units. The config
    is stored in ``model.config.turnover`` (so ``save_pretrained`` writes it into ``config.json``) when the model
    has a Hugging Face config.
    """
    config = config or TurnoverConfig()
    if getattr(model, _HOOKS_ATTR, None):
        raise ValueError(f"{type(model).__name__} already has turn-over layers; call remove_turnover first.")
    targets = find_modules(model, config.target_modules, config.exclude_modules)
    heads = find_modules(model, config.head_modules, config.exclude_modules)
    _require_match(model, "target_modules", config.target_modules, targets)
    _require_match(model, "head_modules", config.head_modules, heads)
    hooks = {}
    for name, where in [(n, "output") for n in targets] + [(n, "input") for n in heads]:
        hook = make_hook(model, name, where, config)
        hooks[name] = (hook, hook.register(model.get_submodule(name)))
    setattr(model, _HOOKS_ATTR, hooks)
    model.turnover_config = config
    if hasattr(model, "config"):
        setattr(model.config, CONFIG_KEY, config.to_dict())
    return model


def remove_turnover(model: nn.Module) -> nn.Module:
    """Remove the masks added by :func:`add_turnover`; the model computes exactly as before patching."""
    for _, handle in getattr(model, _HOOKS_ATTR, {}).values():
        handle.remove()
    for attr in (_HOOKS_ATTR, "turnover_config"):
        if hasattr(model, attr):
            delattr(model, attr)
    if hasattr(model, "config") and hasattr(model.config, CONFIG_KEY):
        delattr(model.config, CONFIG_KEY)
    return model


def turnover_layers(model: nn.Module) -> dict[str, str]:
    """``{module name: "output" | "input"}`` for every masked module of ``model`` (empty if unpatched)."""
    return {name: hook.where for name, (hook, _) in getattr(model, _HOOKS_ATTR, {}).items()}


def turnover_hooks(model: nn.Module) -> dict[str, TurnoverHook]:
    """``{module name: its TurnoverHook}`` (empty if unpatched)."""
    return {name: hook for name, (hook, _) in getattr(model, _HOOKS_ATTR, {}).items()}


def get_turnover_config(model: nn.Module) -> TurnoverConfig | None:
    """The config of a patched model, or the one saved in its ``config.json`` (``None`` if neither)."""
    if getattr(model, "turnover_config", None) is not None:
        return model.turnover_config
    saved = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    return TurnoverConfig.from_dict(saved) if saved else None


def load_turnover(model: nn.Module) -> nn.Module:
    """Re-apply the turn-over config saved in ``model.config`` (after ``from_pretrained``)."""
    config = get_turnover_config(model)
    if config is None:
        raise ValueError(
            f"{type(model).__name__} has no turn-over config (no 'turnover' key in its config.json). "
            "Patch it with hf_turnover.add_turnover(model, TurnoverConfig(...))."
        )
    return add_turnover(model, config)
