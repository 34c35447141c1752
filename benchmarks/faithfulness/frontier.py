"""The explanation frontier of the default model's design: LDS and seed agreement of turn-over influence against
training seconds, for the levers epochs, lr schedule, masked width and K averaged turn-over models, with the peers
(last-layer influence function, gradient dot product) on the same models and targets.

    nice -n 10 python benchmarks/faithfulness/frontier.py --output_dir benchmarks/faithfulness/results_frontier \
        --points "width=1536,epochs=1,lr=3e-3,schedule=linear;width=16384,epochs=1,lr=1e-3,schedule=linear"

Smoke run (what tests/test_frontier.py runs): ``--output_dir /tmp/frontier --smoke true``.

Each point (``;``-separated; keys ``width``, ``epochs``, ``lr``, ``schedule``, ``lower_width``, ``heads``) is the
set-up of ``minilm_top_lds.py`` (all-MiniLM-L6-v2 frozen, ``seq_bn`` adapters in the top two layers, masks on both adapters
and the classifier input, AdamW, length-grouped minibatches, trained on the cached frozen layers). Per point:

* ``2 * max_models`` models trained with seeds 0, 1, ... (init, masks, minibatch order);
* ``heads=K``: each model has K masked heads on its frozen body (``hf_turnover.heads``); the peers score the
  averaged model (the influence function on the heads' last layers as one:
  :func:`faithfulness_lib.minilm_top.last_layer`);
* the scores of K models averaged (K = 1, 2, 4, ... ``max_models``; K models are K turn-over heads on one frozen
  body): LDS against ``num_subsets`` halves retrained from seed 0's init, minibatches and masks; the
  identical-class test on the averaged models' predicted labels; seed agreement of models 0..K-1 against K..2K-1
  (``hf_turnover.evaluation.seed_agreement``);
* the peers on models 0 and 1: LDS against the same halves, the identical-class test, seed agreement;
* paired differences: each one-model turn-over row's LDS minus each peer's (and label match's) on the same targets
  and halves, with the error of the per-target differences and the jackknife error over halves.

``--halves_from DIR`` reads the retrained halves' target losses of an earlier run with the same arguments instead of
retraining them (they depend only on seed 0's init, masks and minibatches).

Writes ``results.json``, ``results.md`` and ``frontier.png`` (LDS and mean-influence seed agreement against
training seconds) to ``--output_dir``.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import _paths  # noqa: F401  (benchmarks/lib on sys.path)
import numpy as np
import torch
from bench_common import parse_benchmark_arguments
from faithfulness_lib import minilm as M
from faithfulness_lib import minilm_top as top
from faithfulness_lib.minilm_top_grads import grad_dot
from minilm_lds import lds_halves_se, lds_with_se
from minilm_top_lds import MiniLMTopArguments, build, load_data, train_options
from scipy.stats import spearmanr
from transformers import AutoTokenizer

from hf_turnover.atomic import atomic_write_text
from hf_turnover.evaluation import random_half_subsets, seed_agreement
from hf_turnover.pooled import NOISE_IDS, PooledBasis, training_errors
from hf_turnover.pooled import signal_share as pooled_signal_share

SMOKE = {"num_train": 64, "num_targets": 3, "num_val": 64, "num_subsets": 3, "max_models": 2,
         "points": "width=32,lower_width=16,epochs=1,lr=3e-3,schedule=linear", "cache_to_disk": False}  # fmt: skip
KEYS = {"width": int, "lower_width": int, "epochs": int, "lr": float, "schedule": str, "heads": int}


@dataclass
class FrontierArguments:
    output_dir: str = field(default="benchmarks/faithfulness/results_frontier", metadata={"help": "Results."})
    points: str = field(
        default="width=1536,epochs=1,lr=3e-3,schedule=linear",
        metadata={"help": "';'-separated set-ups, each 'key=value,...' of width, lower_width, epochs, lr, schedule, "
                          "heads."},
    )  # fmt: skip
    num_train: int = field(default=8454, metadata={"help": "Training sentences N."})
    num_targets: int = field(default=100, metadata={"help": "Held-out test-split targets."})
    first_target: int = field(
        default=0,
        metadata={"help": "Test-split position of the first target (100: targets never looked at here)."},
    )
    num_val: int | None = field(default=None, metadata={"help": "Validation sentences for accuracy (all)."})
    num_subsets: int = field(default=16, metadata={"help": "Random halves retrained on (LDS), per point."})
    max_models: int = field(default=4, metadata={"help": "Largest K; 2K models are trained per point."})
    peers: bool = field(default=True, metadata={"help": "Influence function and gradient dot product."})
    cache_to_disk: bool = field(default=True, metadata={"help": "Keep the frozen-layer cache in ~/.cache."})
    threads: int = field(default=1, metadata={"help": "torch threads."})
    smoke: bool = field(default=False, metadata={"help": "Tiny settings (N=64, 3 targets, 3 halves, K<=2)."})
    halves_from: str | None = field(
        default=None,
        metadata={"help": "Output folder of an earlier run of the same point(s), N, targets and halves: read its "
                  "retrained halves' target losses instead of retraining them (they depend only on seed 0's init, "
                  "masks and minibatches, which the seeds fix)."},
    )  # fmt: skip
    merge: str | None = field(
        default=None,
        metadata={"help": "Comma-separated output dirs of earlier runs (same N, targets and halves, e.g. points "
                  "run in parallel processes): train nothing, write their points' report and plot together."},
    )  # fmt: skip


def parse_points(text: str) -> list[dict]:
    """``"width=1536,epochs=1;..."`` -> one dict per point, values typed; unknown keys are an error."""
    points = []
    for chunk in filter(None, (c.strip() for c in text.split(";"))):
        point = {}
        for item in chunk.split(","):
            key, _, value = item.partition("=")
            if key.strip() not in KEYS or not value:
                raise ValueError(f"--points: {item!r} is not key=value with a key of {sorted(KEYS)}.")
            point[key.strip()] = KEYS[key.strip()](value)
        points.append(point)
    if not points:
        raise ValueError("--points names no set-up; e.g. 'width=1536,epochs=1,lr=3e-3,schedule=linear'.")
    return points


def setup_arguments(args: FrontierArguments, point: dict) -> MiniLMTopArguments:
    base = MiniLMTopArguments(num_train=args.num_train, num_targets=args.first_target + args.num_targets,
                              num_val=args.num_val, cache_to_disk=args.cache_to_disk, threads=args.threads,
                              smoke=args.smoke)  # fmt: skip
    names = {"epochs": "num_train_epochs", "lr": "learning_rate", "schedule": "lr_schedule"}
    out = replace(base, **{names.get(k, k): v for k, v in point.items()})
    out.masked_layers = out.top_layers
    return out


def label_scores(model, hidden_t, n: int, method: str = "linear", **kwargs) -> np.ndarray:
    """(2, T, N): every target's scores under label 0 and label 1 (the averaged models' prediction picks one)."""
    t = len(hidden_t)
    return np.stack(
        [top.turnover_scores(model, hidden_t, torch.full((t,), c), n, method, **kwargs) for c in (0, 1)]
    )


def signal_share(model, hidden_t, y_t, n: int, linear: np.ndarray) -> float:
    """Mean over targets of ``hf_turnover.pooled.signal_share``: the share of the variance of the linear scores of
    the N training ids above that of ``NOISE_IDS`` ids that were never trained (ids N, N + 1, ...)."""
    noise = top.turnover_scores(model, hidden_t, y_t, min(n, NOISE_IDS), "linear", first_id=n)
    return float(pooled_signal_share(torch.as_tensor(linear), torch.as_tensor(noise)).mean())


def pick(by_label: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return by_label[labels, np.arange(len(labels))]


def peer_scores(model, data, labels_true: np.ndarray, predicted: np.ndarray) -> dict:
    (hidden, y), (hidden_t, _) = data["train"], data["targets"]
    x_train, x_t = top.pooled_features(model, hidden), top.pooled_features(model, hidden_t)
    start = time.perf_counter()
    layer = top.last_layer(model)
    with torch.no_grad():  # the layer and the features compute the model's own logits
        torch.testing.assert_close(layer.classifier(x_t), top.logits(model, hidden_t), atol=1e-4, rtol=1e-4)
    influence = M.TailLastLayerInfluence(layer, x_train, y)
    labels = {"true": torch.as_tensor(labels_true), "predicted": torch.as_tensor(predicted)}
    out = {"influence function (last layer, exact)": {k: influence.scores(x_t, v) for k, v in labels.items()}}
    out["influence function (last layer, exact)"]["seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    out["gradient dot product (final weights)"] = grad_dot(model, hidden_t, labels, hidden, y)
    out["gradient dot product (final weights)"]["seconds"] = time.perf_counter() - start
    return out


def train_models(a: MiniLMTopArguments, data, below: int, count: int, peers: bool) -> list[dict]:
    """``count`` models (seeds 0..count-1) trained and scored; model 0 keeps its init and model for the halves."""
    (hidden, y), (hidden_t, y_t) = data["train"], data["targets"]
    out = []
    for seed in range(count):
        model = build(a, seed)
        with top.cut_bottom(model, below):
            init = M.snapshot(model)
            run = top.train_top(model, init, hidden, y, **train_options(a, seed))
            logits = top.logits(model, hidden_t)
            start = time.perf_counter()
            by_label = label_scores(model, hidden_t, len(y))
            score_seconds = time.perf_counter() - start
            start = time.perf_counter()
            features, train_logits = top.pooled_features(model, hidden, return_logits=True)
            errors = training_errors(train_logits, y)
            basis = PooledBasis.from_features(np.arange(len(y)), y, features, errors=errors)
            pooled = label_scores(model, hidden_t, len(y), "pooled", basis=basis)
            row = {"seed": seed, "train_seconds": run.seconds, "score_seconds": score_seconds,
                   "pooled_seconds": time.perf_counter() - start,
                   "val_logits": top.logits(model, data["val"][0]), "target_logits": logits,
                   "scores": {"turn-over linear": by_label, "turn-over pooled": pooled},
                   "signal_share": signal_share(model, hidden_t, y_t, len(y), pick(by_label, y_t.numpy()))}  # fmt: skip
            if seed < 2 and peers:
                row["peers"] = peer_scores(model, data, y_t.numpy(), logits.argmax(-1).numpy())
        if seed == 0:
            row["model"], row["init"] = model, init
        print(f"  seed {seed}: {run.seconds:.0f} s, val acc "
              f"{float((row['val_logits'].argmax(-1) == data['val'][1]).float().mean()):.3f}", flush=True)  # fmt: skip
        out.append(row)
    return out


def halves_losses(a: MiniLMTopArguments, data, below: int, first: dict, members: np.ndarray) -> np.ndarray:
    (hidden, y), (hidden_t, y_t) = data["train"], data["targets"]
    model, losses = first["model"], []
    with top.cut_bottom(model, below):
        for j, row in enumerate(members):
            top.train_top(model, first["init"], hidden, y, members=row, **train_options(a, 0))
            losses.append(top.target_losses(model, hidden_t, y_t))
            print(f"  half {j + 1}/{len(members)}", flush=True)
    return np.stack(losses, axis=1)


def evaluate_point(args, a, data, below: int, members: np.ndarray, losses: np.ndarray | None = None) -> dict:
    """The point's rows; ``losses``: its halves' target losses from an earlier run (else retrained here)."""
    y, y_t, y_val = data["train"][1].numpy(), data["targets"][1].numpy(), data["val"][1].numpy()
    models = train_models(a, data, below, 2 * args.max_models, args.peers)
    start = time.perf_counter()
    if losses is None and len(members):
        losses = halves_losses(a, data, below, models[0], members)
    retrain_seconds = time.perf_counter() - start
    rows, compared = [], {}  # compared: the scores (T, N) of the one-model rows, for the paired differences
    for method, seconds in (("turn-over linear", "score_seconds"), ("turn-over pooled", "pooled_seconds")):
        for k in sorted({1, *[2**i for i in range(1, 8) if 2**i <= args.max_models], args.max_models}):
            group, other = models[:k], models[k : 2 * k]
            val_pred = torch.stack([m["val_logits"] for m in group]).mean(0).argmax(-1).numpy()
            predicted = torch.stack([m["target_logits"] for m in group]).mean(0).argmax(-1).numpy()
            mean = np.mean([m["scores"][method] for m in group], axis=0)
            row = {"method": method, "models": k, **faithfulness(pick(mean, y_t), members, losses),
                   "val_accuracy": float((val_pred == y_val).mean()),
                   "train_seconds": float(sum(m["train_seconds"] for m in group)),
                   "per_target_s": float(sum(m[seconds] for m in group)) / (2 * len(y_t)),
                   **M.identical_class(pick(mean, predicted), predicted, y)}  # fmt: skip
            if k == 1:
                compared[method] = pick(mean, y_t)
            if method == "turn-over linear":
                row["signal_share"] = float(np.mean([m["signal_share"] for m in group]))
            if len(other) == k:
                row["agreement"] = seed_agreement(
                    pick(mean, y_t), pick(np.mean([m["scores"][method] for m in other], 0), y_t), labels=y
                )
            rows.append(row)
    if "peers" in models[0]:
        predicted = models[0]["target_logits"].argmax(-1).numpy()
        for name, first in models[0]["peers"].items():
            rows.append({"method": name, "models": 1, **faithfulness(first["true"], members, losses),
                         "val_accuracy": rows[0]["val_accuracy"],
                         "train_seconds": models[0]["train_seconds"], "setup_s": first["seconds"],
                         **M.identical_class(first["predicted"], predicted, y),
                         "agreement": seed_agreement(first["true"], models[1]["peers"][name]["true"], labels=y)})  # fmt: skip
            compared[name] = first["true"]
    if losses is None:  # --num_subsets 0: agreement and accuracy only
        return {"rows": rows, "retrain_seconds": 0.0}
    rows.append(label_baseline(y, y_t, members, losses, rows[0]))
    compared[rows[-1]["method"]] = label_match_scores(y, y_t)
    return {
        "rows": rows,
        "paired": {
            method: {
                other: paired_difference(scores, compared[other], members, losses)
                for other in compared
                if not other.startswith("turn-over")
            }
            for method, scores in compared.items()
            if method.startswith("turn-over")
        },  # fmt: skip
        "retrain_seconds": retrain_seconds,
        "subset_loss_std_mean": float(losses.std(1).mean()),
        "target_losses": losses.tolist(),  # (T, J): later metrics need no retraining
    }


def faithfulness(scores: np.ndarray, members: np.ndarray, losses: np.ndarray | None) -> dict:
    """LDS, its error over targets and over halves; ``None`` for each without halves (``--num_subsets 0``)."""
    if losses is None:
        return {"lds": None, "lds_se": None, "lds_halves_se": None}
    value, se = lds_with_se(scores, members, losses)
    return {"lds": value, "lds_se": se, "lds_halves_se": lds_halves_se(scores, members, losses)}


def paired_difference(
    scores: np.ndarray, other: np.ndarray, members: np.ndarray, losses: np.ndarray
) -> dict[str, float]:
    """LDS of ``scores`` minus LDS of ``other`` (both (T, N)) on the same targets and halves, with the standard error
    of the per-target differences and the jackknife error over halves of the difference: the two LDS share their
    noise, so their difference is measured more tightly than either."""
    per_target = [per_target_lds(s, members, losses) for s in (scores, other)]
    diffs = per_target[0] - per_target[1]
    keep = ~np.isnan(diffs)
    j = len(members)
    jack = np.array([lds_difference(scores, other, np.delete(members, k, 0), np.delete(losses, k, 1))
                     for k in range(j)])  # fmt: skip
    return {
        "difference": float(diffs[keep].mean()),
        "targets_se": float(diffs[keep].std(ddof=1) / np.sqrt(keep.sum())),
        "halves_se": float(np.sqrt((j - 1) / j * ((jack - jack.mean()) ** 2).sum())),  # NaN: too few halves
    }


def per_target_lds(scores: np.ndarray, members: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """(T,) Spearman correlation of each target's predicted half effects ``scores @ members.T`` with its retrained
    halves' negated losses (the LDS is their mean); NaN where a target's predictions or losses do not vary."""
    predicted = scores @ members.T.astype(np.float64)
    return np.array(
        [
            spearmanr(p, -t)[0] if np.ptp(p) and np.ptp(t) else np.nan
            for p, t in zip(predicted, losses, strict=True)
        ]
    )


def lds_difference(scores: np.ndarray, other: np.ndarray, members: np.ndarray, losses: np.ndarray) -> float:
    diffs = per_target_lds(scores, members, losses) - per_target_lds(other, members, losses)
    return float(diffs[~np.isnan(diffs)].mean()) if (~np.isnan(diffs)).any() else float("nan")


def label_match_scores(y: np.ndarray, y_t: np.ndarray) -> np.ndarray:
    """(T, N): +1 where training sentence i has target t's label, -1 otherwise."""
    return np.where(y[None, :] == y_t[:, None], 1.0, -1.0)


