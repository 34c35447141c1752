"""Wide masked layers: many turn-over units where they cost least.

A single model's pairwise scores are mostly the luck of its masks unless there are many masked units: with ``d``
units the part of a score that the instance caused grows with ``d`` (``benchmarks/RESULTS.md``). A bottleneck
adapter in the top encoder layer is the cheapest place for many units: ``adapters`` accepts a per-layer
``reduction_factor``, so the top layer can hold thousands of units while the layers below get none.

    >>> config = wide_adapter_config(model.config)   # seq_bn, 4 x hidden units (1,536 for MiniLM), top layer only
    >>> model.add_adapter("task", config=config)       # then add_turnover(model) masks them

``benchmarks/RESULTS.md`` chose the default width: on MiniLM-L6 with N = 2,000 Rotten Tomatoes sentences,
1,536 units gave the best single-model LDS (0.13) of 384 / 1,536 / 6,144 at both learning rates tried.

This file travels with Hub models as remote code (``modeling_turnover.py`` imports it): installed packages only.
"""

from __future__ import annotations

from typing import Any

from adapters import AdapterConfig
from torch import nn
from transformers import AutoConfig, PretrainedConfig


def _model_config(source: PretrainedConfig | nn.Module | str) -> PretrainedConfig:
    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, nn.Module):
        return source.config
    return AutoConfig.from_pretrained(source)


def wide_adapter_config(
    model_config: PretrainedConfig | nn.Module | str,
    width: int | None = None,
    top_layers: int = 1,
    architecture: str = "seq_bn",
    lower_width: int | None = None,
    **overrides: Any,
) -> AdapterConfig:
    """An ``adapters`` bottleneck config with ``width`` units in the top encoder layer, ``lower_width`` in each of
    the ``top_layers - 1`` layers below it, and no adapter further down.

    Args:
        model_config: the backbone's config, the model, or a model id/folder.
        width: bottleneck units per adapter (the masked units: ``TurnoverConfig``'s default ``target_modules``
            masks every ``adapter_down``); default ``4 * hidden_size``.
        top_layers: encoder layers, counted from the top, that get an adapter.
        lower_width: units of the adapters below the top layer (default ``width``). They run at every position,
            where the top layer's run at the classifier's position only, so narrower ones cost less.
        architecture: ``"seq_bn"`` (Pfeiffer: after the feed-forward block) or ``"double_seq_bn"`` (Houlsby: also
            after attention, so two adapters per layer).
        overrides: other ``AdapterConfig`` fields (``non_linearity``, ``init_weights``...).
    """
    config = _model_config(model_config)
    layers, hidden = config.num_hidden_layers, config.hidden_size
    width = 4 * hidden if width is None else width
    lower_width = width if lower_width is None else lower_width
    for name, value in (("width", width), ("lower_width", lower_width)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int (bottleneck units), got {value!r}.")
    if not isinstance(top_layers, int) or not 1 <= top_layers <= layers:
        raise ValueError(
            f"top_layers must be an int in [1, {layers}] (the model's layers), got {top_layers!r}."
        )
    # adapters builds int(hidden // reduction_factor) units; the half unit keeps float rounding off the floor.
    factor, lower = hidden / (width + 0.5), hidden / (lower_width + 0.5)
    factors = {str(index): lower for index in range(layers - top_layers, layers - 1)}
    return AdapterConfig.load(architecture).replace(
        reduction_factor={**factors, str(layers - 1): factor, "default": factor},
        leave_out=list(range(layers - top_layers)),
        **overrides,
    )
