"""Memory of ``benchmarks/speed/speed.py``: peak memory of scoring N ids for one target, and of mask generation.

Scoring memory is measured in a fresh process per (case, scheme, N), so no earlier run's peak hides it:

    python3 benchmarks/speed/speed_memory.py '{"case": "top_layer", "scheme": "hash", "n": 1000000, ...}'

On CPU a sampling thread reads the resident set size (``/proc/self/statm``) every millisecond; the figure is
``peak RSS during scoring - RSS before the id tensor was made``, after one warm-up scoring of two chunks. The
child runs with ``MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0`` so that glibc returns freed memory
at once and the RSS follows live allocations (its timings are not used for speed). On CUDA the figure is
``torch.cuda.max_memory_allocated`` over the same span, minus the memory allocated before it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from functools import partial

import torch

from hf_turnover.masks import keep_bits

from speed_setup import Setup, build_setup, rate, sync  # isort: skip

MIB = 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS(threading.Thread):
    """Samples the resident set size until stopped; ``peak`` is the largest sample."""

    def __init__(self, every_s: float = 0.001) -> None:
        super().__init__(daemon=True)
        self.every_s, self.peak, self._halt = every_s, rss_bytes(), threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.every_s)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return max(self.peak, rss_bytes())


def scoring_memory(setup: Setup, n: int, scored: int, batch_size: int) -> dict:
    """Score ``scored`` of ``n`` ids (all of them when equal) into a score vector of length ``n``."""
    from speed_setup import engine

    scorer = engine(setup, batch_size)
    scorer.score(setup.inputs, setup.labels, torch.arange(2 * batch_size))  # warm-up: probe, record, replay
    cuda = setup.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(setup.device)
    before = torch.cuda.memory_allocated(setup.device) if cuda else rss_bytes()
    sampler = None if cuda else PeakRSS()
    if sampler is not None:
        sampler.start()
    start = time.perf_counter()
    ids = torch.arange(n, dtype=torch.int64)  # (N,) the full id tensor
    if scored == n:
        scores = scorer.score(setup.inputs, setup.labels, ids)  # (N,) allocated by the engine
    else:  # too slow to score all: a full-size score vector, a slice of it scored
        scores = torch.empty(n, dtype=torch.float32)
        scores[:scored] = scorer.score(setup.inputs, setup.labels, ids[:scored])
    sync(setup.device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(setup.device) if cuda else sampler.stop()
    return {
        "n_ids": n,
        "n_scored": scored,
        "batch_size": batch_size,
        "seconds": seconds,
        "baseline_mib": before / MIB,
        "peak_growth_mib": (peak - before) / MIB,
        "ids_and_scores_mib": (ids.nbytes + scores.nbytes) / MIB,
        "what": "CUDA max_memory_allocated" if cuda else "peak RSS (1 ms samples) minus RSS before the ids",
    }


def run_child(spec: dict, timeout_s: float = 3600) -> dict:
    """Run :func:`scoring_memory` in a fresh process (same thread count) and return its result."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [os.path.dirname(os.path.dirname(here)), os.environ.get("PYTHONPATH", "")]
        ),  # hf_turnover
        # glibc: tensors over 64 KiB get their own mapping and freed memory goes back at once, so the resident
        # set follows live allocations instead of what the allocator keeps cached.
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "0",
    }
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), json.dumps(spec)],
        capture_output=True, text=True, env=env, timeout=timeout_s,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"memory run {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def mask_generation(setup: Setup, n_ids: int = 4096, reps: int = 5) -> dict:
    """Time and peak memory of the keep-bits of ``n_ids`` ids on every masked layer of ``setup`` (one chunk)."""
    from torch.profiler import profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline  # no public CPU peak-memory API

    config = setup.model.turnover_config
    widths = _masked_widths(setup)
    ids = torch.arange(n_ids, device=setup.device)

    def generate():
        for name, width in widths.items():
            keep_bits(ids, width, name, p=config.p, seed=config.seed, scheme=config.scheme,
                      codebook_size=config.codebook_size, codebook_k=config.codebook_k)  # fmt: skip

    generate()
    per_s = sorted(rate(generate, n_ids, setup.device) for _ in range(reps))[reps // 2]
    if setup.device.type == "cuda":
        before = torch.cuda.memory_allocated(setup.device)
        torch.cuda.reset_peak_memory_stats(setup.device)
        generate()
        peak = torch.cuda.max_memory_allocated(setup.device) - before
    else:
        with profile(profile_memory=True, record_shapes=True, with_stack=True) as prof:
            generate()
        _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline(setup.device)
        peak = max((sum(s) for s in sizes), default=0)
    return {
        "scheme": config.scheme,
        "n_ids": n_ids,
        "units_per_id": sum(widths.values()),
        "ms_per_1k_ids": 1000.0 / per_s * 1000.0,
        "peak_mib_per_chunk": peak / MIB,
        "what": "peak tensor memory of the keep-bits (torch profiler memory timeline; CUDA: allocator peak)",
    }


def _masked_widths(setup: Setup) -> dict[str, int]:
    """Masked units per layer, read from one forward (output width, or input width for the head)."""
    from hf_turnover.model import turnover_layers

    widths, handles = {}, []

    def output_width(module, args, output, name):
        widths[name] = output.shape[-1]

    def input_width(module, args, name):
        widths[name] = args[0].shape[-1]

    for name, kind in turnover_layers(setup.model).items():
        module = setup.model.get_submodule(name)
        if kind == "output":
            handles.append(module.register_forward_hook(partial(output_width, name=name)))
        else:
            handles.append(module.register_forward_pre_hook(partial(input_width, name=name)))
    with torch.inference_mode():
        setup.model(**setup.inputs)
    for handle in handles:
        handle.remove()
    return widths


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec.pop("threads"))
    n, scored, batch_size = spec.pop("n"), spec.pop("scored"), spec.pop("batch_size")
    result = scoring_memory(build_setup(**spec), n, scored, batch_size)
    print(json.dumps({**result, "case": spec["case"], "scheme": spec["scheme"]}))
