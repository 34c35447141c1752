"""Choose the embedded default model's set-up by measurement: validation accuracy of MiniLM-L6 + bottleneck
adapters + turn-over masks on all 8,454 bundled Rotten Tomatoes training sentences.

    python benchmarks/faithfulness/default_model_sweep.py                      # the sweep recorded in benchmarks/RESULTS.md
    python benchmarks/faithfulness/default_model_sweep.py --configs top1 top3  # some of it

(The paper's every-layer set-up, adapters in all six layers, is left out for its cost here: nothing can be cached
and every step runs the backward pass through all six layers.)

Each set-up puts seq_bn adapters in the top ``k`` encoder layers of the frozen all-MiniLM-L6-v2 and turn-over
masks on the adapters of the top ``masked`` layers and on the classifier input (the units below them, if any, see
every instance: the paper's VGG set-up, masks on the later layers only). The frozen layers below the adapters
compute the same thing every epoch, so this sweep runs them once (in eval mode, without their dropout) and trains
the top ``k`` layers on their cached output: fast enough to try many set-ups, and the chosen one is then trained
for real by ``recipes/sst2.py``, whose accuracy is the one the model card reports. Prints one line per set-up and
epoch, the identical-class rate and distinct top-1/top-5 training sentences of linearized explanations of 100
validation sentences (``hf_turnover.evaluation.explanation_checks``), and writes ``default_model_sweep.json``
beside this file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import _paths  # noqa: F401  (benchmarks/lib on sys.path)
import numpy as np
import torch
from faithfulness_lib.minilm_top import PassEmbeddings, PassLayer
from torch import nn
from transformers import AutoConfig, AutoTokenizer, get_linear_schedule_with_warmup

from hf_turnover import TurnoverConfig
from hf_turnover.data import load_bundled_dataset
from hf_turnover.evaluation import explanation_checks
from hf_turnover.linear import LinearScorer
from hf_turnover.modeling_turnover import TurnoverBertForSequenceClassification
from hf_turnover.wide import wide_adapter_config

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
from common import default_backbone  # noqa: E402


@dataclass
class SetUp:
    name: str
    layers: int  # encoder layers (from the top) with an adapter
    masked: int  # of those, the top ones whose adapter units are masked
    width: int = 1536  # units of the top layer's adapter
    lower_width: int = 384  # units of the adapters below it
    learning_rate: float = 3e-3
    epochs: int = 1
    p: float = 0.5
    turnover: bool = True  # False: ordinary dropout (drop 1 - p) on the same units, the side-effect baseline


SETUPS = [  # in the order they run
    SetUp("top2", 2, 2),
    SetUp("top2-unmasked-below", 2, 1),
    SetUp("top1", 1, 1),
    SetUp("top2-dropout", 2, 2, turnover=False),
]


def batches(tokenizer, sentences, labels, max_length=64, batch_size=32):
    """Length-sorted batches (as ``group_by_length``): (input_ids, attention_mask, labels, row indices)."""
    encoded = tokenizer(sentences, truncation=True, max_length=max_length)["input_ids"]
    order = np.argsort([len(ids) for ids in encoded], kind="stable")
    out = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        padded = tokenizer.pad({"input_ids": [encoded[r] for r in rows]}, return_tensors="pt")
        out.append((padded["input_ids"], padded["attention_mask"], torch.as_tensor(labels[rows]), rows))
    return out


@torch.no_grad()
def frozen_outputs(model, data, below: int):
    """Hidden states after the bottom ``below`` layers of the (frozen, adapter-free) encoder, per batch; the layers
    above are passed through, not computed."""
    model.eval()
    layers = model.bert.encoder.layer
    top = [layers[i] for i in range(below, len(layers))]
    for i in range(below, len(layers)):
        layers[i] = PassLayer()
    try:
        return [
            (model.bert(input_ids, attention_mask=mask).last_hidden_state, mask, labels, rows)
            for input_ids, mask, labels, rows in data
        ]
    finally:
        for i, layer in enumerate(top, start=below):
            layers[i] = layer


def build(setup: SetUp, backbone: str) -> TurnoverBertForSequenceClassification:
    config = AutoConfig.from_pretrained(backbone)
    n = config.num_hidden_layers
    adapter = wide_adapter_config(config, setup.width, setup.layers, lower_width=setup.lower_width)
    masked = "|".join(str(i) for i in range(n - setup.masked, n))
    turnover = TurnoverConfig(
        p=setup.p, target_modules=rf"bert\.encoder\.layer\.({masked})\.output\.adapters\..*\.adapter_down"
    )
    return TurnoverBertForSequenceClassification.from_backbone(
        backbone, adapter_name="sst2", adapter_config=adapter, turnover=turnover
    )


def plain_dropout(model: nn.Module, drop: float) -> None:
    """Swap the turn-over masks for ordinary dropout on the same units (as recipes/sst2.py's baseline)."""
    import torch.nn.functional as F

    from hf_turnover.model import find_modules, get_turnover_config, remove_turnover

    config = get_turnover_config(model)
    remove_turnover(model)
    for name in find_modules(model, config.target_modules, config.exclude_modules):
        model.get_submodule(name).register_forward_hook(lambda m, a, o: F.dropout(o, drop, m.training))
    for name in find_modules(model, config.head_modules, config.exclude_modules):
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, a: (F.dropout(a[0], drop, m.training), *a[1:])
        )


