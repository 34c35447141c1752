"""LDS and the identical-class test for the default model's design: all-MiniLM-L6-v2 + ``seq_bn`` adapters in the
top two layers, bundled Rotten Tomatoes (the one-layer, [CLS]-only set-up is ``benchmarks/faithfulness/minilm_lds.py``).

Full run (the numbers of benchmarks/faithfulness/results_minilm_top2/):

    nice -n 10 python benchmarks/faithfulness/minilm_top_lds.py --output_dir benchmarks/faithfulness/results_minilm_top2

Masks on the top layer's adapter only, the adapter below it trained unmasked (the paper's "masks on the later
layers" set-up; benchmarks/faithfulness/results_minilm_top2_masked1/):

    nice -n 10 python benchmarks/faithfulness/minilm_top_lds.py --output_dir benchmarks/faithfulness/results_minilm_top2_masked1 \
        --top_layers 2 --masked_layers 1

Smoke run (< 90 s; what tests/test_minilm_top_lds.py runs):

    python benchmarks/faithfulness/minilm_top_lds.py --output_dir /tmp/minilm_top_lds --smoke true

The design (``benchmarks/faithfulness/default_model_sweep.py``): ``width`` adapter units in the top layer, ``lower_width`` in
each layer below it down to ``top_layers``, turn-over (p = 0.5) on the ``adapter_down`` output of the top
``masked_layers`` layers (default: all ``top_layers``) and on the classifier input, AdamW at a fixed lr, linear
schedule with warm-up, length-grouped minibatches. MiniLM runs once per sentence to cache the output of the frozen
layers (every position); the model then trains and is scored on that cache as itself
(``faithfulness_lib/minilm_top.py``). The reference model is trained on N sentences; ``num_subsets`` random halves
are retrained from the same initial parameters, minibatch sequence, lr schedule and masks. Turn-over exact and
linear (``hf_turnover.estimate_influence``) and the peers (exact last-layer influence function, gradient dot
product, TracIn, random) are scored by LDS against them and take the identical-class test on the predicted labels.
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import _paths  # noqa: F401  (benchmarks/lib on sys.path)
import numpy as np
import torch
from bench_common import parse_benchmark_arguments
from faithfulness_lib import minilm as M
from faithfulness_lib import minilm_top as top
from faithfulness_lib.cost import measure
from faithfulness_lib.minilm_top_grads import Grads, capture, grad_dot, per_sample_grads_loop
from minilm_lds import _f, methods_table, summarize_methods
from transformers import AutoTokenizer

from hf_turnover.atomic import atomic_write_text
from hf_turnover.evaluation import random_half_subsets, seed_agreement
from hf_turnover.model import get_turnover_config, turnover_layers

SMOKE = {"num_train": 64, "num_targets": 3, "num_val": 64, "num_subsets": 4, "width": 32, "lower_width": 16,
         "tracin_checkpoints": 2, "cache_to_disk": False}  # fmt: skip


@dataclass
class MiniLMTopArguments:
    output_dir: str = field(
        default="benchmarks/faithfulness/results_minilm_top2", metadata={"help": "results.json, results.md."}
    )
    num_train: int = field(
        default=2000, metadata={"help": "Training sentences N (train split, seeded order)."}
    )
    num_targets: int = field(default=100, metadata={"help": "Targets: held-out test-split sentences."})
    num_val: int | None = field(default=None, metadata={"help": "Validation sentences for accuracy (all)."})
    num_subsets: int = field(default=32, metadata={"help": "Random halves retrained on (LDS)."})
    top_layers: int = field(default=2, metadata={"help": "Encoder layers (from the top) with an adapter."})
    masked_layers: int | None = field(
        default=None,
        metadata={"help": "Top adapter layers with turn-over masks (None: all top_layers); the adapters below "
                  "them train on every instance unmasked. The classifier input is always masked."},
    )  # fmt: skip
    width: int = field(default=1536, metadata={"help": "Adapter units in the top layer."})
    lower_width: int = field(default=384, metadata={"help": "Adapter units in each layer below the top one."})
    heads: int = field(default=1, metadata={"help": "Masked heads on the frozen body (hf_turnover.heads)."})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW peak lr (no weight decay)."})
    num_train_epochs: int = field(default=1, metadata={"help": "Epochs."})
    warmup_ratio: float = field(default=0.06, metadata={"help": "Linear warm-up share of the steps."})
    lr_schedule: str = field(
        default="linear", metadata={"help": "After warm-up: 'linear' decay to zero or 'constant'."}
    )
    stability: bool = field(
        default=False,
        metadata={"help": "Also train a second model with seed + 1 (init, masks, minibatch order) and report how "
                  "well each method's scores agree across the two (hf_turnover.evaluation.seed_agreement)."},
    )  # fmt: skip
    batch_size: int = field(default=32, metadata={"help": "Training minibatch."})
    tracin_checkpoints: int = field(
        default=4, metadata={"help": "Evenly spaced TracIn checkpoints (0: no TracIn)."}
    )
    exact_batch_size: int | None = field(
        default=None, metadata={"help": "Ids per forward, exact (None: auto)."}
    )
    turnover_methods: str = field(
        default="exact,linear,centered",
        metadata={"help": "Turn-over scoring methods to compare (comma-separated)."},
    )
    peers: bool = field(
        default=True,
        metadata={
            "help": "Score the peers (influence function, gradient dot product, TracIn); random always."
        },
    )
    cache_to_disk: bool = field(default=True, metadata={"help": "Keep the frozen-layer cache in ~/.cache."})
    seed: int = field(default=0, metadata={"help": "Data order, model init, mask seed, minibatch order."})
    threads: int = field(default=1, metadata={"help": "torch threads (leave a core for others)."})
    smoke: bool = field(
        default=False, metadata={"help": "Tiny settings (N=64, 3 targets, 4 halves, W=32/16)."}
    )


def masked_target_modules(args, num_layers: int = 6) -> str:
    """Regex of the adapter_down modules that carry turn-over masks: those of the top ``masked_layers`` layers."""
    masked = "|".join(str(i) for i in range(num_layers - args.masked_layers, num_layers))
    return rf"bert\.encoder\.layer\.({masked})\.output\.adapters\..*\.adapter_down"


def load_data(args, model, tokenizer, below: int):
    """Sentences and their frozen-layer caches: train (N), validation, test (whole split; smoke: the targets)."""
    s = M.load_sentences(args.num_train, args.num_targets, args.num_val, args.seed)
    cache = lambda text: top.cache_hidden(model, tokenizer, text, below, use_disk=args.cache_to_disk)  # noqa: E731
    test_text = s.test_text if not args.smoke else s.target_text
    data = {
        "train": (cache(s.train_text), torch.as_tensor(s.train_y)),
        "val": (cache(s.val_text), torch.as_tensor(s.val_y)),
        "test": (cache(test_text), torch.as_tensor(s.test_y[: len(test_text)])),
    }
    hidden_test = data["test"][0]
    data["targets"] = (hidden_test.subset(range(args.num_targets)), torch.as_tensor(s.target_y))
    return s, data


def score_turnover(model, args, hidden_t, y_t, predicted, n, hidden_train) -> dict:
    """Turn-over exact, linear and centered, explaining the true labels and (rescored where they differ) the
    predicted. The centered reference: the first 1,024 training sentences under their predicted labels."""
    wrong = np.flatnonzero((predicted != y_t).numpy())
    methods = args.turnover_methods.split(",")
    if "centered" in methods:
        reference, reference_cost = measure(lambda: top.reference_gradient(model, hidden_train))
    out = {}
    for method in methods:
        size = args.exact_batch_size if method == "exact" else None
        ref = reference if method == "centered" else None
        true, cost = measure(
            lambda method=method, size=size, ref=ref: top.turnover_scores(
                model, hidden_t, y_t, n, method, size, ref
            )
        )
        pred = true.copy()
        if len(wrong):
            pred[wrong] = top.turnover_scores(
                model, hidden_t.subset(wrong), predicted[wrong], n, method, size, ref
            )
        setup = reference_cost.seconds if ref is not None else 0.0
        out[f"turn-over {method}"] = {"scores": {"true": true, "predicted": pred}, "setup_s": setup,
                                      "per_target_s": cost.seconds / len(y_t)}  # fmt: skip
    return out


def score_peers(model, args, data, run, reference, labels_by_kind, total_steps) -> dict:
    """Exact last-layer influence function, gradient dot product (final weights), TracIn, random."""
    (hidden, y), (hidden_t, _) = data["train"], data["targets"]
    rnd = np.random.default_rng(12345).standard_normal((len(hidden_t), len(y)))
    out = {}
    if not args.peers:
        out["random"] = {"scores": {k: rnd for k in labels_by_kind}, "setup_s": 0.0, "per_target_s": 0.0}
        return out
    x_train = top.pooled_features(model, hidden)
    influence, setup = measure(lambda: M.TailLastLayerInfluence(model, x_train, y))
    x_t = top.pooled_features(model, hidden_t)
    scores, cost = measure(lambda: {k: influence.scores(x_t, v) for k, v in labels_by_kind.items()})
    out["influence function (last layer, exact)"] = {"scores": scores, "setup_s": setup.seconds,
                                                      "per_target_s": cost.seconds / len(hidden_t)}  # fmt: skip
    if args.stability:  # self-influence, compared across seeds
        out["influence function (last layer, exact)"]["self"] = influence.self_scores()
    dots, cost = measure(lambda: grad_dot(model, hidden_t, labels_by_kind, hidden, y))
    out["gradient dot product (final weights)"] = {
        "scores": dots,
        "setup_s": cost.seconds,
        "per_target_s": 0.0,
    }
    if run.checkpoints:
        start = time.perf_counter()
        steps = checkpoint_steps(args, total_steps)
        traced = {k: 0.0 for k in labels_by_kind}
        for k, (state, end) in enumerate(zip(run.checkpoints, steps, strict=True)):
            begin = steps[k - 1] if k else 0  # the checkpoint stands for the steps since the previous one
            weight = sum(
                top.lr_at(args.learning_rate, s, total_steps, args.warmup_ratio, args.lr_schedule)
                for s in range(begin, end)
            )
            M.load_params(model, state)  # the last one is the final weights: its dot products are known
            done = dots if end == total_steps else grad_dot(model, hidden_t, labels_by_kind, hidden, y)
            for kind, d in done.items():
                traced[kind] = traced[kind] + weight * d
        M.load_params(model, reference)
        out[f"TracIn ({len(steps)} checkpoints, lr-weighted)"] = {
            "scores": traced, "setup_s": time.perf_counter() - start, "per_target_s": 0.0}  # fmt: skip
    out["random"] = {"scores": {k: rnd for k in labels_by_kind}, "setup_s": 0.0, "per_target_s": 0.0}
    return out


def checkpoint_steps(args, total_steps: int) -> tuple[int, ...]:
    k = args.tracin_checkpoints
    return tuple(sorted({max(1, round(total_steps * j / k)) for j in range(1, k + 1)})) if k else ()


def grad_check(model, data) -> dict:
    """Gradient dot products (factorised, [CLS] slice) against per-row autograd, on 8 training rows."""
    hidden, y = data["train"]
    rows = list(range(min(8, len(y))))
    sub = hidden.subset(rows)
    grads = Grads(capture(model, sub, y[rows], rows, top.ClsOnly(model, sub)))
    reference = per_sample_grads_loop(model, sub, y[rows]).double()
    expected = reference @ reference.T
    return {"grad_dot_max_error": float((grads.dot(grads) - expected).abs().max()),
            "grad_dot_scale": float(expected.abs().max())}  # fmt: skip


def train_options(args, seed: int) -> dict:
    return dict(lr=args.learning_rate, epochs=args.num_train_epochs, order_seed=seed + 1_000_003,
                batch_size=args.batch_size, warmup_ratio=args.warmup_ratio, schedule=args.lr_schedule)  # fmt: skip


def train_and_score(args, model, data, seed: int) -> tuple[dict, dict, dict]:
    """Train ``model`` (on the cache, from its own init) and score turn-over and the peers on the targets; with
    ``args.stability`` also the self-influence of the training set. Inside ``cut_bottom``."""
    (hidden, y), (hidden_t, y_t) = data["train"], data["targets"]
    n = len(y)
    total_steps = args.num_train_epochs * math.ceil(n / args.batch_size)
    init = M.snapshot(model)
    run = top.train_top(model, init, hidden, y, checkpoint_steps=checkpoint_steps(args, total_steps),
                        **train_options(args, seed))  # fmt: skip
    reference = M.snapshot(model)
    predicted = top.logits(model, hidden_t).argmax(-1)
    result = {
        "train_seconds": run.seconds, "train_steps": run.steps,
        "val_accuracy": top.accuracy(model, *data["val"]), "test_accuracy": top.accuracy(model, *data["test"]),
        "target_accuracy": float((predicted == y_t).float().mean()),
        "trainable_parameters": int(sum(p.numel() for p in M.trainable(model).values())),
    }  # fmt: skip
    print(f"seed {seed}: val acc {result['val_accuracy']:.3f}, {run.seconds:.0f} s", flush=True)
    methods = score_turnover(model, args, hidden_t, y_t, predicted, n, hidden)
    labels = {"true": y_t, "predicted": predicted}
    methods.update(score_peers(model, args, data, run, reference, labels, total_steps))
    if args.stability and "turn-over linear" in methods:  # self-influence, compared across seeds
        methods["turn-over linear"]["self"] = top.turnover_self_influence(model, hidden, y)
    print(f"seed {seed}: scored", flush=True)
    return result, methods, {"init": init, "predicted": predicted}


def stability(args, data, below: int, methods: dict) -> dict:
    """Seed-to-seed agreement: a second model (seed + 1: init, masks, minibatch order) trained and scored as the
    first; each method's scores of the same targets (true labels) and self-influence compared."""
    model = build(args, args.seed + 1)
    with top.cut_bottom(model, below):
        result, second, _ = train_and_score(args, model, data, args.seed + 1)
    agreement = {}
    for name, m in methods.items():
        if name == "random" or name not in second:
            continue
        row = seed_agreement(m["scores"]["true"], second[name]["scores"]["true"], top_k=10)
        if "self" in m:
            row["self_influence_spearman"] = seed_agreement(m["self"], second[name]["self"])["spearman"]
        agreement[name] = row
    return {"second_seed": {k: result[k] for k in ("val_accuracy", "test_accuracy", "train_seconds")},
            "agreement": agreement}  # fmt: skip


