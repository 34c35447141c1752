"""Markdown tables and target checks for the results of ``benchmarks/speed/speed.py``."""

from __future__ import annotations

MIB_TOLERANCE = 16.0  # RSS noise allowed when checking that memory does not grow with N
METHODS = [
    ("engine", "engine"),
    ("engine_batch256", "engine, batch 256"),
    ("engine_codebook", "engine, codebook masks"),
    ("reference", "reference style (100 ids/forward)"),
    ("naive", "naive loop"),
    ("captum_tracincp_fast", "Captum TracInCPFast"),
    ("captum_tracincp", "Captum TracInCP"),
]


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 10 ** (digits - 1) else f"{value:.{digits}g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _memory_growth(result: dict) -> dict:
    """Per (case, scheme): extra peak growth from the smallest to the largest N beyond the ids + scores."""
    runs: dict = {}
    for run in result["memory"]:
        runs.setdefault((run["case"], run["scheme"]), []).append(run)
    out = {}
    for key, group in runs.items():
        small, large = min(group, key=lambda r: r["n_ids"]), max(group, key=lambda r: r["n_ids"])
        vectors = large["ids_and_scores_mib"] - small["ids_and_scores_mib"]
        out[key] = (large["peak_growth_mib"] - small["peak_growth_mib"]) - vectors
    return out


def naive_ceiling(c: dict) -> float:
    """engine / naive if the engine ran its FLOPs per id at the full measured dense-matmul FLOP/s: the most
    any batching of the same computation can reach against this naive loop on this machine."""
    return c["matmul_flops_per_s"] / c["flops_per_id"]["engine"] / c["ids_per_s"]["naive"]


def targets(result: dict) -> list[dict]:
    """The issue's targets, each as measured in this run (``bound``: the ceiling where one is computed)."""
    cases, rows = result["cases"], []
    for case, c in cases.items():
        naive = c["ratios"].get("engine_vs_naive")
        rows.append({"target": "engine >= 30x naive loop", "case": case, "measured": naive,
                     "met": naive >= 30, "bound": naive_ceiling(c)})  # fmt: skip
        need = 3.0 if case == "top_layer" else 1.0
        ref = c["ratios"].get("engine_vs_reference")
        rows.append({"target": f"engine >= {need:g}x reference style", "case": case, "measured": ref,
                     "met": ref >= need})  # fmt: skip
        frac = c["fraction_of_matmul"]
        rows.append(
            {"target": ">= 50% of dense matmul FLOP/s", "case": case, "measured": frac, "met": frac >= 0.5}
        )
    for (case, scheme), extra in _memory_growth(result).items():
        rows.append({"target": f"memory does not grow with N beyond ids + scores ({scheme}, MiB extra)",
                     "case": case, "measured": extra, "met": extra <= MIB_TOLERANCE})  # fmt: skip
    if result["arguments"]["device"].startswith("cuda"):
        for case, c in cases.items():
            seconds = 10000 / c["ids_per_s"]["engine"]
            rows.append({"target": "10,000 ids for one target < 1 s", "case": case, "measured": seconds,
                         "met": seconds < 1.0})  # fmt: skip
    return rows


def report(result: dict) -> str:
    """All tables as markdown (ready for the README)."""
    cases = result["cases"]
    env = result["environment_before"]
    parts = [
        f"Measured {env['cpu']} ({env['threads']} torch threads), torch {env['torch']}, load average "
        f"before/after {_load(env)} / {_load(result['environment_after'])}; medians of "
        f"{result['arguments']['rounds']} interleaved rounds.",
        "\n**Training instances scored per second for one target**\n",
        _table(
            ["case", *[label for _, label in METHODS]],
            [
                [
                    f"{case} (batch {c['engine_batch_size']})",
                    *[_num(c["ids_per_s"].get(m)) for m, _ in METHODS],
                ]
                for case, c in cases.items()
            ],
        ),  # fmt: skip
        "\n**Ratios (median of per-round ratios) and FLOPs**\n",
        _table(
            [
                "case",
                "engine / naive",
                "engine / reference",
                "engine / TracInCPFast",
                "engine / TracInCP",
                "engine / naive ceiling (at 100% of matmul)",
                "naive FLOPs / engine FLOPs per id",
                "engine MFLOP per id",
                "achieved GFLOP/s",
                "dense matmul GFLOP/s",
                "% of matmul",
            ],
            [
                [
                    case,
                    _num(c["ratios"].get("engine_vs_naive")),
                    _num(c["ratios"].get("engine_vs_reference")),
                    _num(c["ratios"].get("engine_vs_captum_tracincp_fast")),
                    _num(c["ratios"].get("engine_vs_captum_tracincp")),
                    _num(naive_ceiling(c)),
                    _num(c["flops_per_id"]["naive_and_reference"] / c["flops_per_id"]["engine"]),
                    _num(c["flops_per_id"]["engine"] / 1e6),
                    _num(c["achieved_flops_per_s"] / 1e9),
                    _num(c["matmul_flops_per_s"] / 1e9),
                    f"{100 * c['fraction_of_matmul']:.0f}%",
                ]
                for case, c in cases.items()
            ],
        ),  # fmt: skip
        "\n**Peak memory while scoring N training ids for one target**\n",
        _table(
            ["case", "scheme", "N ids", "ids scored", "peak growth (MiB)", "ids + scores (MiB)", "seconds"],
            [
                [
                    r["case"],
                    r["scheme"],
                    f"{r['n_ids']:,}",
                    f"{r['n_scored']:,}",
                    _num(r["peak_growth_mib"]),
                    _num(r["ids_and_scores_mib"]),
                    _num(r["seconds"]),
                ]
                for r in result["memory"]
            ],
        ),  # fmt: skip
        "\n**Mask generation (all_adapters: every masked layer, one chunk) and end-to-end engine**\n",
        _table(
            [
                "scheme",
                "masked units per id",
                "ms per 1k ids",
                "peak MiB per chunk",
                "chunk (ids)",
                *[f"engine ids/s, {case}" for case in cases],
            ],
            [
                [
                    m["scheme"],
                    str(m["units_per_id"]),
                    _num(m["ms_per_1k_ids"]),
                    _num(m["peak_mib_per_chunk"]),
                    str(m["n_ids"]),
                    *[
                        _num(c["ids_per_s"]["engine" if m["scheme"] == "hash" else "engine_codebook"])
                        for c in cases.values()
                    ],
                ]
                for m in result["mask_generation"]
            ],
        ),  # fmt: skip
        "\n**Targets**\n",
        _table(
            ["target", "case", "measured", "met", "ceiling on this machine"],
            [
                [
                    t["target"],
                    t["case"],
                    _num(t["measured"]),
                    "yes" if t["met"] else "**no**",
                    _num(t.get("bound")),
                ]
                for t in result["targets"]
            ],
        ),  # fmt: skip
    ]
    return "\n".join(parts)


def _load(env: dict) -> str:
    return "/".join(f"{v:.1f}" for v in env["load_average"])
