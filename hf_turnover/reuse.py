"""Compute only what depends on the masks.

Layers below the first masked layer do not depend on the training id. Scoring feeds the target as a batch of
one row and lets the first masked layer broadcast it against ``B`` masks (``turnover_context(...,
broadcast=True)``), so the unmasked prefix runs once per forward, not ``B`` times.

After the last attention the network is position-wise, so only the positions the loss reads are needed
there: :func:`tail_entry` finds the first module after it, and :func:`keep_positions` slices its inputs to
those positions. When every masked layer runs after the last attention, that is the whole masked part;
otherwise it is the last layer's attention output and feed-forward.

Across the forwards of one target (one per chunk of ids) the unmasked prefix is the same: :class:`PrefixCache`
records it in the first forward and replays it in the others, so only the masked part runs per chunk.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.utils._pytree as pytree
from adapters import composition as adapters_composition
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
    "turnover_bert",  # hf_turnover's Hub model class (BertForSequenceClassification)
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


def _start_order(
    model: nn.Module, inputs: dict[str, torch.Tensor], forward_fn: Callable | None = None
) -> tuple[list[str], list[str], int]:
    """Module names in the order they start during one forward, the innermost attention cores, and the index
    in that order where the last core starts (-1 without attention)."""
    order: list[str] = []
    handles = [
        module.register_forward_pre_hook(lambda m, a, name=name: order.append(name))
        for name, module in model.named_modules()
        if name
    ]
    training = model.training
    try:
        with torch.inference_mode():
            model.eval()  # eval: unmasked outside a context, no dropout
            forward_fn(model, inputs) if forward_fn else model(**inputs)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    cores = [n for n in order if _is_attention_core(modules[n])]
    cores = [n for n in cores if not any(o != n and o.startswith(n + ".") for o in cores)]  # innermost
    return order, cores, max((order.index(n) for n in cores), default=-1)


def tail_entry(
    model: nn.Module, inputs: dict[str, torch.Tensor], forward_fn: Callable | None = None
) -> str | None:
    """The first module that starts after the last attention (outside it), or ``None``.

    Everything from there on is position-wise whichever layers are masked, so slicing its inputs to the
    positions the loss reads is exact: it saves the work after the last attention at every unread position.
    """
    order, cores, last_core = _start_order(model, inputs, forward_fn)
    for name in order[last_core + 1 :]:
        if not any(name == c or name.startswith(c + ".") for c in cores):
            return name
    return None


_MATCH_ATTN = getattr(adapters_composition, "match_attn_matrices_for_parallel", None)


def _match_without_copies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    if query.shape[0] == key.shape[0] == value.shape[0]:
        return query, key, value
    return _MATCH_ATTN(query, key, value)


@contextmanager
def without_identity_repeats(model: nn.Module) -> Iterator[None]:
    """Skip the copies adapters makes of every attention's query, key and value in ``model``.

    ``adapters``' ``match_attn_matrices_for_parallel`` calls ``repeat(1, ...)`` on all three in every attention
    even when their batch sizes already match (no ``Parallel`` composition), and ``repeat`` always copies:
    about 8% of a scoring forward of a tiny BERT. Inside this context the modules that define ``model``'s
    layers and use it get a version that returns the tensors unchanged when the sizes match and repeats as
    before otherwise. The values are the same either way; the modules get the original back on exit.
    """
    defining = {type(module).__module__ for module in model.modules()}
    patched = [
        sys.modules[name]
        for name in defining
        if _MATCH_ATTN is not None
        and getattr(sys.modules.get(name), "match_attn_matrices_for_parallel", None) is _MATCH_ATTN
    ]
    for module in patched:
        module.match_attn_matrices_for_parallel = _match_without_copies
    try:
        yield
    finally:
        for module in patched:
            module.match_attn_matrices_for_parallel = _MATCH_ATTN


@contextmanager
def keep_positions(model: nn.Module, entry: str, positions: Sequence[int], length: int) -> Iterator[None]:
    """Slice every ``(B, length, ...)`` tensor argument of module ``entry`` to ``positions`` (dim 1)."""
    index = {torch.device("cpu"): torch.tensor(list(positions))}  # per device: one copy, not one per forward

    def hook(module, args, kwargs):
        def cut(x):
            if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] == length:
                if x.device not in index:
                    index[x.device] = index[torch.device("cpu")].to(x.device)
                return x.index_select(1, index[x.device])
            return x

        return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}

    handle = model.get_submodule(entry).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _replayed(output: Any, *args: Any, **kwargs: Any) -> Any:
    # A fresh copy each time: code after the module may modify its output in place.
    return pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, output)


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _plain(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, int, float, bool, str, type(None)))


class PrefixCache:
    """Outputs of the modules that finish before the first masked module starts, for one input.

    :meth:`record` wraps one forward and keeps those outputs; :meth:`replay` wraps later forwards on the same
    input and makes those modules return the kept outputs without computing. Only the outermost such modules
    are replayed, and never one that is called more than once per forward, carries hooks of its own, has a
    patched ``forward``, or returns anything but tensors (a cache object would miss its updates).
    """

    def __init__(self, model: nn.Module, masked: Sequence[str]) -> None:
        self.model = model
        self.masked = set(masked)
        self.outputs: dict[str, Any] = {}

    @contextmanager
    def record(self) -> Iterator[None]:
        """Record the prefix outputs of the forward run inside this context."""
        calls: Counter[str] = Counter()
        outputs: dict[str, Any] = {}
        started = [False]

        def pre(module, args, name):
            calls[name] += 1
            started[0] = started[0] or name in self.masked

        def post(module, args, output, name):
            if not started[0]:
                outputs[name] = output

        candidates = {n: m for n, m in self.model.named_modules() if n and self._replayable(m)}
        handles = [
            m.register_forward_pre_hook(partial(pre, name=n)) for n, m in self.model.named_modules() if n
        ]
        handles += [m.register_forward_hook(partial(post, name=n)) for n, m in candidates.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        kept = {
            n: o
            for n, o in outputs.items()
            if n in candidates and calls[n] == 1 and all(_plain(v) for v in pytree.tree_leaves(o))
        }
        self.outputs = {n: o for n, o in kept.items() if not any(a in kept for a in _ancestors(n))}

    @staticmethod
    def _replayable(module: nn.Module) -> bool:
        hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks)
        return not any(hooks) and "forward" not in module.__dict__

    @contextmanager
    def replay(self) -> Iterator[None]:
        """Run the model with the recorded modules returning their recorded outputs."""
        modules = dict(self.model.named_modules())
        try:
            for name, output in self.outputs.items():
                modules[name].forward = partial(_replayed, output)  # shadows the class's forward
            yield
        finally:
            for name in self.outputs:
                modules[name].__dict__.pop("forward", None)