def run(setup: SetUp, backbone: str, train, validation, seed: int, caches: dict) -> list[dict]:
    torch.manual_seed(seed)
    model = build(setup, backbone)
    below = model.config.num_hidden_layers - setup.layers
    if below not in caches:  # the frozen layers are the same in every set-up: run them once per depth
        caches[below] = frozen_outputs(model, train, below), frozen_outputs(model, validation, below)
    train_cache, validation_cache = caches[below]
    model.bert.embeddings = PassEmbeddings()
    for index in range(below):  # module names stay as they are: the masks and the linear scorer use them
        model.bert.encoder.layer[index] = PassLayer()
    if not setup.turnover:
        plain_dropout(model, 1.0 - setup.p)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=setup.learning_rate, weight_decay=0.0)
    steps = setup.epochs * len(train_cache)
    schedule = get_linear_schedule_with_warmup(optimizer, math.ceil(0.06 * steps), steps)
    generator = torch.Generator().manual_seed(seed)
    rows_out = []
    for epoch in range(1, setup.epochs + 1):
        start = time.perf_counter()
        model.train()
        for b in torch.randperm(len(train_cache), generator=generator).tolist():
            hidden, mask, labels, rows = train_cache[b]
            with model.turnover_context(torch.as_tensor(rows)):
                loss = model(inputs_embeds=hidden, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        model.eval()
        correct = 0
        with torch.no_grad():
            for hidden, mask, labels, _ in validation_cache:
                logits = model(inputs_embeds=hidden, attention_mask=mask).logits
                correct += int((logits.argmax(-1) == labels).sum())
        accuracy = correct / sum(len(v[2]) for v in validation_cache)
        row = {**asdict(setup), "epoch": epoch, "accuracy": accuracy, "epoch_s": round(seconds, 1)}
        print(
            f"{setup.name:24s} epoch {epoch}: validation accuracy {accuracy:.4f} ({seconds:.0f} s)",
            flush=True,
        )
        rows_out.append(row)
    if setup.turnover:
        rows_out[-1]["checks"] = checks = explanation_check(model, train_cache, validation_cache)
        print(f"{setup.name:24s} explanations: {checks}", flush=True)
    return rows_out


def explanation_check(model, train_cache, validation_cache, num_queries: int = 100, top_k: int = 5) -> dict:
    """``hf_turnover.evaluation.explanation_checks`` of linearized explanations of the first ``num_queries``
    validation sentences against the whole training set (the first-order scores the default pipeline gives)."""
    labels = torch.zeros(sum(len(b[2]) for b in train_cache), dtype=torch.int64)
    for _, _, batch_labels, rows in train_cache:
        labels[torch.as_tensor(rows)] = batch_labels
    scorer, ids, explanations = LinearScorer(model), torch.arange(len(labels)), []
    for hidden, mask, _, rows in validation_cache:
        keep = torch.as_tensor(rows) < num_queries
        if not keep.any():
            continue
        inputs = {"inputs_embeds": hidden[keep], "attention_mask": mask[keep]}
        logits, grads = scorer.logits_and_gradients(inputs)
        top = scorer.scores_from_gradients(grads, ids).topk(top_k, dim=1).indices
        for predicted, row in zip(logits.argmax(-1).tolist(), top.tolist(), strict=True):
            helpful = [{"id": i, "label": int(labels[i])} for i in row]
            explanations.append({"prediction": {"label": predicted}, "helpful": helpful})
    return explanation_checks(explanations, top_k)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--configs", nargs="*", default=None, help=f"Set-ups to run: {[s.name for s in SETUPS]}"
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max_train_samples", type=int, default=None, help="First N training rows (smoke).")
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("default_model_sweep.json"))
    args = parser.parse_args()
    chosen = [s for s in SETUPS if args.configs is None or s.name in args.configs]
    unknown = set(args.configs or []) - {s.name for s in SETUPS}
    if unknown:
        parser.error(f"unknown set-ups {sorted(unknown)}; choose from {[s.name for s in SETUPS]}")
    backbone = default_backbone()
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    data = load_bundled_dataset("rotten_tomatoes")
    train_split = (
        data["train"]
        if args.max_train_samples is None
        else data["train"].select(range(args.max_train_samples))
    )
    train, validation = (
        batches(tokenizer, split["sentence"], np.asarray(split["label"]), batch_size=size)
        for split, size in ((train_split.to_dict(), 32), (data["validation"].to_dict(), 128))
    )
    caches = {}
    for setup in chosen:  # each set-up's rows are written as soon as it is done: an interruption loses one
        rows = run(setup, backbone, train, validation, args.seed, caches)
        previous = json.loads(args.output.read_text()) if args.output.is_file() else []
        merged = [r for r in previous if r["name"] != setup.name] + rows
        args.output.write_text(json.dumps(merged, indent=1) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