def label_baseline(
    y: np.ndarray, y_t: np.ndarray, members: np.ndarray, losses: np.ndarray, first: dict
) -> dict:
    """Not an explanation: +1 for every training sentence with the target's label, -1 otherwise. Its LDS is what
    a half's class balance alone explains of the retrained losses."""
    scores = label_match_scores(y, y_t)
    return {"method": "label match (+1 same label, -1 other)", "models": 0, **faithfulness(scores, members, losses),
            "val_accuracy": first["val_accuracy"],
            "train_seconds": 0.0, "helpful_same_class": None}  # fmt: skip


def _lds(row: dict) -> str:
    if row["lds"] is None:
        return "– (no halves)"
    return f"{row['lds']:.3f} ± {row['lds_se']:.3f} (halves ± {row['lds_halves_se']:.3f})"


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def label(point: dict) -> str:
    heads = f", {point['heads']} masked heads" if point.get("heads", 1) > 1 else ""
    return f"W={point['width']}, {point['epochs']} ep, lr {point['lr']:g} {point['schedule']}{heads}"


def markdown(r: dict) -> str:
    lines = [
        "# Frontier: turn-over influence on the default model's design against training seconds",
        "",
        f"Written by `benchmarks/faithfulness/frontier.py`. Command: `{r['command']}`",
        f"Wall time {r['wall_seconds'] / 60:.1f} min on {r['machine']} ({r['arguments']['threads']} torch thread(s), "
        f"other jobs running). N = {r['num_train']}, {r['num_targets']} held-out targets (test-split positions "
        f"{r['arguments'].get('first_target', 0)}-{r['arguments'].get('first_target', 0) + r['num_targets'] - 1}), "
        f"{r['arguments']['num_subsets']} halves per point (`random_half_subsets(N, J, seed=1)`).",
        "",
        "Set-up: all-MiniLM-L6-v2 (frozen) + `seq_bn` adapters in the top two layers (W units in the top one, "
        "masked, as the one below and the classifier input), AdamW, batch 32, 6% warm-up, length-grouped "
        "minibatches, trained on the cached output of layer 3. K models = the turn-over scores of K models (seeds "
        "0..K-1: init, masks, minibatch order) averaged, their logits averaged for the prediction. LDS: against "
        "halves retrained from seed 0's init, minibatches and masks (so K > 1 is scored against one model's "
        "retraining). Seed agreement: models 0..K-1 against K..2K-1 (peers: model 0 against model 1); pairwise = "
        "per-target Spearman of the N scores, mean influence = Spearman of the mean over targets (the cleansing "
        "ranking; within label: among the sentences of one label, averaged). Training seconds: the K models together, on the cache.",
        "",
        "Signal share (linear rows): 1 - var(scores of never-trained ids) / var(scores of the training ids) under "
        "the same target gradient, mean over targets (`hf_turnover.pooled.signal_share`): the part of a linear "
        "score's spread that is the training rather than the mask draw. Pooled: `method=\"pooled\"` "
        "(`hf_turnover.pooled`), groups by label x the model's error on each sentence and the top principal "
        "components of its head input.",
        "",
        "| set-up | halves | method | K | val acc | train s | LDS ± SE over targets (± jackknife SE over halves) | helpful top-1 same class | pairwise Spearman | "
        "mean-influence Spearman | within label | top-10 overlap | signal share |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for p in r["points"]:
        for row in p["rows"]:
            ag = row.get("agreement")
            within = ag.get("mean_influence_spearman_within_label") if ag else None
            cells = (f"{ag['pairwise_spearman']:.3f} | {ag['mean_influence_spearman']:.3f} | "
                     f"{'–' if within is None else f'{within:.3f}'} | {ag['top_k_overlap']:.3f}"
                     if ag else "– | – | – | –")  # fmt: skip
            lines.append(f"| {label(p['point'])} | {p['point'].get('halves', r['arguments']['num_subsets'])} | {row['method']} | {row['models']} | {row['val_accuracy']:.3f} | "
                         f"{row['train_seconds']:.0f} | {_lds(row)} | "
                         f"{_rate(row['helpful_same_class'])} | {cells} | {_rate(row.get('signal_share'))} |")  # fmt: skip
    if any(p.get("paired") for p in r["points"]):
        lines += [
            "",
            "Paired LDS differences (one model, same targets and halves): turn-over's LDS minus each other method's, "
            "± the standard error of the per-target differences (± the jackknife error over halves). A difference "
            "more than twice its errors from 0 ranks the two methods on these targets.",
            "",
            "| set-up | turn-over method | minus | LDS difference ± SE over targets (± halves) |",
            "|---|---|---|---|",
        ]
        for p in r["points"]:
            for method, others in p.get("paired", {}).items():
                lines += [f"| {label(p['point'])} | {method} | {other} | {d['difference']:+.3f} ± "
                          f"{d['targets_se']:.3f} (halves ± {d['halves_se']:.3f}) |" for other, d in others.items()]  # fmt: skip
    if r.get("halves_from"):
        lines += ["", f"Retrained halves read from the run `{r['halves_from']}`."]
    return "\n".join([*lines, ""])


def plot(r: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for p in r["points"]:
        color = None
        for method, style in (("turn-over linear", "o-"), ("turn-over pooled", "^--")):
            turn = [row for row in p["rows"] if row["method"] == method]
            if not turn:
                continue
            x = [row["train_seconds"] for row in turn]
            (line,) = axes[0].plot(x, [_nan(row["lds"]) for row in turn], style, color=color,
                                   label=label(p["point"]) if color is None else None)  # fmt: skip
            color = line.get_color()
            axes[0].errorbar(x, [_nan(row["lds"]) for row in turn], yerr=[_nan(row["lds_halves_se"]) for row in turn],
                             fmt="none", ecolor=color, alpha=0.5)  # fmt: skip
            agreed = [row for row in turn if "agreement" in row]
            axes[1].plot([row["train_seconds"] for row in agreed],
                         [row["agreement"]["mean_influence_spearman"] for row in agreed], style, color=color)  # fmt: skip
        for row, marker in zip(
            (row for row in p["rows"] if "agreement" in row and not row["method"].startswith("turn-over")),
            "sD",
            strict=False,
        ):
            axes[0].plot(row["train_seconds"], _nan(row["lds"]), marker, color=color, mfc="none")
            axes[1].plot(row["train_seconds"], row["agreement"]["mean_influence_spearman"], marker,
                         color=color, mfc="none")  # fmt: skip
    for p in r["points"][:1]:
        base = next((row for row in p["rows"] if row["method"].startswith("label match")), None)
        if base is not None:
            axes[0].axhline(
                base["lds"], color="grey", ls="--", lw=1, label="label match (not an explanation)"
            )
    axes[0].set(xscale="log", xlabel="training seconds (K models)", ylabel="LDS", title="Faithfulness")
    axes[1].set(xscale="log", xlabel="training seconds (K models)", ylabel="Spearman, mean influence",
                title="Agreement across seeds")  # fmt: skip
    axes[0].legend(
        fontsize=7,
        title="turn-over K = 1, 2, 4...: o- linear, ^-- pooled; peers: s IF, D grad dot",
        title_fontsize=7,
    )
    for ax in axes:  # plain seconds on the log axis, no crowded minor labels
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict, out: Path) -> None:
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    report = markdown(results)
    atomic_write_text(out / "results.md", report)
    plot(results, out / "frontier.png")
    print(report, flush=True)


def merge(args: FrontierArguments, out: Path) -> dict:
    """One report of several runs' points; their N, targets and halves must match."""
    runs = [json.loads((Path(d) / "results.json").read_text()) for d in args.merge.split(",") if d]
    keys = ("num_train", "num_targets")
    for r in runs[1:]:
        same = all(r[k] == runs[0][k] for k in keys)
        if not same:
            raise ValueError(
                f"--merge: {r['command']!r} differs from {runs[0]['command']!r} in N or targets."
            )
    merged = {**runs[0], "points": [p for r in runs for p in r["points"]],
              "command": " && ".join(r["command"] for r in runs) + f" (merged with --merge {args.merge})",
              "wall_seconds": max(r.get("wall_seconds", 0.0) for r in runs)}  # fmt: skip
    write_report(merged, out)
    return merged


def load_frontier_data(args: FrontierArguments, a: MiniLMTopArguments) -> tuple[int, dict]:
    """(first layer above the frozen ones, the cached splits) of set-up ``a``; the targets are test-split positions
    ``args.first_target .. + args.num_targets`` (load_data reads the first ``first_target + num_targets``)."""
    model = build(a, 0)
    below = top.frozen_below(model)
    _, data = load_data(a, model, AutoTokenizer.from_pretrained(M.backbone_path()), below)
    if args.first_target:
        hidden_t, y_t = data["targets"]
        keep = range(args.first_target, args.first_target + args.num_targets)
        data["targets"] = (hidden_t.subset(keep), y_t[args.first_target :])
    return below, data


def halves_from(args: FrontierArguments, results: dict, points: list[dict]) -> list[list]:
    """The retrained halves' target losses of each point, from the earlier run ``--halves_from``, which must match
    this run in N, targets, halves and points."""
    source = json.loads((Path(args.halves_from) / "results.json").read_text())
    ours = {"num_train": results["num_train"], "num_targets": results["num_targets"],
            "first_target": args.first_target, "num_subsets": args.num_subsets, "points": points}  # fmt: skip
    theirs = {"num_train": source["num_train"], "num_targets": source["num_targets"],
              "first_target": source["arguments"].get("first_target", 0),
              "num_subsets": source["arguments"]["num_subsets"],
              "points": parse_points(source["arguments"]["points"])}  # fmt: skip
    if ours != theirs or any("target_losses" not in p for p in source["points"]):
        raise ValueError(
            f"--halves_from {args.halves_from}: that run ({theirs}) is not this one ({ours}); pass the output folder "
            "of a run with the same --num_train, --num_targets, --first_target, --num_subsets and --points."
        )
    results["halves_from"] = source["command"]
    return [p["target_losses"] for p in source["points"]]


def main(argv: list[str] | None = None) -> dict:
    args = parse_benchmark_arguments(FrontierArguments, argv, SMOKE)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        return merge(args, out)
    points = parse_points(args.points)
    start = time.perf_counter()
    below, data = load_frontier_data(args, setup_arguments(args, points[0]))
    n = len(data["train"][1])
    members = (
        random_half_subsets(n, args.num_subsets, seed=1) if args.num_subsets else np.zeros((0, n), np.int64)
    )
    results = {
        "arguments": asdict(args), "machine": f"{platform.machine()} CPU, torch {torch.__version__}",
        "command": "python benchmarks/faithfulness/frontier.py "
        + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "num_train": len(data["train"][1]), "num_targets": len(data["targets"][1]), "points": [],
    }  # fmt: skip
    earlier = halves_from(args, results, points) if args.halves_from else None
    for index, point in enumerate(points):
        a = setup_arguments(args, point)
        full = {
            "width": a.width,
            "epochs": a.num_train_epochs,
            "lr": a.learning_rate,
            "schedule": a.lr_schedule,
            "halves": args.num_subsets,
            "heads": a.heads,
        }
        print(label(full), flush=True)
        losses = np.asarray(earlier[index]) if earlier else None
        results["points"].append({"point": full, **evaluate_point(args, a, data, below, members, losses)})
        atomic_write_text(out / "results.json", json.dumps(results, indent=2))  # a finished point is kept
    results["wall_seconds"] = time.perf_counter() - start
    write_report(results, out)
    return results


if __name__ == "__main__":
    main()
