"""Per-call turn-over state: which instances the rows of the batch are, and which sub-network to run.

The state travels in a context, like ``adapters``' ``ForwardContext``, so no library forward changes
signature. Inside ``turnover_context(ids, mode)``, masked layers scale row ``r`` by the ``mode`` mask of
instance ``ids[r]``. Outside any context a masked layer runs the full network in eval mode and raises in
train mode, so training without ids is never silently unmasked.

The state lives in a ``ContextVar`` and also in a process-wide fallback that other threads read: the autograd
engine's device threads re-run checkpointed forwards during ``backward()`` and must see the same masks.
One training context per process at a time is therefore supported.

Both live in one holder per process (``sys.modules["_hf_turnover_state"]``), shared by every copy of this
module: a model loaded with ``trust_remote_code=True`` runs its own copy (``transformers_modules...``), and
``hf_turnover.turnover_context`` must reach its layers all the same. Layers read the state by attribute only.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from .masks import MASK_MODES, MAX_INSTANCE_ID


@dataclass(frozen=True, eq=False)  # compared by identity: leaving a context removes exactly its state
class TurnoverState:
    ids: torch.Tensor  # (B,) int64
    mode: str
    # Let a batch-1 activation broadcast against B masks: layers below the first masked one run once.
    broadcast: bool = False
    # Mode "own" only: rows [0, B) run the own masks of ``ids`` and rows [B, 2B) their flipped masks.
    paired: bool = False


def _shared_holder() -> types.ModuleType:
    """The process's one holder of the context variable and the fallback stack (created by the first copy)."""
    holder = sys.modules.get("_hf_turnover_state")
    if holder is None:
        holder = types.ModuleType(
            "_hf_turnover_state", "Turn-over state shared by every copy of hf_turnover."
        )
        holder.context = ContextVar("turnover_state", default=None)
        holder.process = []
        holder = sys.modules.setdefault("_hf_turnover_state", holder)
    return holder


_SHARED = _shared_holder()
_STATE: ContextVar[TurnoverState | None] = _SHARED.context
_PROCESS_STATE: list[TurnoverState] = _SHARED.process


def as_instance_ids(ids: torch.Tensor | Sequence[int], name: str = "instance ids") -> torch.Tensor:
    """Validate ids (integers in [0, 2**62)) and return them as a 1-D int64 tensor."""
    if not isinstance(ids, torch.Tensor):
        bad = [v for v in ids if isinstance(v, bool) or not isinstance(v, int)]
        if bad:
            raise TypeError(
                f"{name} must be integers, got {bad[0]!r} ({type(bad[0]).__name__}). Store ids as an integer "
                "column, e.g. dataset.cast_column(..., datasets.Value('int64'))."
            )
        if any(v < 0 or v >= MAX_INSTANCE_ID for v in ids):
            bad_value = next(v for v in ids if v < 0 or v >= MAX_INSTANCE_ID)
            raise ValueError(f"{name} must lie in [0, 2**62), got {bad_value}.")
        ids = torch.tensor(list(ids), dtype=torch.int64)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(
            f"{name} must be an integer tensor, got dtype {ids.dtype}. Floats lose ids above 2**24; store ids "
            "as int64."
        )
    ids = ids.reshape(-1).to(torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= MAX_INSTANCE_ID):
        bad_value = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise ValueError(f"{name} must lie in [0, 2**62), got {bad_value}.")
    return ids


@contextmanager
def turnover_context(
    ids: torch.Tensor | Sequence[int], mode: str = "own", broadcast: bool = False, paired: bool = False
) -> Iterator[TurnoverState]:
    """Run masked layers with the ``mode`` masks ("own", "flip" or "full") of the instances ``ids``.

    Row ``r`` of every masked activation is scaled by the mask of ``ids[r]``. With ``broadcast=True`` a batch
    of one row is expanded to ``len(ids)`` rows at the first masked layer (one target against many
    instances, computing the unmasked layers once). With ``paired=True`` (mode "own") the batch has ``2B``
    rows: the own masks of ``ids``, then their flipped masks, so one forward gives both losses of an influence
    score; a broadcast batch-1 input expands to ``2B`` rows.
    """
    if mode not in MASK_MODES:
        raise ValueError(f"Unknown turn-over mode {mode!r}; use one of {MASK_MODES}.")
    if paired and mode != "own":
        raise ValueError(f"paired=True runs own and flipped masks together; use mode='own', not {mode!r}.")
    state = TurnoverState(as_instance_ids(ids), mode, broadcast, paired)
    token = _STATE.set(state)
    _PROCESS_STATE.append(state)
    try:
        yield state
    finally:
        _PROCESS_STATE.remove(state)
        _STATE.reset(token)


def current_state() -> TurnoverState | None:
    """The innermost active state of this context, else of the process (autograd threads), else None."""
    state = _STATE.get()
    if state is None and _PROCESS_STATE:
        state = _PROCESS_STATE[-1]
    return state
