"""Width / N / p sweep of turn-over influence on the MLP set-ups, measured by LDS (``benchmarks/faithfulness/width_sweep.py``).

A *cell* is one training recipe (data, N, hidden width, keep probability p, variant). For every cell the sweep
trains reference models (seeds 0..S-1) and scores them (exact and linearized turn-over, and peers where asked),
and retrains on J random halves with the seed-0 initial parameters, minibatch order and masks (LDS truth).

Variants (all trained with turn-over masks on the hidden units, the input of ``classifier``):

* ``standard``: 784 -> H -> 10, both layers trained (``faithfulness.batched.train_stack``, unchanged).
* ``input_mask``: the same, plus a turn-over mask on the input features (the input of ``fc1``; layer name
  ``fc1`` in ``hf_turnover.masks``): more independent mask bits per instance at no extra training cost.
* ``frozen``: the first layer stays at its random initialisation (random ReLU features) and only the classifier
  trains. All K stacked models then share the hidden features, which are computed once, so a very wide masked
  layer costs little more than a linear model.

Training and scoring run as independent *jobs*, optionally in a pool of worker processes (one torch thread each).
"""

from __future__ import annotations

import functools
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context

import numpy as np
import torch
import torch.nn.functional as F

from hf_turnover import estimate_influence
from hf_turnover.config import TurnoverConfig
from hf_turnover.evaluation import score_matrix
from hf_turnover.masks import keep_bits, mask_values

from .batched import MASKED_LAYER, Stack, fit_stack, init_stack, train_stack, weighted_step
from .fashion import fashion_setup
from .ours import as_targets
from .setups import Setup, mnist_setup

INPUT_LAYER = "fc1"  # the input-mask variant masks this module's INPUT: the pixels
VARIANTS = ("standard", "input_mask", "frozen")


@dataclass(frozen=True)
class Cell:
    """One training recipe of the sweep."""

    group: str  # width | n | p | idea
    data: str  # mnist | fashion | digits
    num_train: int
    hidden: int
    p: float = 0.5
    variant: str = "standard"
    epochs: int = 8
    lr: float = 1e-3
    seeds: int = 1  # reference models 0..seeds-1; the mean of all of them is scored too when > 1
    peers: bool = False  # score the peers on the seed-0 model
    num_test: int = 500
    num_targets: int = 100
    data_seed: int = 0

    @property
    def key(self) -> str:
        return f"{self.data}_n{self.num_train}_h{self.hidden}_p{self.p:g}_{self.variant}_e{self.epochs}"


@dataclass(frozen=True)
class Limits:
    """Where the expensive pieces stop (they are skipped above these widths and the report says so)."""

    exact_ensemble_max_width: int = (
        2048  # exact scoring of seeds > 0 (the 3-seed mean uses linear scores anyway)
    )
    if_max_width: int = 512  # exact last-layer influence function: its Hessian is (10 (H+1))^2
    captum_max_width: int = 128  # Captum TracInCP (the factorized TracIn below runs at every width)
    memory_per_job_gb: float = 2.5


@functools.cache
def load_setup(data: str, num_train: int, num_test: int, data_seed: int) -> Setup:
    if data == "mnist":
        return mnist_setup(num_train, num_test=num_test, seed=data_seed)
    if data == "digits":
        return mnist_setup(num_train, num_test=num_test, seed=data_seed, sklearn_only=True)
    if data == "fashion":
        return fashion_setup(num_train, num_test=num_test, seed=data_seed)
    raise ValueError(f"Unknown data {data!r}; use mnist, fashion or digits.")


def cell_setup(cell: Cell) -> Setup:
    return load_setup(cell.data, cell.num_train, cell.num_test, cell.data_seed)


def cell_targets(cell: Cell) -> tuple[torch.Tensor, torch.Tensor]:
    setup = cell_setup(cell)
    return setup.x_test[: cell.num_targets], setup.y_test[: cell.num_targets]


def turnover_config(cell: Cell, seed: int) -> TurnoverConfig:
    heads = [INPUT_LAYER, MASKED_LAYER] if cell.variant == "input_mask" else MASKED_LAYER
    return TurnoverConfig(p=cell.p, seed=seed, target_modules=None, head_modules=heads)


