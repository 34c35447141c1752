"""Speed of turn-over influence scoring: compute only what depends on the masks.

Run from the repository root on an otherwise idle machine (CPU: about 6 minutes on 2 cores; the matmul peak
is measured with the same thread count; ``--threads 1`` is steadier when other jobs share the cores):

    python3 benchmarks/speed/speed.py --threads 2 --output_json benchmarks/speed/speed.json

GPU mode (written for a CUDA machine; the 2-core CPU machine it was written on has none, so it has only been
run on CPU with small sizes): 10,000 training ids for one target on a BERT-base-sized adapter model, bf16,
sequence length 64 (the paper: 35 s on an RTX 2080 Ti; Captum is skipped on GPU):

    python3 benchmarks/speed/speed.py --device cuda --bf16 --bert_base --rounds 3 --reference_ids 1000 \
        --memory_max_seconds 30 --output_json benchmarks/speed_cuda.json

Everything below is measured in one process on the same model and target (memory in fresh child processes),
in ``--rounds`` interleaved rounds; each figure is the median over rounds, each ratio the median of the
per-round ratios, so load from other processes hits both sides of a ratio alike.

* Model: BERT with ``adapters`` ``double_seq_bn`` adapters in every layer (random weights; tiny: 4 layers,
  hidden 256; ``--bert_base``: 12 layers, hidden 768), one target of ``--seq_len`` tokens. Cases:
  ``all_adapters`` masks every adapter + the classifier input (the paper's set-up); ``top_layer`` masks the
  last layer's two adapters + the classifier input.
* Instances scored per second for one target: the engine (``TurnoverScorer`` with its default chunk size,
  or ``--batch_size_*`` ids per forward; own and flipped rows in one forward, prefix replayed, positions
  sliced where possible) and the same at a fixed 256 ids per forward (the default before chunks were sized
  to the input); (a) a naive loop: one id at a time, two batch-1
  forwards; (b) the authors' reference style: the target copied to 100 rows, the whole model run per batch
  of 100 ids under each mask; (c) Captum ``TracInCPFast`` (classifier gradients) and ``TracInCP`` (gradients
  of the masked adapters + classifier) on random training rows of the same length. Before timing, the
  engine's scores are checked against (a) and (b) on 8 ids.
* FLOP/s: FLOPs per training id are counted by ``torch.utils.flop_counter`` (matmuls and attention, 2 per
  multiply-add; elementwise work is not counted) as the slope between scoring 4 and 12 ids in one forward,
  so the once-per-target prefix cancels: the masked layers and everything after the first masked layer, at
  the positions actually computed, own + flipped. Achieved FLOP/s = FLOPs per id x engine ids/s (the time
  includes everything: prefix, hashing, elementwise ops, Python); it is compared with a dense square matmul
  (2048 on CPU, 8192 on GPU) timed right before and right after the engine in the same round (their mean).
* Memory (``speed_memory.py``): peak growth while scoring 10k vs 1M ids for one target, for both mask
  schemes. The id tensor and the score vector always have the full size N; all N ids are scored unless the
  largest N would take over ``--memory_max_seconds``, then the same slice (two chunks) is scored for every N.
* Masks: time and peak memory of the keep-bits of one chunk of 4096 ids on every masked layer, counter hash
  vs the Appendix-D codebook; end-to-end engine throughput with each scheme.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from speed_baselines import CaptumTracIn, naive_scores, reference_scores
from speed_memory import mask_generation, run_child
from speed_report import report, targets
from speed_setup import (
    CASES,
    Setup,
    build_setup,
    engine,
    engine_flops_per_id,
    full_forward_flops,
    masked_names,
    matmul_job,
    median,
    rate,
)
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from hf_turnover.atomic import atomic_write_text
from hf_turnover.scorer import TurnoverScorer


@dataclass
class SpeedArguments:
    output_json: str = field(
        default="benchmarks/speed/speed.json", metadata={"help": "Where to write the results."}
    )
    device: str = field(default="cpu", metadata={"help": "'cpu' or 'cuda'."})
    bf16: bool = field(default=False, metadata={"help": "Run the model in bfloat16 (GPU mode)."})
    bert_base: bool = field(default=False, metadata={"help": "BERT-base size instead of the tiny BERT."})
    seq_len: int = field(default=64, metadata={"help": "Target length in tokens."})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0: torch's default)."})
    rounds: int = field(default=7, metadata={"help": "Interleaved timing rounds (medians over rounds)."})
    engine_ids: int = field(
        default=0, metadata={"help": "Ids per engine timing (0: 16384/256 CPU, 10000 GPU)."}
    )
    batch_size_top: int = field(default=0, metadata={"help": "Engine ids per forward, top_layer (0: auto)."})
    batch_size_all: int = field(
        default=0, metadata={"help": "Engine ids per forward, all_adapters (0: auto)."}
    )
    naive_ids: int = field(default=8, metadata={"help": "Ids per naive-loop timing."})
    reference_ids: int = field(default=200, metadata={"help": "Ids per reference-style timing."})
    captum_ids: int = field(default=64, metadata={"help": "Training rows per TracInCPFast timing (0: skip)."})
    captum_full_ids: int = field(
        default=16, metadata={"help": "Training rows per TracInCP timing (0: skip)."}
    )
    memory_ids: str = field(default="10000,1000000", metadata={"help": "N values of the memory runs."})
    memory_max_seconds: float = field(
        default=300.0, metadata={"help": "Score the same slice for every N if the largest N takes longer."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the weights and data."})


def sizes(args: SpeedArguments, setup: Setup, gpu: bool) -> tuple[int, int]:
    """(ids per engine timing, ids per forward) for a case. Ids per forward: ``--batch_size_*``, else the
    engine's default for this input (``batch_size=None``: about 4k rows x computed positions per forward on
    the CPU, which keeps the activations in cache; all_adapters: 32 ids = 64 rows x 64 positions)."""
    top = setup.case == "top_layer"
    n = args.engine_ids or (10000 if gpu else (16384 if top else 256))
    batch = (args.batch_size_top if top else args.batch_size_all) or engine(setup, None).ids_per_forward(
        setup.inputs
    )
    return n, min(n, batch)


def case_jobs(case: str, args: SpeedArguments, gpu: bool) -> dict:
    """Build one case's setups, check that all methods agree, and return its timed jobs and static facts."""
    kw = dict(
        bert_base=args.bert_base, device=args.device, bf16=args.bf16, seq_len=args.seq_len, seed=args.seed
    )
    setup, codebook = build_setup(case, "hash", **kw), build_setup(case, "codebook", **kw)
    n, batch = sizes(args, setup, gpu)
    ids = torch.arange(max(n, args.reference_ids, args.naive_ids))
    fast, default, coded = engine(setup, batch), engine(setup, 256), engine(codebook, batch)
    x, y, xc, yc = setup.inputs, setup.labels, codebook.inputs, codebook.labels
    matmul = matmul_job(setup.device, next(setup.model.parameters()).dtype)
    jobs = {  # matmuls right before and after the engine: their ratio sees the same load
        "matmul_flops": matmul,
        "engine": (lambda: fast.score(x, y, ids[:n]), n),
        "matmul_flops_after": matmul,
        "engine_batch256": (lambda: default.score(x, y, ids[: min(n, 4096)]), min(n, 4096)),
        "engine_codebook": (lambda: coded.score(xc, yc, ids[:n]), n),
        "reference": (lambda: reference_scores(setup, ids[: args.reference_ids]), args.reference_ids),
        "naive": (lambda: naive_scores(setup, ids[: args.naive_ids]), args.naive_ids),
    }
    if args.captum_ids and not gpu:
        tracin = CaptumTracIn(setup, masked_names(setup), args.captum_ids, max(args.captum_full_ids, 1))
        jobs["captum_tracincp_fast"] = (lambda: tracin.scores("fast"), args.captum_ids)
        if args.captum_full_ids:
            jobs["captum_tracincp"] = (lambda: tracin.scores("full"), args.captum_full_ids)
    facts = {
        "masked_modules": masked_names(setup),
        "engine_ids": n,
        "engine_batch_size": batch,
        "max_abs_difference_vs_naive_and_reference": agreement(setup, fast, strict=not args.bf16),
        "flops_per_id": {
            "engine": engine_flops_per_id(setup),
            "naive_and_reference": 2 * full_forward_flops(setup),
        },
    }
    for fn, _ in jobs.values():
        fn()  # warm-up: probes, allocator, one-off library initialisation
    return {"setup": setup, "codebook": codebook, "jobs": jobs, "facts": facts}