def run(args, model, tokenizer, s, data, below: int) -> dict:
    (hidden, y), (hidden_t, y_t) = data["train"], data["targets"]
    n = len(y)
    check_text = s.target_text[:8] + s.train_text[:8]
    check = top.verify_top(model, below, tokenizer, check_text, list(range(len(check_text))))
    for mode in ("full", "own", "flip"):
        assert check[mode] <= 1e-4 * max(check["logit_scale"], 1.0), f"cut model differs ({mode}): {check}"
    members = random_half_subsets(n, args.num_subsets, seed=args.seed + 1)
    with top.cut_bottom(model, below):
        result, methods, first = train_and_score(args, model, data, args.seed)
        result["tail_check"] = check
        reference = M.snapshot(model)
        if args.smoke:
            result.update(grad_check(model, data))
        start, losses = time.perf_counter(), []
        for j, row in enumerate(members):  # LDS truth: same init, minibatch sequence, schedule and masks
            top.train_top(model, first["init"], hidden, y, members=row, **train_options(args, args.seed))
            losses.append(top.target_losses(model, hidden_t, y_t))
            print(f"half {j + 1}/{len(members)}: {time.perf_counter() - start:.0f} s", flush=True)
        losses = np.stack(losses, axis=1)  # (T, J)
        result["lds_retrain_seconds"] = time.perf_counter() - start
        M.load_params(model, reference)
    summarize_methods(result, methods, members, losses, first["predicted"], y)
    if args.stability:
        result["stability"] = stability(args, data, below, methods)
    return result


