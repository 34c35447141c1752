"""Forward-only scoring of (target, training id) pairs under turn-over masks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack, nullcontext
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.utils import logging

from .context import turnover_context
from .inputs import LossFn, logits_of, per_row_loss
from .model import get_turnover_config, turnover_hooks, turnover_layers
from .reuse import (
    PrefixCache,
    keep_positions,
    read_positions,
    tail_entry,
    without_identity_repeats,
)

logger = logging.get_logger(__name__)

VARIANTS = ("own", "full")
# Rows x computed positions per forward when ``batch_size=None``. On the CPU about 4k keeps a tiny BERT's
# activations in cache (larger chunks ran 1.4-1.7x slower in benchmarks/speed/speed.py); a GPU wants larger ones.
ROW_POSITIONS_PER_FORWARD = {"cpu": 4096, "cuda": 131072}
PROGRESS_CHUNKS = 8  # chunks of ids from which an exact score shows a progress bar by default


def _show_progress(progress: bool | None, chunks: int) -> bool:
    if progress is None:
        return chunks >= PROGRESS_CHUNKS and logging.is_progress_bar_enabled()
    return progress


class TurnoverScorer:
    """Losses of one input under many instances' masks, with the unmasked prefix computed once.

    ``variant="own"`` scores ``L(flip) - L(own)`` (the paper's estimator); ``"full"`` scores ``L(flip) -
    L(full)`` (its footnote 4). Positive: the training instance helped, i.e. the loss is lower with it.

    ``batch_size`` is the number of training ids per forward (each gives an own and a flipped row); ``None``
    sizes it to the input: about ``ROW_POSITIONS_PER_FORWARD`` rows x positions computed past the first
    masked layer.
    """

    method = "exact"

    def __init__(
        self,
        model: nn.Module,
        *,
        variant: str = "own",
        batch_size: int | None = None,
        loss_fn: LossFn | None = None,
        forward_fn: Callable[[nn.Module, dict[str, torch.Tensor]], Any] | None = None,
        dtype: torch.dtype | None = None,
        positions: Sequence[int] | str | None = "auto",
        reuse_prefix: bool = True,
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} is unknown; use 'own' (the paper) or 'full' (footnote 4).")
        if not turnover_layers(model):
            raise ValueError(
                f"{type(model).__name__} has no turn-over layers, so there is no influence to read. Load a model "
                "trained with TurnoverTrainer (hf_turnover.load_turnover(model) after from_pretrained)."
            )
        if batch_size is not None and batch_size < 1:
            raise ValueError(
                f"batch_size must be >= 1 (or None to size chunks to the input), got {batch_size}."
            )
        self.model = model
        self.config = get_turnover_config(model)
        self.variant = variant
        self.batch_size = batch_size
        self.loss_fn = loss_fn or per_row_loss
        self.forward_fn = forward_fn or (lambda m, inputs: m(**inputs))
        self.dtype = dtype
        self.positions = read_positions(model) if positions == "auto" else positions
        self.device = next(model.parameters()).device
        self._entry_name: str | None | bool = False  # False: not probed yet
        self._positions_per_row: dict[tuple, int] = {}  # per input shape: positions at the masked layers
        # Record the unmasked prefix in a target's first chunk and replay it in the others; in self-influence,
        # record it in the own forward and replay it in the flipped one (checked once per scorer).
        self.reuse_prefix = reuse_prefix
        self._prefix_checked = False
        self._broadcast: bool | None = None  # None: not checked yet (see _broadcasts)

    def _autocast(self):
        if self.dtype is None or self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def losses(
        self,
        inputs: dict[str, torch.Tensor],
        labels: torch.Tensor,
        ids: torch.Tensor,
        mode: str = "own",
        *,
        broadcast: bool = True,
        paired: bool = False,
    ) -> torch.Tensor:
        """Per-row losses under the ``mode`` masks of ``ids``.

        ``broadcast``: ``inputs`` hold one row that runs under every id's mask, ``(len(ids),)``; with ``paired``,
        own and flipped losses ``(2, len(ids))`` from one forward of ``2 * len(ids)`` rows. Without
        ``broadcast``, row ``r`` of ``inputs`` is the instance ``ids[r]`` (self-influence), ``(len(ids),)``.
        """
        rows = (2 if paired else 1) * len(ids)
        if broadcast and not self._broadcasts(inputs):
            inputs, broadcast = repeat_rows(inputs, rows), False
        with turnover_context(ids, mode, broadcast=broadcast, paired=paired), self._autocast():
            loss = self.loss_fn(logits_of(self.forward_fn(self.model, inputs)), labels)
        loss = loss.expand(rows) if loss.numel() == 1 else loss
        return loss.view(2, len(ids)) if paired else loss

    @torch.inference_mode()
    def score(
        self,
        inputs: dict[str, torch.Tensor],
        labels: torch.Tensor,
        ids: torch.Tensor,
        progress: bool | None = False,
    ) -> torch.Tensor:
        """``I(target, z_i)`` for every id in ``ids`` (float32, on the CPU); ``inputs`` is one target row.

        ``progress``: a tqdm bar over the chunks of ids; ``None`` shows one when there are at least
        ``PROGRESS_CHUNKS`` chunks and transformers' progress bars are enabled
        (``transformers.utils.logging.disable_progress_bar()`` turns them off)."""
        self.model.eval()
        ids = ids.to(self.device)  # once: a host id tensor would be copied to the device in every layer
        scores = torch.empty(len(ids), dtype=torch.float32, device=self.device)
        with ExitStack() as stack:
            self._enter_fast_paths(stack, inputs)
            base = None
            if self.variant == "full":
                base = self.losses(inputs, labels, ids[:1], "full")
            step = self._ids_per_forward(inputs)
            prefix = None
            if self.reuse_prefix and self._broadcasts(inputs) and len(ids) > step:
                prefix = PrefixCache(self.model, list(turnover_layers(self.model)))
            starts = range(0, len(ids), step)
            bar = tqdm(total=len(ids), desc="Scoring training instances", unit="id",
                       disable=not _show_progress(progress, len(starts)))  # fmt: skip
            for start in starts:
                chunk = ids[start : start + step]
                if prefix is None:
                    scores[start : start + len(chunk)] = self._chunk(inputs, labels, chunk, base)
                else:
                    with prefix.replay() if start else prefix.record():
                        scores[start : start + len(chunk)] = self._chunk(inputs, labels, chunk, base)
                    if not start and not self._prefix_checked:
                        prefix = self._check_prefix(prefix, inputs, labels, chunk, base, scores[: len(chunk)])
                bar.update(len(chunk))
            bar.close()
        self._warn_if_unmasked(scores)
        return scores.cpu()

    def _broadcasts(self, inputs: dict[str, torch.Tensor]) -> bool:
        """Whether one input row run against many ids (broadcast at the first masked layer) gives what that row
        repeated gives; checked once per scorer. Masks inside a transformers attention do not broadcast (peft's
        LoRA on query/value: key and the attention's reshape keep one row), so such a model gets the row repeated
        up front instead, and the layers below the first masked one run per row."""
        if self._broadcast is None:
            ids = torch.tensor([0, 1], device=self.device)
            with turnover_context(ids, "own", paired=True), self._autocast():
                repeated = logits_of(self.forward_fn(self.model, repeat_rows(inputs, 4)))
            try:
                with turnover_context(ids, "own", broadcast=True, paired=True), self._autocast():
                    broadcast = logits_of(self.forward_fn(self.model, inputs))
                self._broadcast = broadcast.shape == repeated.shape and torch.allclose(
                    broadcast, repeated, rtol=1e-4, atol=1e-5
                )
            except RuntimeError:  # a layer that reshapes by its own input's batch size
                self._broadcast = False
            if not self._broadcast:
                logger.info(
                    f"{type(self.model).__name__} does not broadcast one input row against many masks at its "
                    "first masked layer; scoring repeats the row for every id instead (same scores, slower)."
                )
        return self._broadcast

    def _warn_if_unmasked(self, scores: torch.Tensor) -> None:
        if len(scores) > 1 and not scores.any():
            logger.warning_once(
                "Every influence score is exactly 0: the turn-over layers did not see the instance ids. A model "
                "loaded with trust_remote_code from a folder saved by an older hf_turnover keeps its own copy of "
                "the turn-over state: save it again with this version (hf_turnover.save_turnover_model)."
            )

    def _chunk(self, inputs, labels, chunk: torch.Tensor, base: torch.Tensor | None) -> torch.Tensor:
        if base is None:  # own and flip in one forward: the hash and the prefix run once
            own, flip = self.losses(inputs, labels, chunk, paired=True)
        else:
            own, flip = base, self.losses(inputs, labels, chunk, "flip")
        return (flip - own).float()

    def _check_prefix(self, prefix: PrefixCache, inputs, labels, chunk, base, expected) -> PrefixCache | None:
        """Replay once against the recorded forward; a model whose prefix has side effects falls back."""
        with prefix.replay():
            replayed = self._chunk(inputs, labels, chunk, base)
        return prefix if self._replay_matches(replayed, expected) else None

    def _replay_matches(self, replayed: torch.Tensor, computed: torch.Tensor) -> bool:
        """The once-per-scorer check of prefix replay; on a mismatch, stop replaying (and say so)."""
        self._prefix_checked = True
        if torch.allclose(replayed, computed, rtol=1e-4, atol=1e-5):
            return True
        self.reuse_prefix = False
        logger.warning(
            f"{type(self.model).__name__}: replaying the layers below the first masked one changed the scores "
            f"(max difference {float((replayed - computed).abs().max()):.3g}); they are recomputed for every "
            "forward from now on (slower, same scores)."
        )
        return False

    @torch.inference_mode()
    def self_scores(
        self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        """``I(z_i, z_i)`` for a batch of training rows, each under its own id.

        The layers below the first masked one run once for both losses: recorded in the first forward and
        replayed in the second.
        """
        self.model.eval()
        ids = ids.to(self.device)  # once, not in every masked layer
        other_mode = "full" if self.variant == "full" else "own"
        with ExitStack() as stack:
            self._enter_fast_paths(stack, inputs)
            if not self.reuse_prefix:
                other = self.losses(inputs, labels, ids, other_mode, broadcast=False)
                flip = self.losses(inputs, labels, ids, "flip", broadcast=False)
                return (flip - other).float().cpu()
            prefix = PrefixCache(self.model, list(turnover_layers(self.model)))
            with prefix.record():
                other = self.losses(inputs, labels, ids, other_mode, broadcast=False)
            with prefix.replay():
                flip = self.losses(inputs, labels, ids, "flip", broadcast=False)
            if not self._prefix_checked:
                computed = self.losses(inputs, labels, ids, "flip", broadcast=False)
                if not self._replay_matches(flip, computed):
                    flip = computed
        return (flip - other).float().cpu()

    def _enter_fast_paths(self, stack: ExitStack, inputs: dict[str, torch.Tensor]) -> None:
        stack.enter_context(without_identity_repeats(self.model))
        entry = self._entry(inputs)
        if entry is not None:
            length = next(v.shape[1] for v in inputs.values() if v.dim() >= 2)
            stack.enter_context(keep_positions(self.model, entry, self.positions, length))

    @torch.inference_mode()
    def ids_per_forward(self, inputs: dict[str, torch.Tensor]) -> int:
        """Training ids per forward for this input: ``batch_size``, or when it is ``None`` as many as fit
        ``ROW_POSITIONS_PER_FORWARD`` rows x positions computed at the masked layers."""
        if self.batch_size is not None:
            return self.batch_size
        self.model.eval()
        with ExitStack() as stack:
            self._enter_fast_paths(stack, inputs)
            return self._ids_per_forward(inputs)

    def _ids_per_forward(self, inputs: dict[str, torch.Tensor]) -> int:
        if self.batch_size is not None:
            return self.batch_size
        shapes = tuple((k, tuple(v.shape)) for k, v in inputs.items() if isinstance(v, torch.Tensor))
        if shapes not in self._positions_per_row:
            self._positions_per_row[shapes] = self._probe_positions(inputs)
        budget = ROW_POSITIONS_PER_FORWARD.get(self.device.type, ROW_POSITIONS_PER_FORWARD["cuda"])
        return max(1, budget // (2 * self._positions_per_row[shapes]))

    def _probe_positions(self, inputs: dict[str, torch.Tensor]) -> int:
        """Positions per row at the masked layers (tokens, pixels; 1 for a head), the most over them, from one
        forward of one id through the current fast paths (position slicing included)."""
        seen = [1]
        broadcast = self._broadcasts(inputs)  # before the recording hooks: its own forwards are not probes
        handles = [
            self.model.get_submodule(name).register_forward_hook(
                lambda m, args, out, h=hook: seen.append(h.positions(args, out))
            )
            for name, hook in turnover_hooks(self.model).items()
        ]
        try:
            with turnover_context([0], "own", broadcast=broadcast, paired=True), self._autocast():
                self.forward_fn(self.model, inputs if broadcast else repeat_rows(inputs, 2))
        finally:
            for handle in handles:
                handle.remove()
        return max(seen)

    def _entry(self, inputs: dict[str, torch.Tensor]) -> str | None:
        if not self.positions or not any(v.dim() >= 2 for v in inputs.values()):
            return None
        if self._entry_name is False:  # the same for every input: probe once
            self._entry_name = tail_entry(self.model, inputs, self.forward_fn)
        return self._entry_name


def repeat_rows(inputs: dict[str, torch.Tensor], rows: int) -> dict[str, torch.Tensor]:
    """A one-row input repeated to ``rows`` rows (other values unchanged)."""
    return {
        k: v.repeat(rows, *[1] * (v.dim() - 1))
        if isinstance(v, torch.Tensor) and v.dim() and len(v) == 1
        else v
        for k, v in inputs.items()
    }