def own_mask(
    ids: torch.Tensor, width: int, layer: str, p: float, seed: int, mode: str = "own"
) -> torch.Tensor:
    return mask_values(keep_bits(ids, width, layer, p=p, seed=seed), mode, p, torch.float32)


# ---------------------------------------------------------------------------------------------------- training


def _train_masked_input(x, y, weights, *, hidden, num_classes, seed, epochs, lr, p, batch_size=32,
                        checkpoint_every_epoch=False):  # fmt: skip
    """``train_stack`` with an extra own mask on the input features of every row (variant ``input_mask``)."""
    k, n = weights.shape
    stack = init_stack(x.shape[1], hidden, num_classes, k, seed)
    ids = torch.arange(n, dtype=torch.int64)
    hidden_masks = own_mask(ids, hidden, MASKED_LAYER, p, seed)
    x_masked = x * own_mask(ids, x.shape[1], INPUT_LAYER, p, seed)  # each row's masked input never changes
    # fit_stack draws the same minibatch order as train_stack
    return fit_stack(stack, x_masked, y, weights, hidden_masks, seed=seed, epochs=epochs, lr=lr, batch_size=batch_size,
                     checkpoint_every_epoch=checkpoint_every_epoch)  # fmt: skip


@dataclass
class FrozenStack:
    """K classifiers on shared random ReLU features ``relu(x w1 + b1)`` (variant ``frozen``)."""

    w1: torch.Tensor  # (D, H), shared and never trained
    b1: torch.Tensor  # (H,)
    w2: torch.Tensor  # (K, H, C)
    b2: torch.Tensor  # (K, C)

    def features(self, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        return torch.cat([torch.relu(x[s : s + chunk] @ self.w1 + self.b1) for s in range(0, len(x), chunk)])

    @torch.no_grad()
    def losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = torch.einsum("bh,khc->kbc", self.features(x), self.w2) + self.b2[:, None, :]
        return F.cross_entropy(logits.transpose(1, 2), y.expand(len(self.w2), -1), reduction="none")

    def select(self, k: int) -> Stack:
        return Stack(self.w1[:, None, :].clone(), self.b1[None].clone(), self.w2[k : k + 1].clone(),
                     self.b2[k : k + 1].clone())  # fmt: skip


def _train_frozen(x, y, weights, *, hidden, num_classes, seed, epochs, lr, p, batch_size=32):
    k, n = weights.shape
    start = init_stack(x.shape[1], hidden, num_classes, 1, seed)  # the same draws as the trained variants
    stack = FrozenStack(start.w1[:, 0].contiguous(), start.b1[0].contiguous(), start.w2.repeat(k, 1, 1),
                        start.b2.repeat(k, 1))  # fmt: skip
    feats = stack.features(x) * own_mask(torch.arange(n, dtype=torch.int64), hidden, MASKED_LAYER, p, seed)
    params = [stack.w2, stack.b2]
    for param in params:
        param.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr, fused=True)
    order_rng = torch.Generator().manual_seed(seed + 1_000_003)
    for _ in range(epochs):
        order = torch.randperm(n, generator=order_rng)
        for begin in range(0, n, batch_size):
            rows = order[begin : begin + batch_size]
            logits = torch.einsum("bh,khc->kbc", feats[rows], stack.w2) + stack.b2[:, None, :]
            weighted_step(optimizer, logits, y[rows], weights[:, rows])
    for param in params:
        param.requires_grad_(False)
    return stack


def train_cell(cell: Cell, weights: torch.Tensor, seed: int, checkpoints: bool = False):
    """(stack with ``losses(x, y)`` -> (K, M) and ``select(k)`` -> Stack, end-of-epoch snapshots of model 0)."""
    setup = cell_setup(cell)
    common = dict(
        hidden=cell.hidden, num_classes=setup.num_classes, seed=seed, epochs=cell.epochs, lr=cell.lr
    )
    if cell.variant == "standard":
        return train_stack(setup.x_train, setup.y_train, weights, config=turnover_config(cell, seed),
                           checkpoint_every_epoch=checkpoints, **common)  # fmt: skip
    if cell.variant == "input_mask":
        return _train_masked_input(setup.x_train, setup.y_train, weights, p=cell.p,
                                   checkpoint_every_epoch=checkpoints, **common)  # fmt: skip
    if cell.variant == "frozen":
        return _train_frozen(setup.x_train, setup.y_train, weights, p=cell.p, **common), []
    raise ValueError(f"Unknown variant {cell.variant!r}; use one of {VARIANTS}.")


