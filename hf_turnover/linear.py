"""Linearized turn-over influence: one backward pass per target, then a product with the mask bits.

To first order in the mask values around the full network (every mask value 1), the paper's score is

    I(z_t, z_i) = L(f^{m~(z_i)}, z_t) - L(f^{m(z_i)}, z_t)  ~  sum_j (m~_j(z_i) - m_j(z_i)) * g_j(z_t)

with ``g_j(z_t) = dL(f, z_t)/dm_j`` the gradient of the target's loss w.r.t. the mask value of unit ``j`` of every
masked layer, taken at the full network. With keep-bits ``b`` and keep probability ``p`` (own ``b/p``, flipped
``(1-b)/(1-p)``): ``m~ - m = 1/(1-p) - b/(p(1-p))``, so per masked layer

    own  (paper):       I ~ sum(g)/(1-p) - (b . g) / (p(1-p))
    full (footnote 4):  I ~ (p * sum(g) - b . g) / (1-p)          (m~ - 1 = (p - b)/(1-p))

Positive: z_i helped z_t, as for the exact estimate. One forward and backward pass per target gives ``g`` over the
``d`` masked units; scoring ``N`` training ids is then one ``(N x d) . d`` product over their keep-bits.

:class:`MaskTable` keeps those bits packed, 8 units per byte code, so the product is a sum of ``d / 8`` table
look-ups per id (``torch.nn.functional.embedding_bag``): 10,000 ids x 8,192 units is a 41 MB table.

``method="centered"`` scores ``g(z_t) - g_ref`` instead of ``g(z_t)``, with ``g_ref`` the mean mask gradient of
reference inputs under their predicted labels (:func:`reference_gradient`; by linearity, the linear score minus the
mean linear score of z_i over the reference inputs). The gradients of predicted labels share a component (scaling
some units up makes every prediction more confident), and ``(m~ - m) . g_ref`` is a per-instance number that the
masks alone decide: in a single model it puts the same few training instances on top of unrelated explanations.
Centering removes it; what stays is how much more z_i helped z_t than it helped a typical prediction.

This file travels with Hub models as remote code: installed packages and sibling modules only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .context import turnover_context
from .inputs import logits_of
from .masks import keep_bits
from .model import turnover_hooks
from .pooled import NOISE_IDS, PooledBasis, choose_components, signal_share
from .scorer import TurnoverScorer

METHODS = ("exact", "linear", "centered", "pooled")
_BYTE = 8
# bit k of every byte value 0..255, as floats: (256, 8)
_PATTERNS = ((torch.arange(256)[:, None] >> torch.arange(_BYTE)[None, :]) & 1).float()


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(
            f"method={method!r} is unknown; use 'exact' (own vs flipped forward passes, the paper), 'linear' "
            "(first-order in the masks: one backward pass per target, then a product with the mask bits), "
            "'centered' (linear, minus the linear score of a reference gradient) or 'pooled' (linear, pooled over "
            "groups of alike training instances: hf_turnover.pooled)."
        )
    return method


def layer_bits(model: nn.Module, name: str, ids: torch.Tensor, width: int) -> torch.Tensor:
    """Keep-bits ``(len(ids), width)`` of masked layer ``name``, exactly as its hook draws them."""
    config = turnover_hooks(model)[name].config
    return keep_bits(ids, width, name, p=config.p, seed=config.seed, scheme=config.scheme,
                     codebook_size=config.codebook_size, codebook_k=config.codebook_k)  # fmt: skip


class MaskTable:
    """The keep-bits of a fixed set of training ids on every masked layer, for repeated products with gradients.

    Bits are stored as byte codes: entry ``(i, c)`` of layer ``l`` is ``256 * c + (byte c of ids[i]'s bits)``, an
    int32 index into a per-gradient table of the 256 possible partial sums of each byte, so ``bits . g`` is
    ``d / 8`` look-ups per id. Memory: half a byte per (id, unit).
    """

    def __init__(self, model: nn.Module, ids: torch.Tensor, widths: dict[str, int], rows: int = 4096) -> None:
        self.ids = ids
        self.widths = dict(widths)
        self.codes: dict[str, torch.Tensor] = {}
        weights = 1 << torch.arange(_BYTE, dtype=torch.int32, device=ids.device)  # (8,)
        for name, width in self.widths.items():
            groups = -(-width // _BYTE)
            offsets = torch.arange(groups, dtype=torch.int32, device=ids.device) * 256
            codes = torch.empty(len(ids), groups, dtype=torch.int32, device=ids.device)
            for start in range(0, len(ids), rows):
                bits = layer_bits(model, name, ids[start : start + rows], width)  # (n, d)
                bits = F.pad(bits, (0, groups * _BYTE - width)).view(len(bits), groups, _BYTE)
                codes[start : start + rows] = (bits.to(torch.int32) * weights).sum(-1, dtype=torch.int32)
            self.codes[name] = codes.add_(offsets)  # (N, d/8)

    def matches(self, ids: torch.Tensor, widths: dict[str, int]) -> bool:
        return widths == self.widths and ids.shape == self.ids.shape and torch.equal(ids, self.ids)

    def dot(self, name: str, grads: torch.Tensor) -> torch.Tensor:
        """``bits @ grads.T`` for layer ``name``: ``grads`` (T, d) -> (N, T)."""
        groups = self.codes[name].shape[1]
        padded = F.pad(grads.float(), (0, groups * _BYTE - grads.shape[1])).view(len(grads), groups, _BYTE)
        table = torch.einsum("pk,tgk->gpt", _PATTERNS.to(grads.device), padded).reshape(groups * 256, -1)
        return F.embedding_bag(self.codes[name], table, mode="sum")  # (N, T)


@contextmanager
def mask_probes(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Multiply every masked layer's units by a probe of ones ``(B, d)`` that requires grad; yields the probes.

    The gradient of a loss w.r.t. the probes is its gradient w.r.t. the mask values at the full network.
    """
    probes: dict[str, torch.Tensor] = {}

    def probe(module, rows, width, device, dtype, name: str) -> torch.Tensor:
        probes[name] = torch.ones(rows, width, device=device, dtype=torch.float32, requires_grad=True)
        return probes[name].to(dtype)  # (B, d)

    handles = [
        hook.register(model.get_submodule(name), partial(probe, name=name))
        for name, hook in turnover_hooks(model).items()
    ]
    try:
        yield probes
    finally:
        for handle in handles:
            handle.remove()


class LinearScorer(TurnoverScorer):
    """First-order turn-over scores (see the module docstring): the same interface as
    :class:`~hf_turnover.scorer.TurnoverScorer`, one backward pass per target instead of a forward per id.

    ``cache_masks=True`` keeps a :class:`MaskTable` of the last id set scored, so repeated targets against the
    same training set (explanations, mean influence) pay for the mask hash once. ``reference`` (``{layer: (d,)}``,
    from :func:`reference_gradient`) is subtracted from every target's mask gradient: the ``"centered"`` method.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        cache_masks: bool = True,
        reference: dict[str, torch.Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        self.cache_masks = cache_masks
        self._table: MaskTable | None = None
        self.reference = None if reference is None else _check_reference(model, reference)

    @property
    def method(self) -> str:
        return "linear" if self.reference is None else "centered"

    def mask_gradients(
        self, inputs: dict[str, torch.Tensor], labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``{layer: (B, d)}``: each row's gradient of its loss w.r.t. the mask values, at the full network."""
        return self.logits_and_gradients(inputs, labels)[1]

    def logits_and_gradients(
        self, inputs: dict[str, torch.Tensor], labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The full network's logits and the mask gradients of one forward and backward pass; ``labels=None``
        takes the predicted labels (what an explanation explains), so no separate prediction pass is needed."""
        self.model.eval()
        with ExitStack() as stack:
            self._enter_fast_paths(stack, inputs)
            probes = stack.enter_context(mask_probes(self.model))
            rows = next(len(v) for v in inputs.values() if isinstance(v, torch.Tensor))
            stack.enter_context(turnover_context(torch.zeros(rows, dtype=torch.int64), "full"))
            with torch.enable_grad(), self._autocast():
                logits = logits_of(self.forward_fn(self.model, inputs))
                if labels is None:
                    labels = logits.detach().argmax(-1)
                loss = self.loss_fn(logits, labels)
                names = list(probes)
                grads = torch.autograd.grad(loss.float().sum(), [probes[n] for n in names], allow_unused=True)
        grads = {
            n: (torch.zeros_like(probes[n]) if g is None else g) for n, g in zip(names, grads, strict=True)
        }
        return logits.detach().float(), grads

    def _coefficients(self, name: str) -> tuple[float, float]:
        """``(a, c)`` with ``m~ - m = a + c * b`` (variant own) or ``m~ - 1 = a + c * b`` (full), per unit."""
        p = turnover_hooks(self.model)[name].config.p
        if self.variant == "full":
            return p / (1 - p), -1.0 / (1 - p)
        return 1.0 / (1 - p), -1.0 / (p * (1 - p))

    def table(self, ids: torch.Tensor, widths: dict[str, int]) -> MaskTable:
        if self._table is None or not self._table.matches(ids, widths):
            table = MaskTable(self.model, ids, widths)
            if not self.cache_masks:
                return table
            self._table = table
        return self._table

    def scores_from_gradients(self, grads: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        """``(T, N)`` linearized scores of the ids for targets whose mask gradients are ``grads`` ({layer: (T, d)});
        with a ``reference``, of ``grads - reference``."""
        grads = self._centered(grads)
        ids = ids.to(self.device)
        table = self.table(ids, {n: g.shape[1] for n, g in grads.items()})
        scores = torch.zeros(len(ids), next(iter(grads.values())).shape[0], device=self.device)
        for name, g in grads.items():
            a, c = self._coefficients(name)
            scores += a * g.float().sum(1) + c * table.dot(name, g)
        return scores.T.contiguous()

    def score(
        self,
        inputs: dict[str, torch.Tensor],
        labels: torch.Tensor,
        ids: torch.Tensor,
        progress: bool | None = False,
    ) -> torch.Tensor:
        """Linearized ``I(target, z_i)`` for every id (float32, on the CPU); ``inputs`` is one target row.
        ``progress`` is accepted for the exact scorer's interface: one pass and one product show no bar."""
        scores = self.scores_from_gradients(self.mask_gradients(inputs, labels), ids)[0].cpu()
        self._warn_if_unmasked(scores)
        return scores

    def self_scores(
        self, inputs: dict[str, torch.Tensor], labels: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        """Linearized ``I(z_i, z_i)`` for a batch of training rows, row ``r`` being instance ``ids[r]``."""
        ids = ids.to(self.device)
        scores = torch.zeros(len(ids), device=self.device)
        for name, g in self._centered(self.mask_gradients(inputs, labels)).items():
            a, c = self._coefficients(name)
            bits = layer_bits(self.model, name, ids, g.shape[1]).float()  # (B, d)
            scores += (g.float() * (a + c * bits)).sum(1)
        return scores.cpu()

    def _centered(self, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.reference is None:
            return grads
        for name, g in grads.items():
            if g.shape[1] != self.reference[name].numel():
                raise ValueError(
                    f"reference= has {self.reference[name].numel()} units for {name}, which has {g.shape[1]}: "
                    "compute it with reference_gradient() on this model."
                )
        return {n: g.float() - self.reference[n].to(g.device) for n, g in grads.items()}


class PooledScorer(LinearScorer):
    """``method="pooled"`` (see :mod:`hf_turnover.pooled`): a :class:`~hf_turnover.linear.LinearScorer` whose scores
    of the basis's training ids are pooled. ``last_diagnostics`` keeps, per target of the last call,
    ``signal_share`` of the plain linear scores, the chosen ``components`` and the residual weight ``lambda``."""

    def __init__(self, model: nn.Module, *, basis: PooledBasis, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        if self.reference is not None:
            raise ValueError("method='pooled' takes no reference= (that is method='centered').")
        if self.variant != "own":
            raise ValueError("method='pooled' scores the paper's estimator; use variant='own'.")
        self.basis = basis
        self._prepared: dict[str, Any] | None = None
        self.last_diagnostics: dict[str, torch.Tensor] = {}

    @property
    def method(self) -> str:
        return "pooled"

    def _prepare(self, widths: dict[str, int]) -> dict[str, Any]:
        if self._prepared is not None and self._prepared["widths"] == widths:
            return self._prepared
        basis, device = self.basis, self.device
        num_labels = int(getattr(getattr(self.model, "config", None), "num_labels", 0) or 0)
        num_labels = max(num_labels, int(basis.labels.max()) + 1 if len(basis.labels) else 1)
        g_design = basis.design(num_labels).to(device)  # (N, C)
        ids = basis.ids.to(device)
        noise_ids = _unused_ids(ids, NOISE_IDS)
        table, noise = self.table(ids, widths), MaskTable(self.model, noise_ids, widths)
        n_blocks, q, q_noise = {}, 0, 0
        norm2 = torch.zeros(len(ids), dtype=torch.float64, device=device)
        for name, width in widths.items():
            p = turnover_hooks(self.model)[name].config.p
            _, c = self._coefficients(name)
            bits_t_g = torch.zeros(width, g_design.shape[1], dtype=torch.float64, device=device)
            for start in range(0, len(ids), 1024):  # 1,024 x d dense bits at a time
                bits = layer_bits(self.model, name, ids[start : start + 1024], width).double()
                bits_t_g += bits.T @ g_design[start : start + 1024]
            n = c * (bits_t_g - p * g_design.sum(0))  # (d, C): X^T G
            n_blocks[name] = n
            shift = p * n.sum(0)  # (C,)
            q = q + c * (table.dot(name, n.T.float()).double() - shift)  # (N, C): X n
            q_noise = q_noise + c * (noise.dot(name, n.T.float()).double() - shift)
            kept = table.dot(name, torch.ones(1, width, device=device))[:, 0].double()
            norm2 += c**2 * ((1 - p) ** 2 * kept + p**2 * (width - kept))
        self._prepared = {"widths": widths, "design": g_design, "n": torch.cat(list(n_blocks.values())),
                          "q": q, "q_noise": q_noise, "norm2": norm2, "noise_table": noise,
                          "num_labels": num_labels}  # fmt: skip
        return self._prepared

    def _noise_scores(self, grads: dict[str, torch.Tensor], prep: dict[str, Any]) -> torch.Tensor:
        scores = 0
        for name, g in grads.items():
            a, c = self._coefficients(name)
            scores = scores + a * g.float().sum(1)[:, None] + c * prep["noise_table"].dot(name, g).T
        return scores.double()  # (T, M)

    def scores_from_gradients(self, grads: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
        """``(T, len(ids))`` pooled scores; every id must be in the basis (the training set it was built for). The
        fit and the shrinkage use every id of the basis, so the scores of a subset are those of the full set."""
        prep = self._prepare({n: g.shape[1] for n, g in grads.items()})
        rows = self._rows(ids)
        s = super().scores_from_gradients(grads, self.basis.ids.to(self.device)).double()  # (T, N)
        s_noise = self._noise_scores(grads, prep)
        g = torch.cat([grads[name].double() for name in prep["widths"]], 1)  # (T, W)
        k = choose_components(prep["n"], g, prep["num_labels"])
        scores = torch.empty_like(s)
        lam = torch.empty(len(g), dtype=torch.float64, device=g.device)
        for value in k.unique().tolist():
            t = (k == value).nonzero().flatten()
            cols = prep["num_labels"] * (1 + value)
            psi = torch.linalg.lstsq(prep["n"][:, :cols], g[t].T).solution  # (cols, t)
            group = prep["norm2"][None, :] * (prep["design"][:, :cols] @ psi).T
            residual = s[t] - (prep["q"][:, :cols] @ psi).T
            noise = s_noise[t] - (prep["q_noise"][:, :cols] @ psi).T
            lam[t] = signal_share(residual, noise).double()
            scores[t] = group + lam[t, None] * residual
        self.last_diagnostics = {"signal_share": signal_share(s, s_noise), "components": k.cpu(),
                                 "lambda": lam.float().cpu()}  # fmt: skip
        return scores[:, rows].float().contiguous()

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        basis_ids = self.basis.ids.to(self.device)
        ids = ids.to(self.device)
        order = torch.argsort(basis_ids)
        pos = torch.searchsorted(basis_ids[order], ids).clamp_max(len(order) - 1)
        rows = order[pos]
        missing = basis_ids[rows] != ids
        if missing.any():
            raise ValueError(
                f"method='pooled': training id {int(ids[missing][0])} is not in the pooled basis "
                f"({len(basis_ids)} ids); build the basis on the training set you score "
                "(hf_turnover.training_pooled_basis)."
            )
        return rows

    def self_scores(self, inputs, labels, ids):
        raise ValueError(
            "method='pooled' scores targets against its training set; for self-influence use method='linear'."
        )


def _unused_ids(ids: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` ids next to the training ids that none of them is: above the largest, or below the smallest
    where the largest sits at the top of the mask hash's id range ``[0, 2**62)``."""
    high, low = int(ids.max()), int(ids.min())
    if high + count < 2**62:
        start = high + 1
    elif low >= count:
        start = low - count
    else:
        raise ValueError(
            f"method='pooled' needs {count} ids outside the training ids' range [{low}, {high}]."
        )
    return start + torch.arange(count, device=ids.device)


def make_scorer(
    model: nn.Module,
    method: str = "linear",
    reference: dict[str, torch.Tensor] | None = None,
    basis: Any = None,
    **kwargs: Any,
) -> TurnoverScorer:
    """A :class:`LinearScorer` (``method="linear"``, the library functions' default; ``"centered"`` with the
    ``reference`` gradient of :func:`reference_gradient`), a :class:`PooledScorer` (``"pooled"``, with the
    training set's ``basis``, a :class:`~hf_turnover.pooled.PooledBasis`) or :class:`TurnoverScorer` (``"exact"``)
    of ``model``. ``kwargs`` go to the scorer (``batch_size``: training ids per forward of the exact one)."""
    method = check_method(method)
    if method == "pooled":
        if basis is None:
            raise ValueError(
                "method='pooled' needs basis= (the training set's groups: "
                "hf_turnover.training_pooled_basis(model, tokenizer, train_dataset), or "
                "hf_turnover.PooledBasis.from_features); or use method='linear'."
            )
        if reference is not None:
            raise ValueError("reference= is for method='centered', not method='pooled'.")
        return PooledScorer(model, basis=basis, **kwargs)
    if basis is not None:
        raise ValueError(f"basis= is for method='pooled', not method={method!r}.")
    if method == "centered":
        if reference is None:
            raise ValueError(
                "method='centered' needs reference= (the mean mask gradient of reference inputs: "
                "hf_turnover.linear.reference_gradient(model, batches)); or use method='linear'."
            )
        return LinearScorer(model, reference=reference, **kwargs)
    if reference is not None:
        raise ValueError(f"reference= is for method='centered', not method={method!r}.")
    if method == "linear":
        return LinearScorer(model, **kwargs)
    return TurnoverScorer(model, **kwargs)


def reference_gradient(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], **scorer_kwargs: Any
) -> dict[str, torch.Tensor]:
    """``{layer: (d,)}``: the mean mask gradient of the inputs in ``batches`` (dicts of model inputs, padded),
    each under the model's predicted label: the reference of ``method="centered"``. Training inputs serve (the
    predicted, not the gold, labels: the reference stands for the explanations' targets)."""
    scorer = LinearScorer(model, **scorer_kwargs)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for inputs in batches:
        _, grads = scorer.logits_and_gradients({k: v.to(scorer.device) for k, v in inputs.items()})
        for name, g in grads.items():
            sums[name] = sums.get(name, 0) + g.float().sum(0)
        count += len(next(iter(grads.values())))
    if not count:
        raise ValueError("reference_gradient got no inputs: pass at least one batch.")
    return {name: (total / count).cpu() for name, total in sums.items()}


def _check_reference(model: nn.Module, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    layers = set(turnover_hooks(model))
    if set(reference) != layers:
        raise ValueError(
            f"reference= has gradients for {sorted(reference)}, but the model's masked layers are "
            f"{sorted(layers)}: compute it with reference_gradient() on this model."
        )
    return {name: torch.as_tensor(g, dtype=torch.float32).flatten() for name, g in reference.items()}


def gradient_blocks(
    scorer: LinearScorer, prepared: Sequence[tuple[dict[str, torch.Tensor], torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """Mask gradients of several one-row targets stacked into ``{layer: (T, d)}``."""
    grads = [scorer.mask_gradients(inputs, labels) for inputs, labels in prepared]
    return {name: torch.cat([g[name] for g in grads]) for name in grads[0]}
