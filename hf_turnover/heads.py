"""K masked heads on one frozen body: several turn-over models in one.

One turn-over model's scores carry the luck of its masks and of its training run. K heads share the frozen
backbone; head ``k`` has its own adapter and its own classifier, so its masks are its own (an instance's mask
depends on the masked module's name) and its training run is its own. The model is their average:

    logits = mean_k logits_k        loss = mean_k loss_k

Each head trains as it would alone: the heads share no trained parameter, the loss is the mean of their own
losses, and AdamW's steps do not depend on the 1/K this puts on each head's gradient (but for its ``eps``; gradient
clipping by ``max_grad_norm`` acts on the heads' joint norm). Predictions and influence are the averaged model's.
The turn-over argument holds for the average: under the flipped masks of ``z`` no head runs a unit that ``z``
trained, so ``I(z_t, z) = L(flip, z_t) - L(own, z_t)`` of the averaged model needs no change anywhere in the
scoring code. ``benchmarks/RESULTS.md`` ("Masked heads") measures what two heads buy on the default's set-up.

This file travels with Hub models as remote code (``modeling_turnover.py`` imports it): installed packages only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from adapters import AdapterSetup
from adapters.composition import Stack
from torch import nn

HEAD_CLASSIFIERS = "turnover_classifiers"  # attribute holding the classifiers of heads 1..K-1
# The turn-over head_modules of a K-head model: the classifier of head 0 and those of the other heads.
HEADS_HEAD_MODULES = rf"classifier|{HEAD_CLASSIFIERS}\.\d+"


def head_adapter_names(adapter_name: str, num_heads: int) -> list[str]:
    """The adapters of ``num_heads`` heads: ``adapter_name`` for head 0, ``{adapter_name}_head{k}`` for head k."""
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(
            f"num_heads must be a positive int (masked heads on the frozen body), got {num_heads!r}."
        )
    return [adapter_name] + [f"{adapter_name}_head{k}" for k in range(1, num_heads)]


def head_classifiers(classifier: nn.Linear, num_heads: int) -> nn.ModuleList:
    """Classifiers for heads 1..K-1, shaped like head 0's (initialised by the model's ``_init_weights``)."""
    return nn.ModuleList(
        nn.Linear(classifier.in_features, classifier.out_features) for _ in range(num_heads - 1)
    )


@contextmanager
def single_head(model: nn.Module, index: int) -> Iterator[None]:
    """Run ``model`` (a K-head ``TurnoverBertForSequenceClassification``) as head ``index`` alone: its adapter is
    the active one (``adapters.AdapterSetup``) and its classifier sits in ``model.classifier``."""
    names = model.config.turnover_heads
    if not 0 <= index < len(names):
        raise IndexError(
            f"head {index} does not exist; this model has {len(names)} heads (0..{len(names) - 1})."
        )
    first, selected = model.classifier, model._turnover_head
    if selected is not None and selected != index:
        raise RuntimeError(f"Already running head {selected} alone; heads do not nest.")
    if index:
        model._modules["classifier"] = getattr(model, HEAD_CLASSIFIERS)[index - 1]
    model._turnover_head = index  # the model's forward runs this head only
    try:
        with AdapterSetup(Stack(names[index])):
            yield
    finally:
        model._modules["classifier"], model._turnover_head = first, selected