def steps_per_model(cell: Cell) -> int:
    return cell.epochs * math.ceil(cell.num_train / 32)


# ---------------------------------------------------------------------------------------------------- scoring


def library_scores(model, cell: Cell, x_t, y_t, method: str) -> tuple[np.ndarray, float]:
    """(T, N) turn-over scores through ``hf_turnover.estimate_influence`` and the seconds they took."""
    start = time.perf_counter()
    result = estimate_influence(model, None, as_targets(x_t, y_t), train_ids=list(range(cell.num_train)),
                                method=method, check_fingerprint=False, progress=False)  # fmt: skip
    scores = score_matrix(result, range(len(y_t)), range(cell.num_train))[0]
    return scores.astype(np.float32), time.perf_counter() - start


@torch.no_grad()
def manual_exact(stack: Stack, cell: Cell, seed: int, x_t, y_t, ids: torch.Tensor) -> np.ndarray:
    """Own-vs-flip scores computed by hand from the trainer's own masks: a check that the library's hooks draw
    the masks the trainer trained with (the input-mask variant relies on it). (T, len(ids))."""
    losses = {}
    for mode in ("flip", "own"):
        x = x_t[:, None, :].expand(-1, len(ids), -1)
        if cell.variant == "input_mask":
            x = x * own_mask(ids, x_t.shape[1], INPUT_LAYER, cell.p, seed, mode)[None]
        hidden = torch.relu(x @ stack.w1[:, 0] + stack.b1[0]) * own_mask(ids, cell.hidden, MASKED_LAYER, cell.p,
                                                                         seed, mode)[None]  # fmt: skip
        logits = hidden @ stack.w2[0] + stack.b2[0]  # (T, L, C)
        losses[mode] = F.cross_entropy(
            logits.transpose(1, 2), y_t[:, None].expand(-1, len(ids)), reduction="none"
        )
    return (losses["flip"] - losses["own"]).numpy()


@torch.no_grad()
def _backprop_parts(model, x, y, frozen: bool):
    """Per-row pieces of the exact per-sample gradients of a 784 -> H -> C MLP (cross-entropy)."""
    a = model.fc1(x)
    h = torch.relu(a)
    delta2 = torch.softmax(model.classifier(h), -1) - F.one_hot(y, model.classifier.out_features).float()
    delta1 = None if frozen else (delta2 @ model.classifier.weight) * (a > 0)
    return x, h, delta1, delta2


def factorized_grad_dot(model, x_train, y_train, x_t, y_t, frozen: bool = False) -> np.ndarray:
    """``g_t . g_i`` over all trained parameters, exactly, without forming per-sample gradients: the gradient of
    ``W2`` is ``delta2 h^T`` and of ``W1`` is ``delta1 x^T``, so ``g_t . g_i = (d2_t . d2_i)(h_t . h_i + 1) +
    (d1_t . d1_i)(x_t . x_i + 1)``. Costs O(T N H) at any width (the per-sample route needs O(N D H) memory)."""
    xt, ht, d1t, d2t = _backprop_parts(model, x_t, y_t, frozen)
    xi, hi, d1i, d2i = _backprop_parts(model, x_train, y_train, frozen)
    out = (d2t.double() @ d2i.double().T) * (ht.double() @ hi.double().T + 1)
    if not frozen:
        out += (d1t.double() @ d1i.double().T) * (xt.double() @ xi.double().T + 1)
    return out.numpy()


def factorized_tracin(snapshots: list[Stack], lr: float, x_train, y_train, x_t, y_t) -> np.ndarray:
    """TracInCP: ``sum_c lr * g_t(c) . g_i(c)`` over checkpoints, by :func:`factorized_grad_dot`."""
    return sum(lr * factorized_grad_dot(s.module(0), x_train, y_train, x_t, y_t) for s in snapshots)


