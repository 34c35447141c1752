"""Exact per-sample gradient dot products on the cut MiniLM of :mod:`.minilm_top` (gradient dot product, TracIn).

Every trainable parameter sits in an ``nn.Linear``; its per-sample weight gradient is ``sum_t delta_t a_t^T`` over
the positions it sees. With the [CLS] slice (``ClsOnly``) the top layer's adapter and the classifier see one
position, so their gradient is rank one and a dot product factorises, ``(delta . delta')(a . a' + 1)``, as in
:class:`.minilm.GradFactors`; the adapters below see every position and get explicit per-sample gradients
(``(B, out * in + out)``, built one chunk of training rows at a time). Losses: cross-entropy of the full network
(no masks). Sign convention: ``g_t . g_i > 0`` = the training instance helped the target.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import minilm as M
from .minilm_top import ClsOnly, Hidden


def _linear_layers(model) -> list[tuple[str, nn.Linear]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]
    covered = {f"{n}.{k}" for n, _ in layers for k in ("weight", "bias")}
    missing = set(M.trainable(model)) - covered
    if missing:
        raise ValueError(f"Trainable parameters outside nn.Linear layers: {sorted(missing)}")
    return layers


def capture(
    model, hidden: Hidden, labels, rows, cls_only: ClsOnly
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (a (B, T, in), delta (B, T, out))}`` of each row's cross-entropy for ``rows`` (one batch)."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in _linear_layers(model):

        def hook(m, args, output, name=name):
            store[name + "/a"] = args[0].detach().reshape(len(args[0]), -1, m.in_features)
            output.register_hook(lambda g, name=name, m=m: store.__setitem__(
                name + "/d", g.detach().reshape(len(g), -1, m.out_features)))  # fmt: skip

        handles.append(module.register_forward_hook(hook))
    inputs = hidden.batch(rows)
    params = list(M.trainable(model).values())
    model.eval()
    try:
        with torch.enable_grad(), cls_only(inputs["attention_mask"].shape[1]):
            out = model(**inputs).logits
            F.cross_entropy(out, labels[torch.as_tensor(rows)], reduction="sum").backward(inputs=params)
    finally:
        for handle in handles:
            handle.remove()
        for p in params:
            p.grad = None
    return {name: (store[name + "/a"], store[name + "/d"]) for name, _ in _linear_layers(model)}


class Grads:
    """Per-sample gradients of a set of rows, per layer: rank-one factors ``(a, delta)`` for layers seen at one
    position, explicit ``(B, out * in + out)`` otherwise (or when ``explicit`` names the layer)."""

    def __init__(self, captured: dict, explicit: set[str] | None = None) -> None:
        self.factors, self.explicit = {}, {}
        for name, (a, d) in captured.items():
            if a.shape[1] == 1 and name not in (explicit or set()):
                self.factors[name] = (a[:, 0], d[:, 0])
            else:
                weight = torch.einsum("bto,bti->boi", d, a).reshape(len(a), -1)
                self.explicit[name] = torch.cat([weight, d.sum(1)], dim=1)

    def dot(self, other: Grads) -> torch.Tensor:
        """(B_self, B_other) dot products over all trainable parameters."""
        if set(self.factors) != set(other.factors):
            raise ValueError(f"Factorised layers differ: {set(self.factors)} vs {set(other.factors)}.")
        total = 0
        for name, (a, d) in self.factors.items():
            a2, d2 = other.factors[name]
            total = total + (d @ d2.T) * (a @ a2.T + 1.0)
        for name, g in self.explicit.items():
            total = total + g @ other.explicit[name].T
        return total.double()


def grad_dot(model, hidden_t: Hidden, labels_by_kind: dict, hidden: Hidden, labels, chunk: int = 64) -> dict:
    """``{kind: (T, N)}`` gradient dot products at the current weights, one pass over the training rows."""
    rows_t, cls_only = list(range(len(hidden_t))), ClsOnly(model, hidden)
    targets = {k: Grads(capture(model, hidden_t, torch.as_tensor(y), rows_t, cls_only))
               for k, y in labels_by_kind.items()}  # fmt: skip
    explicit = set(next(iter(targets.values())).explicit)
    out = {k: torch.empty(len(hidden_t), len(hidden), dtype=torch.float64) for k in targets}
    for rows in hidden.chunks(chunk):
        train = Grads(capture(model, hidden, labels, rows, cls_only), explicit)
        for k, g in targets.items():
            out[k][:, rows] = g.dot(train)
    return {k: v.numpy() for k, v in out.items()}


def per_sample_grads_loop(model, hidden: Hidden, labels: torch.Tensor) -> torch.Tensor:
    """(B, P) per-sample gradients, one row at a time with plain autograd, no [CLS] slice (the check)."""
    params = list(M.trainable(model).values())
    out = []
    model.eval()
    for i in range(len(hidden)):
        with torch.enable_grad():
            loss = F.cross_entropy(model(**hidden.batch([i])).logits, labels[i : i + 1])
            grads = torch.autograd.grad(loss, params)
        out.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(out)
