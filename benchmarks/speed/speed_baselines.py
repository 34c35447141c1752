"""The baselines of ``benchmarks/speed/speed.py``: a naive loop, the authors' reference style, and Captum's TracIn."""

from __future__ import annotations

import os
import tempfile

import torch
from torch import nn

from hf_turnover.context import turnover_context
from hf_turnover.inputs import per_row_loss

from speed_setup import Setup  # isort: skip  (benchmarks/ is on sys.path when speed.py runs)


@torch.inference_mode()
def naive_scores(setup: Setup, ids: torch.Tensor) -> torch.Tensor:
    """One training id at a time: a batch-1 forward of the whole model under its flipped and its own mask."""
    model, scores = setup.model, []
    for i in ids.tolist():
        with turnover_context([i], "flip"):
            flip = per_row_loss(model(**setup.inputs).logits, setup.labels)
        with turnover_context([i], "own"):
            own = per_row_loss(model(**setup.inputs).logits, setup.labels)
        scores.append(flip - own)
    return torch.cat(scores).float().cpu()


@torch.inference_mode()
def reference_scores(setup: Setup, ids: torch.Tensor, batch: int = 100) -> torch.Tensor:
    """The authors' style: the target copied to ``batch`` rows, the whole model run for each batch of ids
    under the flipped and under the own masks (no prefix reuse, no position slicing)."""
    scores = []
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch].to(setup.device)
        rows = {k: v.expand(len(chunk), *v.shape[1:]) for k, v in setup.inputs.items()}
        with turnover_context(chunk, "flip"):
            flip = per_row_loss(setup.model(**rows).logits, setup.labels)
        with turnover_context(chunk, "own"):
            own = per_row_loss(setup.model(**rows).logits, setup.labels)
        scores.append(flip - own)
    return torch.cat(scores).float().cpu()


class _LogitsOf(nn.Module):
    """Captum calls ``model(*inputs)``: token ids in, logits out (all positions attended)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits


class CaptumTracIn:
    """TracInCPFast (gradients of the classifier only) and TracInCP (gradients of every masked module's
    parameters: the adapters of the case and the classifier) on the same model and target.

    TracIn reads the training inputs, so its training sets are random token rows of the target's length.
    The model stays in eval mode outside any turn-over context, i.e. it runs unmasked (the full network).
    One checkpoint (the current weights); its load function returns learning rate 1 without reloading, so
    the timing is scoring only.
    """

    def __init__(
        self, setup: Setup, masked: list[str], n_fast: int, n_full: int, batch_size: int = 32
    ) -> None:
        from captum.influence import TracInCP, TracInCPFast

        self.setup = setup
        self._dir = tempfile.TemporaryDirectory()
        checkpoint = os.path.join(self._dir.name, "checkpoint.pt")
        torch.save({}, checkpoint)  # captum wants a path; the weights are already in the model
        wrapped = _LogitsOf(setup.model).eval()
        common = dict(checkpoints=[checkpoint], checkpoints_load_func=lambda m, p: 1.0, batch_size=batch_size)
        self.fast = TracInCPFast(
            wrapped, wrapped.model.classifier, self._rows(n_fast), loss_fn=nn.CrossEntropyLoss(reduction="sum"),
            **common,
        )  # fmt: skip
        # Per-example gradients by a loop (sample_wise_grads_per_batch=False): captum's batched trick needs
        # layer inputs that require grad, which the frozen backbone's activations do not.
        self.full = TracInCP(
            wrapped, self._rows(n_full), layers=[f"model.{n}" for n in self._masked_linears(setup.model, masked)],
            loss_fn=nn.CrossEntropyLoss(reduction="none"), sample_wise_grads_per_batch=False, **common,
        )  # fmt: skip

    def _rows(self, n: int) -> torch.utils.data.TensorDataset:
        """``n`` random training rows of the target's length, with labels."""
        g = torch.Generator().manual_seed(7)
        shape, vocab = (n, self.setup.inputs["input_ids"].shape[1]), self.setup.model.config.vocab_size
        return torch.utils.data.TensorDataset(
            torch.randint(1000, vocab, shape, generator=g).to(self.setup.device),
            torch.randint(0, 2, (n,), generator=g).to(self.setup.device),
        )

    @staticmethod
    def _masked_linears(model: nn.Module, masked: list[str]) -> list[str]:
        adapters = {name.rsplit(".adapter_down", 1)[0] for name in masked if ".adapter_down" in name}
        names = [
            n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(tuple(adapters))
        ]
        return names + ["classifier"]

    def scores(self, which: str) -> torch.Tensor:
        """Influence of the ``n`` training rows on the target, ``(n,)``."""
        method = self.fast if which == "fast" else self.full
        inputs = (self.setup.inputs["input_ids"], self.setup.labels)
        return method.influence(inputs).reshape(-1)