def tracin_snapshots(snapshots: list[Stack]) -> list[Stack]:
    """Every other end-of-epoch snapshot, always including the last (as ``faithfulness.pairwise``)."""
    return snapshots[::-1][::2][::-1]


def peer_scores(
    cell: Cell, ref: Stack, snapshots: list[Stack], x_t, y_t, limits: Limits, workdir: str
) -> dict:
    """{name: {"scores": (T, N), "setup_s", "per_target_s", "notes"}} on the seed-0 model (full network)."""
    from pathlib import Path

    from . import peers

    setup = cell_setup(cell)
    model = ref.module(0)
    frozen = cell.variant == "frozen"
    out = {}

    def timed(fn):
        start = time.perf_counter()
        value = fn()
        return value, time.perf_counter() - start

    scores, seconds = timed(
        lambda: factorized_grad_dot(model, setup.x_train, setup.y_train, x_t, y_t, frozen)
    )
    out["gradient dot product"] = {"scores": scores, "setup_s": 0.0, "per_target_s": seconds / len(y_t),
                                   "notes": "exact, factorized per layer"}  # fmt: skip
    chosen = tracin_snapshots(snapshots)
    if chosen:
        scores, seconds = timed(
            lambda: factorized_tracin(chosen, cell.lr, setup.x_train, setup.y_train, x_t, y_t)
        )
        out[f"TracInCP ({len(chosen)} ckpts, factorized)"] = {
            "scores": scores, "setup_s": 0.0, "per_target_s": seconds / len(y_t),
            "notes": "exact sum over checkpoints of lr * g_t . g_i, factorized per layer"}  # fmt: skip
        if cell.hidden <= limits.captum_max_width:
            explainer, setup_s = timed(lambda: peers.tracin_explainer(chosen, setup.x_train, setup.y_train, cell.lr,
                                                                      Path(workdir)))  # fmt: skip
            scores, seconds = timed(lambda: explainer.influence((x_t, y_t)).detach().numpy())
            out[f"TracInCP (Captum, {len(chosen)} ckpts)"] = {
                "scores": scores,
                "setup_s": setup_s,
                "per_target_s": seconds / len(y_t),
                "notes": "",
            }
    if cell.hidden <= limits.if_max_width:
        influence, setup_s = timed(lambda: peers.LastLayerInfluence(model, setup.x_train, setup.y_train))
        scores, seconds = timed(lambda: influence.scores(x_t, y_t))
        out[f"influence function (exact last layer, damping {peers.IF_DAMPING})"] = {
            "scores": scores, "setup_s": setup_s, "per_target_s": seconds / len(y_t), "notes": ""}  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class RefJob:
    """Train reference model ``seed`` of ``cell`` alone and score it."""

    cell: Cell
    seed: int
    exact: bool
    limits: Limits
    workdir: str

    def cost(self) -> float:
        return model_cost(self.cell) * 1.5


@dataclass(frozen=True)
class HalvesJob:
    """Retrain ``cell`` (seed-0 init, order and masks) on the subsets ``rows`` of ``members``."""

    cell: Cell
    members: tuple  # tuple of tuples of 0/1 (picklable and hashable)
    first: int

    def cost(self) -> float:
        return model_cost(self.cell) * len(self.members)


def model_cost(cell: Cell) -> float:
    """Rough relative seconds to train one model (for scheduling the largest jobs first)."""
    per_step = cell.hidden * (10 if cell.variant == "frozen" else 800)
    return steps_per_model(cell) * (per_step + 20_000)


