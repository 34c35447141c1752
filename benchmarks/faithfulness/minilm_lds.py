"""LDS and the identical-class test on the real model: all-MiniLM-L6-v2 + a wide adapter, bundled Rotten Tomatoes.

Full run (the numbers of benchmarks/faithfulness/results_minilm.md):

    nice -n 10 python benchmarks/faithfulness/minilm_lds.py --output_dir benchmarks/faithfulness/results_minilm \
        --report_copy benchmarks/faithfulness/results_minilm.md --figure benchmarks/faithfulness/figures/minilm_lds.png

Smoke run (< 90 s; what tests/test_minilm_lds.py runs):

    python benchmarks/faithfulness/minilm_lds.py --output_dir /tmp/minilm_lds --smoke true

MiniLM runs once per sentence to cache the frozen [CLS] inputs of its top layer's output module; the real tail
modules (that module with its wide ``seq_bn`` adapter, the pooler, the classifier), carrying the library's turn-over
hooks, are then trained on the cache (see ``faithfulness_lib/minilm.py``). For each adapter width: lr and epochs are
picked by validation-split accuracy; the reference model is trained on N sentences; ``num_subsets`` random halves
are retrained from the same initial parameters, minibatch sequence and masks; turn-over scores (exact own-vs-flip
and linear, through ``hf_turnover.estimate_influence``) are scored by LDS against them. At the main width the peers
(TracIn, gradient dot product, exact last-layer influence function, random) and a seed ensemble join, and every
method takes the identical-class test (Hanawa et al. 2021) on the model's predicted labels.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import _paths  # noqa: F401  (benchmarks/lib on sys.path)
import numpy as np
import torch
import torch.nn.functional as F
from bench_common import parse_benchmark_arguments
from faithfulness_lib import minilm as M
from faithfulness_lib.cost import measure
from faithfulness_lib.report import lds, mean_spearman, save_figure, spearman_standard_error
from transformers import AutoTokenizer

from hf_turnover import TurnoverConfig, turnover_context
from hf_turnover.atomic import atomic_write_text
from hf_turnover.evaluation import random_half_subsets

SMOKE = {"num_train": 64, "num_targets": 3, "num_val": 64, "num_subsets": 4, "widths": "32", "main_width": 32,
         "lrs": "1e-3", "max_epochs": 1, "ensemble_size": 2, "cache_to_disk": False}  # fmt: skip


@dataclass
class MiniLMArguments:
    output_dir: str = field(
        default="benchmarks/faithfulness/results_minilm", metadata={"help": "results.json, results.md."}
    )
    report_copy: str | None = field(default=None, metadata={"help": "Also copy results.md here."})
    figure: str | None = field(
        default=None, metadata={"help": "LDS-vs-width PNG (default <output_dir>/minilm_lds.png)."}
    )
    num_train: int = field(
        default=2000, metadata={"help": "Training sentences N (train split, seeded order)."}
    )
    num_targets: int = field(default=100, metadata={"help": "Targets: held-out test-split sentences."})
    num_val: int | None = field(
        default=None, metadata={"help": "Validation sentences for lr/epoch choice (all)."}
    )
    num_subsets: int = field(default=32, metadata={"help": "Random halves retrained on (LDS)."})
    widths: str = field(default="384,1536,6144", metadata={"help": "Adapter widths W of the sweep."})
    main_width: int = field(
        default=6144, metadata={"help": "Width with peers, seeds and identical-class test."}
    )
    lrs: str = field(
        default="3e-4,1e-3,3e-3", metadata={"help": "Adam learning rates tried (validation acc.)."}
    )
    max_epochs: int = field(default=3, metadata={"help": "Epochs tried: 1..max_epochs (validation acc.)."})
    select_epochs: bool = field(
        default=True, metadata={"help": "Pick epochs in 1..max_epochs by validation (false: max_epochs)."}
    )
    batch_size: int = field(default=32, metadata={"help": "Training minibatch."})
    ensemble_size: int = field(default=3, metadata={"help": "Seeds averaged at the main width (1: none)."})
    ensemble_exact: bool = field(
        default=False, metadata={"help": "Also score the ensemble's extra seeds exactly."}
    )
    exact_batch_size: int = field(
        default=256, metadata={"help": "Training ids per forward of the exact scorer."}
    )
    step_timing: bool = field(
        default=True, metadata={"help": "Time full-model (tokens) training steps per width."}
    )
    cache_to_disk: bool = field(default=True, metadata={"help": "Keep the [CLS] feature cache in ~/.cache."})
    seed: int = field(default=0, metadata={"help": "Data order, model init, mask seed, minibatch order."})
    threads: int = field(default=1, metadata={"help": "torch threads (leave a core for others)."})
    extra_results: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated output dirs of other runs (e.g. fixed-lr controls) to tabulate too."
        },
    )
    render_only: bool = field(
        default=False, metadata={"help": "Re-write results.md and the figure from <output_dir>/results.json."}
    )
    smoke: bool = field(default=False, metadata={"help": "Tiny settings (N=64, 3 targets, 4 halves, W=32)."})


# ------------------------------------------------------------------------------------------------- helpers
def lds_with_se(scores: np.ndarray, members: np.ndarray, losses: np.ndarray) -> tuple[float, float]:
    """LDS from the bundled metric, and its standard error over targets."""
    value = lds(scores, members, losses)
    se = spearman_standard_error(scores @ members.T.astype(np.float64), -losses)
    return float(value), se


def lds_halves_se(scores: np.ndarray, members: np.ndarray, losses: np.ndarray) -> float:
    """Jackknife standard error of the LDS over the retrained halves (leave one half out). The targets share their
    halves, so the error over targets misses how much the LDS depends on which halves were drawn."""
    j = len(members)
    values = np.array([lds(scores, np.delete(members, k, 0), np.delete(losses, k, 1)) for k in range(j)])
    return float(np.sqrt((j - 1) / j * ((values - values.mean()) ** 2).sum()))


def summarize_methods(result: dict, methods: dict, members, losses, predicted, y) -> None:
    """``result["methods"]``: each method's LDS (± SE), cost and identical-class test; plus the exact-vs-linear rank
    agreement and the spread of the retrained losses."""
    rows = []
    for name, m in methods.items():
        value, se = lds_with_se(m["scores"]["true"], members, losses)
        row = {
            "method": name,
            "lds": value,
            "lds_se": se,
            "lds_halves_se": lds_halves_se(m["scores"]["true"], members, losses),
            "setup_s": m["setup_s"],
            "per_target_s": m["per_target_s"],
        }
        if "predicted" in m["scores"]:
            row.update(M.identical_class(m["scores"]["predicted"], predicted.numpy(), y.numpy()))
        rows.append(row)
    result["methods"] = rows
    if "turn-over exact" in methods and "turn-over linear" in methods:
        ex, li = methods["turn-over exact"]["scores"]["true"], methods["turn-over linear"]["scores"]["true"]
        result["exact_vs_linear_spearman"] = mean_spearman(ex, li)
        result["exact_vs_linear_spearman_se"] = spearman_standard_error(ex, li)
    result["subset_loss_std_mean"] = float(losses.std(1).mean())


def select_hyperparameters(tail, init, feats, y, val, args, order_seed) -> dict:
    """Validation-split accuracy after each epoch for each lr; the best (lr, epochs), ties to fewer epochs."""
    grid = {}
    best = (-1.0, None, None)
    for lr in [float(v) for v in args.lrs.split(",")]:
        run = M.train_tail(tail, init, feats, y, lr=lr, epochs=args.max_epochs, order_seed=order_seed,
                           batch_size=args.batch_size, val=val)  # fmt: skip
        grid[str(lr)] = run.val_accuracy
        for epoch, acc in enumerate(run.val_accuracy, start=1):
            if not args.select_epochs and epoch != args.max_epochs:
                continue
            if acc > best[0] + 1e-12:
                best = (acc, lr, epoch)
    return {"grid_val_accuracy": grid, "lr": best[1], "epochs": best[2], "val_accuracy": best[0]}


def full_step_seconds(
    adapter_config, sentences: list[str], tokenizer, steps: int = 3, seed: int = 0
) -> float:
    """Seconds per training step of the whole model from tokens (batch of ``len(sentences)``), turn-over on."""
    from transformers.utils import logging

    from hf_turnover.modeling_turnover import TurnoverBertForSequenceClassification

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = TurnoverBertForSequenceClassification.from_backbone(
        M.backbone_path(),
        adapter_name=M.ADAPTER_NAME,
        adapter_config=adapter_config,
        turnover=TurnoverConfig(),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    tokens = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    labels = torch.zeros(len(sentences), dtype=torch.int64)
    model.train()
    times = []
    for step in range(steps + 1):  # the first is a warm-up
        start = time.perf_counter()
        with turnover_context(torch.arange(len(sentences))):
            loss = F.cross_entropy(model(**tokens).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


# -------------------------------------------------------------------------------------------------- scoring
def score_turnover(tail, feats_t, y_t, n, method, args):
    kwargs = {"batch_size": args.exact_batch_size} if method == "exact" else {}
    import hf_turnover

    rows = [{"intermediate": feats_t.intermediate[i], "attention": feats_t.attention[i], "labels": int(y_t[i])}
            for i in range(len(y_t))]  # fmt: skip
    result = hf_turnover.estimate_influence(tail, None, rows, train_ids=list(range(n)), method=method,
                                            check_fingerprint=False, progress=False, positions=None, **kwargs)  # fmt: skip
    from hf_turnover.evaluation import score_matrix

    return score_matrix(result, range(len(rows)), np.arange(n))[0]


def peer_scores(tail, reference, checkpoints, lr, feats, y, feats_t, labels_by_kind: dict) -> dict:
    """TracIn (end-of-epoch checkpoints, lr-weighted), gradient dot product (final weights), exact last-layer
    influence function and random; scores for every label set in ``labels_by_kind`` (true / predicted)."""
    out = {}
    # TracIn and gradient dot: train-side factors are the setup, target-side factors + products per target
    train_factors, setup = measure(
        lambda: [(_load(tail, c), M.GradFactors(tail, feats, y))[1] for c in checkpoints]
    )
    for name, picks in (("TracIn (per-epoch checkpoints)", range(len(checkpoints))),
                        ("gradient dot product (final weights)", [len(checkpoints) - 1])):  # fmt: skip
        scores, cost = {}, None
        for kind, labels in labels_by_kind.items():

            def run(labels=labels, picks=picks):
                total = 0
                for k in picks:
                    _load(tail, checkpoints[k])
                    total = total + (lr if len(picks) > 1 else 1.0) * M.GradFactors(
                        tail, feats_t, labels
                    ).dot(train_factors[k])
                return total.numpy()

            scores[kind], c = measure(run)
            cost = cost or c
        note_setup = setup.seconds * (len(picks) / len(checkpoints))
        out[name] = {"scores": scores, "setup_s": note_setup, "per_target_s": cost.seconds / len(feats_t)}
    _load(tail, reference)
    # exact last-layer influence function on the pooled features (fixed), damping 0.01
    x_train = M.pooled_features(tail, feats)
    influence, setup = measure(lambda: M.TailLastLayerInfluence(tail, x_train, y))
    scores, cost = {}, None
    for kind, labels in labels_by_kind.items():
        scores[kind], c = measure(
            lambda labels=labels: influence.scores(M.pooled_features(tail, feats_t), labels)
        )
        cost = cost or c
    out["influence function (last layer, exact)"] = {"scores": scores, "setup_s": setup.seconds,
                                                      "per_target_s": cost.seconds / len(feats_t)}  # fmt: skip
    rnd = np.random.default_rng(12345).standard_normal((len(feats_t), len(y)))
    out["random"] = {"scores": {k: rnd for k in labels_by_kind}, "setup_s": 0.0, "per_target_s": 0.0}
    return out


def _load(tail, state) -> None:
    M.load_params(tail, state)


# ---------------------------------------------------------------------------------------------------- width
def run_width(width, args, data, tokenizer, members, main: bool) -> dict:
    feats, y, val, feats_t, y_t, test, sentences = data
    n = len(y)
    cfg = TurnoverConfig(p=0.5, seed=args.seed)
    model = M.build_model(width, args.seed)
    tail = M.make_tail(model, cfg)
    init = M.snapshot(tail)
    order_seed = args.seed + 1_000_003
    t0 = time.perf_counter()
    chosen = select_hyperparameters(tail, init, feats, y, val, args, order_seed)
    select_s = time.perf_counter() - t0
    ref_run = M.train_tail(tail, init, feats, y, lr=chosen["lr"], epochs=chosen["epochs"], order_seed=order_seed,
                           batch_size=args.batch_size, checkpoints=True)  # fmt: skip
    reference = M.snapshot(tail)
    check_text = sentences["targets"][:8] + sentences["train"][:8]
    check = M.verify_tail(model, tail, cfg, tokenizer, check_text, list(range(len(check_text))))
    scale = max(check["logit_scale"], 1.0)
    for mode in ("full", "own", "flip"):
        assert check[mode] <= 1e-4 * scale, f"cached tail differs from the full model ({mode}): {check}"
    with torch.no_grad():
        logits_t = M.logits(tail, feats_t)
    predicted = logits_t.argmax(-1)
    result = {
        "width": width, "selection": chosen, "selection_seconds": select_s,
        "train_seconds": ref_run.seconds, "train_steps": ref_run.steps,
        "seconds_per_step_tail": ref_run.seconds / max(ref_run.steps, 1),
        "val_accuracy": M.accuracy(tail, *val), "test_accuracy": M.accuracy(tail, *test),
        "target_accuracy": float((predicted == y_t).float().mean()), "tail_check": check,
        "trainable_parameters": int(sum(p.numel() for p in M.trainable(tail).values())),
    }  # fmt: skip
    wrong = (predicted != y_t).numpy()
    methods = {}
    for method in ("exact", "linear"):
        true_scores, cost = measure(lambda method=method: score_turnover(tail, feats_t, y_t, n, method, args))
        pred_scores = true_scores.copy()
        if wrong.any():
            idx = np.flatnonzero(wrong)
            sub = M.Cached(feats_t.intermediate[idx], feats_t.attention[idx])
            pred_scores[idx] = score_turnover(tail, sub, predicted[idx], n, method, args)
        methods[f"turn-over {method}"] = {"scores": {"true": true_scores, "predicted": pred_scores},
                                          "setup_s": 0.0, "per_target_s": cost.seconds / len(y_t)}  # fmt: skip
    if main:
        labels = {"true": y_t, "predicted": predicted}
        methods.update(
            peer_scores(tail, reference, ref_run.checkpoints, chosen["lr"], feats, y, feats_t, labels)
        )
        methods.update(ensemble(args, width, chosen, feats, y, feats_t, y_t, methods))
    # LDS truth: the same init, minibatch sequence and masks, trained on each half
    t0 = time.perf_counter()
    losses = np.stack([
        (M.train_tail(tail, init, feats, y, lr=chosen["lr"], epochs=chosen["epochs"], order_seed=order_seed,
                      members=row, batch_size=args.batch_size), M.target_losses(tail, feats_t, y_t))[1]
        for row in members
    ], axis=1)  # (T, J)  # fmt: skip
    result["lds_retrain_seconds"] = time.perf_counter() - t0
    _load(tail, reference)
    summarize_methods(result, methods, members, losses, predicted, y)
    if args.smoke:  # the rank-one gradient factorisation against torch.func per-sample gradients
        sub = slice(0, min(16, n))
        factors = M.GradFactors(tail, M.Cached(feats.intermediate[sub], feats.attention[sub]), y[sub])
        reference_grads = M.per_sample_grads_reference(
            tail, M.Cached(feats.intermediate[sub], feats.attention[sub]), y[sub]
        )
        result["grad_factor_max_error"] = float((factors.flat() - reference_grads).abs().max())
        result["grad_scale"] = float(reference_grads.abs().max())
    return result


def ensemble(args, width, chosen, feats, y, feats_t, y_t, methods) -> dict:
    """Mean scores of ``ensemble_size`` turn-over models (seeds seed..seed+k-1: init, masks and batch order)."""
    if args.ensemble_size < 2:
        return {}
    kinds = ["linear"] + (["exact"] if args.ensemble_exact else [])
    sums = {k: {"true": methods[f"turn-over {k}"]["scores"]["true"].copy()} for k in kinds}
    costs = {k: 0.0 for k in kinds}
    train_s = 0.0
    for seed in range(args.seed + 1, args.seed + args.ensemble_size):
        model = M.build_model(width, seed)
        tail = M.make_tail(model, TurnoverConfig(p=0.5, seed=seed))
        run = M.train_tail(tail, M.snapshot(tail), feats, y, lr=chosen["lr"], epochs=chosen["epochs"],
                           order_seed=seed + 1_000_003, batch_size=args.batch_size)  # fmt: skip
        train_s += run.seconds
        for k in kinds:
            scores, cost = measure(lambda k=k, tail=tail: score_turnover(tail, feats_t, y_t, len(y), k, args))
            sums[k]["true"] += scores
            costs[k] += cost.seconds
    out = {}
    for k in kinds:
        out[f"turn-over {k}, mean of {args.ensemble_size} seeds"] = {
            "scores": {"true": sums[k]["true"] / args.ensemble_size}, "setup_s": train_s,
            "per_target_s": methods[f"turn-over {k}"]["per_target_s"] + costs[k] / len(y_t),
        }  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------------- report
def _f(v, d=3):
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.{d}f}"


def _halves(row: dict) -> str:
    """`` (± x)``: the jackknife error over halves, where the run measured it."""
    return f" (± {_f(row['lds_halves_se'])})" if "lds_halves_se" in row else ""


def methods_table(methods: list[dict]) -> list[str]:
    """Markdown lines of the methods table: LDS, identical-class test, distinct top-5, cost."""
    lines = [
        "| method | LDS ± SE over targets (± over halves) | helpful top-1 same class | harmful top-1 other class | distinct top-5 helpful | setup s | s / target |",
        "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in methods:
        lines.append(
            f"| {r['method']} | {_f(r['lds'])} ± {_f(r['lds_se'])}{_halves(r)} | {_f(r.get('helpful_same_class'))} | "
            f"{_f(r.get('harmful_other_class'))} | {r.get('distinct_top5_helpful', '-')} | {_f(r['setup_s'], 1)} | "
            f"{_f(r['per_target_s'], 4)} |"
        )
    return lines


SWEEP_HEAD = (
    "| W | lr, epochs | val acc | test acc | LDS exact | LDS linear | exact vs linear rho | s/step tail | "
    "s/step tail rel. | s/step full model | s/target exact | s/target linear |"
)


def sweep_rows(widths: list[dict], base: dict) -> list[str]:
    out = []
    for w in widths:
        ex = next(r for r in w["methods"] if r["method"] == "turn-over exact")
        li = next(r for r in w["methods"] if r["method"] == "turn-over linear")
        out.append(
            f"| {w['width']} | {w['selection']['lr']}, {w['selection']['epochs']} | {w['val_accuracy']:.3f} | "
            f"{w['test_accuracy']:.3f} | {_f(ex['lds'])} ± {_f(ex['lds_se'])} | {_f(li['lds'])} ± {_f(li['lds_se'])} | "
            f"{w['exact_vs_linear_spearman']:.3f} | {w['seconds_per_step_tail']:.4f} | "
            f"{w['seconds_per_step_tail'] / base['seconds_per_step_tail']:.2f} | "
            f"{_f(w.get('seconds_per_step_full'), 3)} | {_f(ex['per_target_s'], 3)} | {_f(li['per_target_s'], 4)} |"
        )
    return out


def markdown(results: dict) -> str:
    a = results["arguments"]
    main = next(w for w in results["widths"] if w["width"] == a["main_width"]) if any(
        w["width"] == a["main_width"] for w in results["widths"]) else results["widths"][0]  # fmt: skip
    lines = [
        "# Turn-over influence on the real model: MiniLM-L6 + wide adapter, Rotten Tomatoes",
        "",
        f"Written by `benchmarks/faithfulness/minilm_lds.py`. Command: `{results['command']}`",
        f"Wall time {results['wall_seconds'] / 60:.1f} min on {results['machine']} ({a['threads']} torch thread(s), "
        "other jobs running). Seeds: data order / model init / mask seed / minibatch order "
        f"{a['seed']}; halves `random_half_subsets(N, {a['num_subsets']}, seed={a['seed'] + 1})`.",
        "",
        "## Set-up",
        "",
        "* all-MiniLM-L6-v2 (frozen) + one `seq_bn` adapter of W units in the top layer "
        "(`hf_turnover.wide.wide_adapter_config`) + classifier; turn-over (p = 0.5) on the adapter_down output and "
        "the classifier input (384 units). Trainable: adapter_down, adapter_up, classifier (pooler frozen, as "
        "`from_backbone` leaves it). Plain dropout off: turn-over is the only dropout.",
        f"* N = {results['num_train']} sentences of the bundled `rotten_tomatoes` train split (seeded permutation); "
        f"{results['num_targets']} targets = first rows of a seeded permutation of the test split; lr and epochs "
        f"chosen by accuracy on {results['num_val']} validation-split sentences (grid lr {a['lrs']} x epochs "
        f"1..{a['max_epochs']}), never on the targets. Adam, batch {a['batch_size']}.",
        "* MiniLM ran once per sentence; the frozen [CLS] inputs of `bert.encoder.layer.5.output` were cached and "
        "the real tail modules (with the library's hooks and mask names) trained on them. Max |logit difference| "
        f"tail vs full model at the main width: unmasked {main['tail_check']['full']:.2g}, own masks "
        f"{main['tail_check']['own']:.2g}, flipped {main['tail_check']['flip']:.2g} (logits up to "
        f"{main['tail_check']['logit_scale']:.2f}).",
        f"* LDS: {a['num_subsets']} random halves, each retrained from the same initial parameters, minibatch "
        "sequence (non-members dropped from each minibatch) and masks; target loss of the full network; "
        '`load_faithfulness_metric("linear_datamodeling")`, ± standard error over targets.',
        "* Identical-class test (Hanawa et al., ICLR 2021): scores explain the model's PREDICTED label; rate at which "
        "the top-1 most helpful training sentence carries that label, and the top-1 most harmful the other label; "
        "distinct training sentences over all targets' top-5 helpful lists.",
        "* Peers on the same trainable part: TracIn (end-of-epoch checkpoints, weighted by the Adam base lr), "
        "gradient dot product at the final weights (both exact, via the rank-one per-sample gradients of the "
        "Linear layers at the single [CLS] position), the exact last-layer influence function (classifier, pooled "
        "features fixed, damping 0.01, as `peers.LastLayerInfluence`), random.",
        "",
        f"## Main width W = {main['width']}",
        "",
        f"lr {main['selection']['lr']}, {main['selection']['epochs']} epoch(s); accuracy: validation "
        f"{main['val_accuracy']:.3f}, test (1,057) {main['test_accuracy']:.3f}, targets {main['target_accuracy']:.3f}. "
        f"Training: {main['seconds_per_step_tail'] * 1000:.0f} ms/step on the cached tail, {main['train_steps']} steps.",
        "",
        *methods_table(main["methods"]),
    ]
    ranked = sorted(main["methods"], key=lambda r: -r["lds"])
    exact = next(r for r in main["methods"] if r["method"] == "turn-over exact")
    best_peer = next(r for r in ranked if not r["method"].startswith("turn-over"))
    lines += [
        "",
        f"Highest LDS: {ranked[0]['method']} ({_f(ranked[0]['lds'])}). Turn-over exact minus the best peer "
        f"({best_peer['method']}): {exact['lds'] - best_peer['lds']:+.3f}.",
    ]
    lrs = {w["width"]: w["selection"]["lr"] for w in results["widths"]}
    if len(set(lrs.values())) > 1:
        lines.append(
            f"Caution: the validation-chosen lr differs between widths ({lrs}), so the width sweep mixes width "
            "and learning rate; the fixed-lr runs below separate them."
        )
    lines += [
        "",
        f"Distinct top-5: out of {main['methods'][0].get('top_lists_possible')} list entries "
        f"({results['num_targets']} targets x 5). Exact vs linear rank agreement (mean per-target Spearman over all "
        f"N scores): {main['exact_vs_linear_spearman']:.3f} ± {main['exact_vs_linear_spearman_se']:.3f}.",
        "",
        "## Width sweep (one model per width, same halves)",
        "",
        SWEEP_HEAD,
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += sweep_rows(results["widths"], results["widths"][0])
    for path, extra in results.get("extra", {}).items():
        lines += [
            "",
            f"Extra run `{extra['command']}` ({path}; N = {extra['num_train']}; "
            + (
                "lr and epochs FIXED, not chosen by validation"
                if len(extra["arguments"]["lrs"].split(",")) == 1 and not extra["arguments"]["select_epochs"]
                else "lr and epochs chosen by validation"
            )
            + f"; wall {extra['wall_seconds'] / 60:.1f} min):",
            "",
            SWEEP_HEAD,
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += sweep_rows(extra["widths"], results["widths"][0])
        for w in extra["widths"]:
            peers = [r for r in w["methods"] if not r["method"].startswith("turn-over")]
            if peers:
                lines.append(
                    f"\nPeers on that W={w['width']} model: "
                    + ", ".join(f"{r['method']} LDS {_f(r['lds'])} ± {_f(r['lds_se'])}" for r in peers)
                    + "."
                )
    if results.get("default_recipe_step_full") is not None:
        lines += ["", f"Default recipe adapter (double_seq_bn, reduction 16, top layer: 2 x 24 units), full-model "
                  f"training step from tokens, batch {a['batch_size']}: {results['default_recipe_step_full']:.3f} s."]  # fmt: skip
    lines += [
        "",
        "Full-model step: one training step of the whole model from tokens (batch of training sentences, "
        "turn-over on), what training without the feature cache costs.",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    widths = [w["width"] for w in results["widths"]]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, style in (("turn-over exact", "o-"), ("turn-over linear", "s--")):
        vals = [next(r for r in w["methods"] if r["method"] == name) for w in results["widths"]]
        ax.errorbar(
            widths,
            [v["lds"] for v in vals],
            yerr=[v["lds_se"] for v in vals],
            fmt=style,
            label=name,
            capsize=3,
        )
    for w in results["widths"]:  # the chosen lr differs between widths: say so on the plot
        ex = next(r for r in w["methods"] if r["method"] == "turn-over exact")
        ax.annotate(f"lr {w['selection']['lr']:g}", (w["width"], ex["lds"]), textcoords="offset points",
                    xytext=(4, 6), fontsize=7)  # fmt: skip
    for extra in results.get("extra", {}).values():
        for w in extra["widths"]:
            ex = next(r for r in w["methods"] if r["method"] == "turn-over exact")
            ax.plot(w["width"], ex["lds"], "x", color="k", ms=7)
            ax.annotate(f"exact, fixed lr {w['selection']['lr']:g}", (w["width"], ex["lds"]),
                        textcoords="offset points", xytext=(5, -12), fontsize=7)  # fmt: skip
    main = next((w for w in results["widths"] if w["width"] == results["arguments"]["main_width"]), None)
    if main is not None:
        colors = iter(["C2", "C3", "C4", "C5", "C6", "C7"])
        for r in main["methods"]:
            if not r["method"].startswith("turn-over exact") and r["method"] != "turn-over linear":
                ax.axhline(
                    r["lds"],
                    color=next(colors),
                    ls=":",
                    label=f"{r['method']} (W={main['width']}, lr {main['selection']['lr']:g})",
                )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("adapter width W (masked units)")
    ax.set_ylabel("LDS (Spearman)")
    ax.set_title(f"MiniLM-L6 + wide adapter, N={results['num_train']}, {results['num_targets']} targets")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    args = parse_benchmark_arguments(MiniLMArguments, argv, SMOKE)
    start = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        return render(json.loads((out / "results.json").read_text()), args, out)
    tokenizer = AutoTokenizer.from_pretrained(M.backbone_path())
    s = M.load_sentences(args.num_train, args.num_targets, args.num_val, args.seed)
    base = M.build_model(32, args.seed)  # the cache is adapter-independent
    disk = args.cache_to_disk
    t0 = time.perf_counter()
    if disk:  # one cache of the whole permuted train split serves every N
        train_all = M.cache_cls_inputs(base, tokenizer, s.all_train_text, use_disk=True)
        feats = M.Cached(train_all.intermediate[: args.num_train], train_all.attention[: args.num_train])
    else:
        feats = M.cache_cls_inputs(base, tokenizer, s.train_text, use_disk=False)
    val = (M.cache_cls_inputs(base, tokenizer, s.val_text, use_disk=disk), torch.as_tensor(s.val_y))
    if disk:
        test_feats = M.cache_cls_inputs(base, tokenizer, s.test_text, use_disk=True)
        feats_t = M.Cached(
            test_feats.intermediate[: args.num_targets], test_feats.attention[: args.num_targets]
        )
    else:
        feats_t = M.cache_cls_inputs(base, tokenizer, s.target_text, use_disk=False)
        test_feats = feats_t  # smoke: accuracy on the targets only
    test = (test_feats, torch.as_tensor(s.test_y[: len(test_feats)]))
    cache_s = time.perf_counter() - t0
    y, y_t = torch.as_tensor(s.train_y), torch.as_tensor(s.target_y)
    data = (feats, y, val, feats_t, y_t, test, {"train": s.train_text, "targets": s.target_text})
    members = random_half_subsets(args.num_train, args.num_subsets, seed=args.seed + 1)
    widths = [int(w) for w in args.widths.split(",") if w.strip()]
    if args.main_width in widths:  # main width first: its results exist even if a long sweep is cut short
        widths = [args.main_width] + [w for w in widths if w != args.main_width]
    results = {
        "arguments": asdict(args),
        "command": "python benchmarks/faithfulness/minilm_lds.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}", "num_train": args.num_train,
        "num_targets": args.num_targets, "num_val": len(s.val_y), "cache_seconds": cache_s,
        "train_label_balance": float(s.train_y.mean()), "widths": [],
    }  # fmt: skip
    for width in widths:
        result = run_width(width, args, data, tokenizer, members, main=width == args.main_width)
        if args.step_timing:
            config = M.wide_adapter_config(base.config, width=width)
            result["seconds_per_step_full"] = full_step_seconds(
                config, s.train_text[: args.batch_size], tokenizer
            )
        results["widths"].append(result)
        results["widths"].sort(key=lambda w: w["width"])
        results["wall_seconds"] = time.perf_counter() - start
        atomic_write_text(out / "results.json", json.dumps(results, indent=2))
        print(
            f"W={width}: " + ", ".join(f"{r['method']} LDS {r['lds']:.3f}" for r in result["methods"]),
            flush=True,
        )
    if args.step_timing:
        from adapters import AdapterConfig

        recipe = AdapterConfig.load("double_seq_bn").replace(
            leave_out=list(range(base.config.num_hidden_layers - 1))
        )
        results["default_recipe_step_full"] = full_step_seconds(
            recipe, s.train_text[: args.batch_size], tokenizer
        )
    results["wall_seconds"] = time.perf_counter() - start
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    return render(results, args, out)


def render(results: dict, args: MiniLMArguments, out: Path) -> dict:
    """results.md (with any --extra_results runs tabulated), the figure, and the report copy."""
    figure = Path(args.figure or out / "minilm_lds.png")
    results["extra"] = {
        d: json.loads((Path(d) / "results.json").read_text())
        for d in (args.extra_results or "").split(",")
        if d.strip()
    }
    report = markdown(results)
    atomic_write_text(out / "results.md", report)
    plot(results, figure)
    if args.report_copy:
        atomic_write_text(Path(args.report_copy), report)
    print(report, flush=True)
    return results


if __name__ == "__main__":
    main()
