"""Compute only what depends on the masks.

Layers below the first masked layer do not depend on the training id. Scoring feeds the target as a batch of
one row and lets the first masked layer broadcast it against ``B`` masks (``turnover_context(...,
broadcast=True)``), so the unmasked prefix runs once per forward, not ``B`` times.

When every masked layer runs after the last attention, the rest of the network is position-wise and only the
positions the loss reads are needed: :func:`positionwise_entry` finds the outermost module there, and
:func:`keep_positions` slices its inputs to those positions.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

# Sequence classifiers that read the first position (the [CLS] pooler) and nothing else.
CLS_POOLED = {
    "bert",
    "roberta",
    "xlm-roberta",
    "camembert",
    "electra",
    "albert",
    "mpnet",
    "deberta",
    "deberta-v2",
}


def read_positions(model: nn.Module) -> list[int] | None:
    """Positions the classification loss reads, when known from the architecture; else None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if type(model).__name__.endswith("ForSequenceClassification") and model_type in CLS_POOLED:
        return [0]
    return None


def _is_attention_core(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return ("attention" in name and "output" not in name) or isinstance(module, nn.MultiheadAttention)


def positionwise_entry(
    model: nn.Module, inputs: dict[str, torch.Tensor], masked: Sequence[str]
) -> str | None:
    """The outermost module that starts after the last attention and contains the first masked module.

    Found by recording the order in which modules start during one forward. ``None`` when a masked module
    runs before or inside the last attention (nothing to slice).
    """
    order: list[str] = []
    handles = [
        module.register_forward_pre_hook(lambda m, a, name=name: order.append(name))
        for name, module in model.named_modules()
        if name
    ]
    try:
        with torch.inference_mode():
            model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    cores = [n for n in order if _is_attention_core(modules[n])]
    cores = [n for n in cores if not any(o != n and o.startswith(n + ".") for o in cores)]  # innermost
    first = min((order.index(n) for n in masked if n in order), default=None)
    if first is None:
        return None
    last_core = max((order.index(n) for n in cores), default=-1)
    name = order[first]
    parts = name.split(".")
    for depth in range(1, len(parts) + 1):  # outermost ancestor first
        candidate = ".".join(parts[:depth])
        start = order.index(candidate) if candidate in order else -1
        inside_core = any(candidate.startswith(c + ".") for c in cores)
        if start > last_core and not inside_core:
            return candidate
    return None


@contextmanager
def keep_positions(model: nn.Module, entry: str, positions: Sequence[int], length: int) -> Iterator[None]:
    """Slice every ``(B, length, ...)`` tensor argument of module ``entry`` to ``positions`` (dim 1)."""
    index = torch.tensor(list(positions))

    def hook(module, args, kwargs):
        def cut(x):
            if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] == length:
                return x.index_select(1, index.to(x.device))
            return x

        return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}

    handle = model.get_submodule(entry).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