def build(args, seed: int):
    partial = args.masked_layers < args.top_layers  # else the library's default: every adapter_down
    model = M.build_model(args.width, seed, top_layers=args.top_layers, lower_width=args.lower_width,
                          target_modules=masked_target_modules(args) if partial else None,
                          heads=args.heads)  # fmt: skip
    top.no_dropout(model)
    return model


def _training_note(a: dict) -> str:
    """Where the training settings come from: the default model's (``default_model_sweep.py``) or the command."""
    default = MiniLMTopArguments()
    keys = ("learning_rate", "num_train_epochs", "lr_schedule", "width")
    if all(a.get(k, getattr(default, k)) == getattr(default, k) for k in keys):
        return "fixed by `benchmarks/faithfulness/default_model_sweep.py`, not tuned here."
    return "set on the command line (the default model's: lr 3e-3, 1 epoch, linear, W = 1,536)."


def _masked_note(a: dict) -> str:
    unmasked = a["top_layers"] - a["masked_layers"]
    if not unmasked:
        return "every adapter masked"
    return f"the {unmasked} adapter layer(s) below train on every instance with no mask"


def markdown(r: dict) -> str:
    a = r["arguments"]
    below = 6 - a["top_layers"]
    lines = [
        "# Turn-over influence on the default model's design: MiniLM-L6 + adapters in the top "
        f"{a['top_layers']} layer(s), masks on the top {a['masked_layers']}",
        "",
        f"Written by `benchmarks/faithfulness/minilm_top_lds.py`. Command: `{r['command']}`",
        f"Wall time {r['wall_seconds'] / 60:.1f} min on {r['machine']} ({a['threads']} torch thread(s), other jobs "
        f"running). Seeds: data order / model init / mask seed / minibatch order {a['seed']}; halves "
        f"`random_half_subsets(N, {a['num_subsets']}, seed={a['seed'] + 1})`.",
        "",
        "## Set-up",
        "",
        f"* all-MiniLM-L6-v2 (frozen) + `seq_bn` adapters in the top {a['top_layers']} encoder layers "
        f"({a['width']} units in the top one, {a['lower_width']} below: `wide_adapter_config(config, {a['width']}, "
        f"{a['top_layers']}, lower_width={a['lower_width']})`) + classifier; turn-over (p = 0.5) on the adapter_down "
        f"output of the adapters in the top {a['masked_layers']} layer(s) (`{r['turnover_target_modules']}`; "
        f"{_masked_note(a)}) and on the classifier input. Trainable: the adapters and the classifier "
        f"({r['trainable_parameters']:,} parameters). Plain dropout off: turn-over is the only dropout.",
        f"* AdamW lr {a['learning_rate']:g} (no weight decay), {a['num_train_epochs']} epoch(s), batch "
        f"{a['batch_size']}, {a.get('lr_schedule', 'linear')} schedule with {a['warmup_ratio']:.0%} warm-up, length-grouped minibatches "
        f"(`group_by_length`); {_training_note(a)}",
        f"* N = {r['num_train']} sentences of the bundled `rotten_tomatoes` train split (seeded permutation); "
        f"{r['num_targets']} targets = first rows of a seeded permutation of the test split. Sentences truncated "
        "at 128 tokens (the recipe: 64; almost none is longer).",
        f"* MiniLM ran once per sentence; the output of layer {below - 1} (every position) was cached and the model "
        "ran on it as itself (embeddings and lower layers swapped for pass-throughs; module names, hooks and masks "
        f"the library's). Max |logit difference| vs the full model from tokens: unmasked "
        f"{r['tail_check']['full']:.2g}, own masks {r['tail_check']['own']:.2g}, flipped "
        f"{r['tail_check']['flip']:.2g} (logits up to {r['tail_check']['logit_scale']:.2f}).",
        f"* LDS: {a['num_subsets']} random halves, each retrained from the same initial parameters, minibatch "
        "sequence (non-members dropped from each minibatch), lr schedule and masks; target loss of the full "
        'network; `load_faithfulness_metric("linear_datamodeling")`, ± standard error over targets.',
        "* Identical-class test (Hanawa et al., ICLR 2021): scores explain the model's PREDICTED label; rate at "
        "which the top-1 most helpful training sentence carries that label, and the top-1 most harmful the other "
        "label; distinct training sentences over all targets' top-5 helpful lists.",
        "* Peers on the same trainable part" + ("" if a.get("peers", True) else " (not run: --peers false)") + ": the exact last-layer influence function (classifier, pooled features "
        "fixed, damping 0.01), the gradient dot product at the final weights and TracIn (checkpoints evenly spaced "
        "in training, each weighted by the summed lr of the steps since the previous one), both with exact "
        "per-sample gradients of all trainable parameters; random.",
        "",
        "## Results",
        "",
        f"Accuracy: validation ({r['num_val']}) {r['val_accuracy']:.3f}, test ({r['num_test']}) "
        f"{r['test_accuracy']:.3f}, targets {r['target_accuracy']:.3f}. Training: {r['train_steps']} steps, "
        f"{r['train_seconds']:.0f} s on the cache.",
        "",
        *methods_table(r["methods"]),
    ]  # fmt: skip
    ranked = sorted(r["methods"], key=lambda m: -m["lds"])
    by = {m["method"]: m for m in r["methods"]}
    first = next(m for m in r["methods"] if m["method"].startswith("turn-over"))
    rnd = by["random"]
    best_peer = next(m for m in ranked if not m["method"].startswith("turn-over"))
    agreement = (
        f"Exact vs linear rank agreement (mean per-target Spearman over all N scores): "
        f"{r['exact_vs_linear_spearman']:.3f} ± {r['exact_vs_linear_spearman_se']:.3f}. "
        if "exact_vs_linear_spearman" in r
        else ""
    )
    lines += [
        "",
        f"Highest LDS: {ranked[0]['method']} ({_f(ranked[0]['lds'])}). {first['method'].capitalize()} minus random: "
        f"{first['lds'] - rnd['lds']:+.3f}; minus the best other ({best_peer['method']}): "
        f"{first['lds'] - best_peer['lds']:+.3f}.",
        f"Distinct top-5: out of {r['methods'][0]['top_lists_possible']} list entries ({r['num_targets']} targets "
        f"x 5). {agreement}Mean std of a target's "
        f"loss over the halves: {r['subset_loss_std_mean']:.3f}. Retraining the halves: "
        f"{r['lds_retrain_seconds'] / 60:.1f} min.",
        "",
        *stability_lines(r),
    ]
    return "\n".join(lines)