def run_ref(job: RefJob) -> dict:
    cell, seed = job.cell, job.seed
    x_t, y_t = cell_targets(cell)
    setup = cell_setup(cell)
    start = time.perf_counter()
    stack, snapshots = train_cell(
        cell, torch.ones(1, cell.num_train), seed, checkpoints=cell.peers and seed == 0
    )
    train_s = time.perf_counter() - start
    ref = stack.select(0)
    model = ref.module(0, turnover_config(cell, seed))
    out = {"key": cell.key, "seed": seed, "train_s": train_s, "s_per_step": train_s / steps_per_model(cell),
           "test_accuracy": float((model(setup.x_test).argmax(-1) == setup.y_test).float().mean())}  # fmt: skip
    with torch.no_grad():
        out["target_loss"] = F.cross_entropy(model(x_t), y_t).item()
    out["linear"], seconds = library_scores(model, cell, x_t, y_t, "linear")
    out["linear_s_per_target"] = seconds / len(y_t)
    if job.exact:
        out["exact"], seconds = library_scores(model, cell, x_t, y_t, "exact")
        out["exact_s_per_target"] = seconds / len(y_t)
        if seed == 0:
            ids = torch.arange(min(16, cell.num_train), dtype=torch.int64)
            by_hand = manual_exact(ref, cell, seed, x_t[:4], y_t[:4], ids)
            out["hooks_vs_trainer_max_abs_diff"] = float(np.abs(by_hand - out["exact"][:4, : len(ids)]).max())
    if cell.peers and seed == 0:
        out["peers"] = peer_scores(cell, ref, snapshots, x_t, y_t, job.limits, job.workdir)
    return out


def run_halves(job: HalvesJob) -> dict:
    cell = job.cell
    x_t, y_t = cell_targets(cell)
    weights = torch.tensor(np.asarray(job.members, dtype=np.float32))
    start = time.perf_counter()
    stack, _ = train_cell(cell, weights, seed=0)
    seconds = time.perf_counter() - start
    return {"key": cell.key, "first": job.first, "losses": stack.losses(x_t, y_t).double().T.numpy(),
            "train_s": seconds}  # fmt: skip


def run_job(job) -> dict:
    return run_ref(job) if isinstance(job, RefJob) else run_halves(job)


def halves_jobs(cell: Cell, members: np.ndarray, limits: Limits) -> list[HalvesJob]:
    """The subsets in chunks small enough for the memory limit (params, grads and two Adam moments per model)."""
    if cell.variant == "frozen":
        per_model = 16 * cell.hidden * 10
    else:
        per_model = 16 * cell.hidden * 800
    cap = max(1, int(limits.memory_per_job_gb * 2**30 // per_model))
    chunk = min(cap, 8 if cell.hidden >= 4096 and cell.variant != "frozen" else len(members))
    return [HalvesJob(cell, tuple(tuple(int(v) for v in row) for row in members[s : s + chunk]), s)
            for s in range(0, len(members), chunk)]  # fmt: skip


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def job_id(job) -> str:
    """A stable file name for a job's result (the cache of ``run_jobs``)."""
    import hashlib

    return hashlib.sha1(
        repr(
            (job.cell, job.seed, job.exact, job.limits)
            if isinstance(job, RefJob)
            else (job.cell, job.members)
        ).encode()
    ).hexdigest()[:16]


def run_jobs(jobs: list, workers: int, threads: int, progress=print, cache_dir=None) -> list[dict]:
    """Run every job (largest first); in-process when ``workers <= 1``. With ``cache_dir``, each result is saved
    there as it arrives and a job whose result is already there is not run again (resuming an interrupted run)."""
    import pickle
    from concurrent.futures import as_completed
    from pathlib import Path

    jobs = sorted(jobs, key=lambda j: -j.cost())
    results, todo = [], []
    cache = Path(cache_dir) if cache_dir else None
    if cache:
        cache.mkdir(parents=True, exist_ok=True)
    for job in jobs:
        path = cache / f"{job_id(job)}.pkl" if cache else None
        if path is not None and path.is_file():
            results.append(pickle.loads(path.read_bytes()) | {"cached": True})
        else:
            todo.append(job)

    def done(job, result, index):
        if cache:
            (cache / f"{job_id(job)}.pkl").write_bytes(pickle.dumps(result))
        results.append(result)
        progress(
            f"[{index}/{len(todo)}] {type(job).__name__} {job.cell.key} ({len(jobs) - len(todo)} cached)"
        )

    if workers <= 1:
        for index, job in enumerate(todo):
            done(job, run_job(job), index + 1)
        return results
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:  # fmt: skip
        futures = {pool.submit(run_job, job): job for job in todo}
        for index, future in enumerate(as_completed(futures)):
            done(futures[future], future.result(), index + 1)
    return results


def cell_dict(cell: Cell) -> dict:
    return asdict(cell) | {"key": cell.key}
