"""Models, target and measuring tools for ``benchmarks/speed/speed.py`` (random weights: speed does not depend on them)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import adapters
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig, BertForSequenceClassification
from transformers.utils import logging as hf_logging

from hf_turnover.config import TurnoverConfig
from hf_turnover.model import add_turnover, turnover_layers
from hf_turnover.scorer import TurnoverScorer

# Which adapters get instance masks; the classifier's input is masked in both cases.
CASES = {
    "all_adapters": r".*\.adapters\.[^.]+\.adapter_down",  # the paper's set-up
    "top_layer": r"bert\.encoder\.layer\.{top}\..*\.adapter_down",  # the last layer's two adapters + head
}
TINY = dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024)
BASE = dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072)


@dataclass
class Setup:
    """One model with turn-over masks and one target row to score training ids against."""

    case: str
    scheme: str
    model: nn.Module
    inputs: dict[str, torch.Tensor]  # (1, L) each
    labels: torch.Tensor  # (1,)
    device: torch.device


def build_setup(
    case: str, scheme: str, *, bert_base: bool, device: str, bf16: bool, seq_len: int, seed: int = 0
) -> Setup:
    """BERT (tiny or base size) with ``double_seq_bn`` adapters in every layer; masks on ``case``'s adapters."""
    hf_logging.set_verbosity_error()  # adapters warns about the unused adapter heads on every build
    torch.manual_seed(seed)  # the same weights for every case and scheme
    size = BASE if bert_base else TINY
    config = BertConfig(
        **size, max_position_embeddings=max(512, seq_len), num_labels=2, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    adapters.init(model)
    model.add_adapter("task", config="double_seq_bn")
    model.train_adapter("task")
    for name, param in model.named_parameters():
        if "adapter_up" in name:  # adapters start near the identity; trained ones are not
            nn.init.normal_(param, std=0.1)
    pattern = CASES[case].format(top=size["num_hidden_layers"] - 1)
    add_turnover(model, TurnoverConfig(target_modules=pattern, head_modules="classifier", scheme=scheme))
    model = model.to(device, dtype=torch.bfloat16 if bf16 else torch.float32).eval()
    g = torch.Generator().manual_seed(seed + 1)
    inputs = {
        "input_ids": torch.randint(1000, config.vocab_size, (1, seq_len), generator=g).to(device),
        "attention_mask": torch.ones(1, seq_len, dtype=torch.long, device=device),
    }
    return Setup(case, scheme, model, inputs, torch.tensor([1], device=device), torch.device(device))


def masked_names(setup: Setup) -> list[str]:
    return list(turnover_layers(setup.model))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn: Callable[[], object], items: int, device: torch.device) -> float:
    """Items per second of one call of ``fn`` (the device is synchronised around it)."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return items / (time.perf_counter() - start)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def engine(setup: Setup, batch_size: int, **kwargs) -> TurnoverScorer:
    return TurnoverScorer(setup.model, batch_size=batch_size, **kwargs)


def flops(fn: Callable[[], object]) -> int:
    """Matmul, attention and convolution FLOPs (2 per multiply-add) of ``fn``, counted by torch's dispatcher;
    elementwise work (layer norm, GELU, masks, the hash) is not counted."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def engine_flops_per_id(setup: Setup, n1: int = 4, n2: int = 12) -> float:
    """FLOPs that run per training id in the engine: the slope between scoring n1 and n2 ids in one chunk each,
    so the once-per-target prefix cancels. Counts the own and the flipped forward."""
    scorer = engine(setup, batch_size=n2)
    ids = torch.arange(n2)
    scorer.score(setup.inputs, setup.labels, ids[:1])  # the one-off probe of the position-wise entry
    count = [flops(lambda n=n: scorer.score(setup.inputs, setup.labels, ids[:n])) for n in (n1, n2)]
    return (count[1] - count[0]) / (n2 - n1)


def full_forward_flops(setup: Setup) -> int:
    """FLOPs of one unmasked batch-1 forward of the whole model (what the naive loop runs twice per id)."""
    with torch.inference_mode():
        return flops(lambda: setup.model(**setup.inputs))


def matmul_job(device: torch.device, dtype: torch.dtype) -> tuple[Callable[[], object], int]:
    """A dense square matmul and its FLOPs: the device's practical peak for this dtype and thread count."""
    cuda = device.type == "cuda"
    size, reps = (8192, 20) if cuda else (2048, 1)  # large enough to saturate the device, long enough to time
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def run() -> None:
        for _ in range(reps):
            a @ b

    return run, 2 * size**3 * reps