def agreement(setup: Setup, scorer: TurnoverScorer, strict: bool, n: int = 8) -> float:
    """Largest score difference of the engine from the naive loop and the reference style on ``n`` ids
    (asserted small in float32: every method computes the same scores)."""
    ids = torch.arange(n)
    fast = scorer.score(setup.inputs, setup.labels, ids)
    others = [naive_scores(setup, ids), reference_scores(setup, ids)]
    if strict:
        for other in others:
            torch.testing.assert_close(fast, other, atol=1e-4, rtol=1e-3)
    return max(float((fast - other).abs().max()) for other in others)


def timing_rounds(cases: dict, args: SpeedArguments) -> dict:
    """Run every job of every case once per round, interleaved; return the per-round rates."""
    rates: dict = {}
    for _ in tqdm(range(args.rounds), desc="Timing rounds"):
        for case, bench in cases.items():
            for name, (fn, items) in bench["jobs"].items():
                rates.setdefault(case, {}).setdefault(name, []).append(rate(fn, items, bench["setup"].device))
    return rates


def _ratio(a: list[float], b: list[float]) -> float:
    return median([x / y for x, y in zip(a, b, strict=True)])  # per round: load hits both sides alike


def summarize(cases: dict, rates: dict) -> dict:
    out = {}
    for case, bench in cases.items():
        r, facts = dict(rates[case]), bench["facts"]
        matmul = [
            (a + b) / 2 for a, b in zip(r.pop("matmul_flops"), r.pop("matmul_flops_after"), strict=True)
        ]
        achieved = [facts["flops_per_id"]["engine"] * e for e in r["engine"]]
        out[case] = {
            **facts,
            "ids_per_s": {name: median(v) for name, v in r.items()},
            "ids_per_s_rounds": r,
            "ratios": {f"engine_vs_{b}": _ratio(r["engine"], r[b]) for b in r if b != "engine"},
            "achieved_flops_per_s": median(achieved),
            "matmul_flops_per_s": median(matmul),
            "matmul_flops_per_s_rounds": matmul,
            "fraction_of_matmul": _ratio(achieved, matmul),
        }
    return out