def stability_lines(r: dict) -> list[str]:
    """The seed-to-seed agreement table (``--stability true``)."""
    if "stability" not in r:
        return []
    st = r["stability"]
    lines = [
        "## Agreement across training seeds",
        "",
        f"A second model trained with seed {r['arguments']['seed'] + 1} (init, masks, minibatch order; val accuracy "
        f"{st['second_seed']['val_accuracy']:.3f}), scored on the same targets (true labels). Per-target Spearman "
        "of the N scores (mean ± SE), Spearman of the mean over targets (the cleansing ranking), overlap of the "
        "top-10 helpful lists, Spearman of self-influence (`hf_turnover.evaluation.seed_agreement`).",
        "",
        "| method | pairwise Spearman | mean-influence Spearman | top-10 overlap | self-influence Spearman |",
        "|---|---|---|---|---|",
    ]
    for name, a in st["agreement"].items():
        self_rho = f"{a['self_influence_spearman']:.3f}" if "self_influence_spearman" in a else "–"
        lines.append(f"| {name} | {a['pairwise_spearman']:.3f} ± {a['pairwise_spearman_se']:.3f} | "
                     f"{a['mean_influence_spearman']:.3f} | {a['top_k_overlap']:.3f} | {self_rho} |")  # fmt: skip
    return [*lines, ""]


