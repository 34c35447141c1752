"""The sharding hooks: ``process_state`` (is this a multi-process launch?), ``shard_range`` (which ids a process
scores) and ``shardable``, the decorator that gives a scoring function of ``influence.py`` its ``distributed``
keyword and hands a multi-process call to the implementation that ``distributed.py`` registers with
``implements``. Both modules import this one, and only ``distributed.py`` imports the other: no import cycle.

This file travels with Hub models as remote code: installed packages and sibling modules only.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

_IMPLEMENTATIONS: dict[str, Callable] = {}

_DOC = """
    Multi-process: with ``distributed=True`` under ``accelerate launch --num_processes K``, every process
    scores a shard of the training ids and every process returns the gathered result, the same scores as
    one process, bit for bit on the CPU (see :mod:`hf_turnover.distributed`). Every process must make the call.
"""


def process_state() -> Any | None:
    """The ``accelerate.PartialState`` of a multi-process launch, or ``None`` when there is one process."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # A launch without an accelerator (or with --cpu) runs its processes on the CPU with gloo.
    accelerator = (
        torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    )
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not accelerator)
    return state if state.num_processes > 1 else None


def shard_range(n: int, rank: int, world: int, unit: int = 1) -> tuple[int, int]:
    """``[start, stop)`` of the ``rank``-th of ``world`` contiguous shards of ``n`` items, cut at multiples of
    ``unit`` (the earlier shards get one unit more when the units do not divide evenly)."""
    units = -(-n // unit)
    base, extra = divmod(units, world)
    start = rank * base + min(rank, extra)
    stop = start + base + (rank < extra)
    return min(n, start * unit), min(n, stop * unit)


def implements(name: str) -> Callable[[Callable], Callable]:
    """Register ``function(state, ...)`` as the multi-process implementation of the scoring function ``name``."""

    def register(function: Callable) -> Callable:
        _IMPLEMENTATIONS[name] = function
        return function

    return register


def shardable(function: Callable) -> Callable:
    """Give a scoring function a ``distributed`` keyword (default ``False``: the single-process function)."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(*args: Any, distributed: bool = False, **kwargs: Any):
        state = process_state() if distributed else None
        if state is None:
            return function(*args, **kwargs)
        if function.__name__ not in _IMPLEMENTATIONS:
            raise RuntimeError(
                f"No multi-process {function.__name__} is registered: import hf_turnover (or, in remote code, "
                "its distributed module) before calling it with distributed=True."
            )
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        arguments.update(arguments.pop("kwargs", {}))
        positional = [arguments.pop(n) for n in ("model", "train_dataset", "targets") if n in arguments]
        return _IMPLEMENTATIONS[function.__name__](state, *positional, **arguments)

    wrapper.__doc__ = (function.__doc__ or "") + _DOC
    return wrapper