def memory_runs(summary: dict, args: SpeedArguments) -> list[dict]:
    """10k vs 1M ids (``--memory_ids``) per case and scheme, each in a fresh process."""
    runs = []
    sizes = [int(v) for v in args.memory_ids.split(",")]
    for case, c in summary.items():
        batch = c["engine_batch_size"]
        for scheme in ("hash", "codebook"):
            speed = c["ids_per_s"]["engine" if scheme == "hash" else "engine_codebook"]
            full = max(sizes) / speed <= args.memory_max_seconds  # else the same slice for every N
            for n in sizes:
                scored = n if full else min(n, 2 * batch)
                spec = dict(case=case, scheme=scheme, bert_base=args.bert_base, device=args.device, bf16=args.bf16,
                            seq_len=args.seq_len, seed=args.seed, threads=torch.get_num_threads(), n=n,
                            scored=scored, batch_size=batch)  # fmt: skip
                runs.append(run_child(spec))
                print(f"memory {case} {scheme} N={n}: {runs[-1]}", flush=True)
    return runs


def environment(args: SpeedArguments) -> dict:
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":")[1].strip() for ln in f if ln.startswith("model name")), "")
    return {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu or platform.processor(),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "load_average": os.getloadavg(),
        "uptime": uptime,
    }


def main() -> None:
    (args,) = HfArgumentParser(SpeedArguments).parse_args_into_dataclasses()
    if args.threads:
        torch.set_num_threads(args.threads)
    start, before = time.time(), environment(args)
    cases = {case: case_jobs(case, args, args.device.startswith("cuda")) for case in CASES}
    summary = summarize(cases, timing_rounds(cases, args))
    result = {
        "arguments": asdict(args),
        "environment_before": before,
        "cases": summary,
        "mask_generation": [mask_generation(cases["all_adapters"][s]) for s in ("setup", "codebook")],
        "memory": memory_runs(summary, args),
        "environment_after": environment(args),
        "seconds": time.time() - start,
    }
    result["targets"] = targets(result)
    print(report(result))
    atomic_write_text(args.output_json, json.dumps(result, indent=2))  # a reader never sees half a file
    print(f"wrote {args.output_json}")


if __name__ == "__main__":
    main()