def main(argv: list[str] | None = None) -> dict:
    args = parse_benchmark_arguments(MiniLMTopArguments, argv, SMOKE)
    if args.masked_layers is None:
        args.masked_layers = args.top_layers
    if not 1 <= args.masked_layers <= args.top_layers:
        raise ValueError(f"masked_layers={args.masked_layers} must lie in [1, top_layers={args.top_layers}].")
    start = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(M.backbone_path())
    model = build(args, args.seed)
    below = top.frozen_below(model)
    t0 = time.perf_counter()
    s, data = load_data(args, model, tokenizer, below)
    print(f"cache: {time.perf_counter() - t0:.0f} s", flush=True)
    results = {
        "arguments": asdict(args),
        "command": "python benchmarks/faithfulness/minilm_top_lds.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}", "num_train": args.num_train,
        "num_targets": args.num_targets, "num_val": len(s.val_y), "num_test": len(data["test"][1]),
        "cache_seconds": time.perf_counter() - t0, "train_label_balance": float(s.train_y.mean()),
        "turnover_target_modules": get_turnover_config(model).target_modules,
        "masked_modules": turnover_layers(model),
    }  # fmt: skip
    results.update(run(args, model, tokenizer, s, data, below))
    results["wall_seconds"] = time.perf_counter() - start
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    report = markdown(results)
    atomic_write_text(out / "results.md", report)
    print(report, flush=True)
    return results


if __name__ == "__main__":
    main()
