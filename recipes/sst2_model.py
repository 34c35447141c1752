"""The model of `recipes/sst2.py`: its options, the backbone with adapters (or LoRA) and turn-over masks, and the
ordinary-dropout baseline on the same units."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from adapters import AdapterConfig, LoRAConfig
from torch import nn
from transformers import AutoConfig

from hf_turnover.config import TurnoverArguments, TurnoverConfig
from hf_turnover.heads import HEADS_HEAD_MODULES
from hf_turnover.lora import ADAPTERS_LORA_MODULES, LoRARankHook, make_hook
from hf_turnover.model import find_modules
from hf_turnover.modeling_turnover import TurnoverBertForSequenceClassification
from hf_turnover.wide import wide_adapter_config


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
    masked_heads: int | None = field(
        default=None,
        metadata={
            "help": "Masked heads on the one frozen body (hf_turnover.heads): each has its own adapters, "
            "classifier and masks, and the model is their average. K heads cost K times the training and the "
            "scoring of one. Default: 2 with the default wide seq_bn adapters, 1 with --paper_scale, "
            "--adapter_config lora or double_seq_bn, --adapter_width 0 or --train_pooler."
        },
    )


def apply_presets(model_args: ModelArguments, data_args: Any, turnover_args: TurnoverArguments, recipe: Any,
                  training_args: Any) -> None:  # fmt: skip
    """``--paper_scale`` (5,000 instances, 10 epochs, Houlsby adapters in every layer), the number of masked heads
    and, for LoRA, the masks on the rank units of every LoRA unless ``--turnover_target_modules`` says
    otherwise."""
    if recipe.paper_scale:
        data_args.max_train_samples, training_args.num_train_epochs = 5000, 10
        model_args.adapter_top_layers, model_args.adapter_config, model_args.adapter_width = (
            0,
            "double_seq_bn",
            0,
        )
    if model_args.masked_heads is None:  # the embedded default's two heads, where its set-up is kept
        default_setup = model_args.adapter_config == "seq_bn" and model_args.adapter_width > 0
        model_args.masked_heads = 2 if default_setup and not model_args.train_pooler else 1
    if model_args.masked_heads < 1:
        raise ValueError(f"--masked_heads {model_args.masked_heads}: give 1 or more masked heads.")
    if model_args.masked_heads > 1:
        if model_args.train_pooler:
            raise ValueError(
                f"--train_pooler trains the pooler that all {model_args.masked_heads} heads share, so the heads "
                "would not train apart; drop --train_pooler or use --masked_heads 1."
            )
        if turnover_args.turnover_head_modules == TurnoverArguments.turnover_head_modules:
            turnover_args.turnover_head_modules = HEADS_HEAD_MODULES  # every head's classifier input
    default_targets = TurnoverArguments.turnover_target_modules
    if model_args.adapter_config == "lora" and turnover_args.turnover_target_modules == default_targets:
        turnover_args.turnover_target_modules = ADAPTERS_LORA_MODULES


def frozen_below(model_args: Any, backbone: str, recipe: Any) -> int:
    """How many bottom encoder layers carry nothing that trains (their output can be cached): those below the
    adapters, unless --cache_frozen_layers false or adapters sit in every layer (then 0)."""
    if not recipe.cache_frozen_layers or not model_args.adapter_top_layers:
        return 0
    return max(0, AutoConfig.from_pretrained(backbone).num_hidden_layers - model_args.adapter_top_layers)


def build_model(
    model_args: Any, config: TurnoverConfig, backbone: str
) -> TurnoverBertForSequenceClassification:
    """Backbone + bottleneck adapters (top ``adapter_top_layers`` layers, ``adapter_width`` units each) or LoRA
    (rank ``lora_r`` on query and value of those layers) + classifier, with turn-over masks."""
    backbone_config = AutoConfig.from_pretrained(backbone)
    layers = model_args.adapter_top_layers or backbone_config.num_hidden_layers
    leave_out = list(range(backbone_config.num_hidden_layers - layers))
    if model_args.adapter_config == "lora":
        adapter = LoRAConfig(r=model_args.lora_r, alpha=model_args.lora_alpha, leave_out=leave_out)
    elif model_args.adapter_width:
        adapter = wide_adapter_config(
            backbone_config, model_args.adapter_width, layers, model_args.adapter_config,
            lower_width=model_args.adapter_lower_width or None,
        )  # fmt: skip
    else:
        adapter = AdapterConfig.load(model_args.adapter_config)
        adapter = adapter.replace(leave_out=leave_out)
    model = TurnoverBertForSequenceClassification.from_backbone(
        backbone, num_labels=2, adapter_name="sst2", adapter_config=adapter, turnover=config,
        heads=model_args.masked_heads,
        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
    )  # fmt: skip
    model.bert.pooler.requires_grad_(model_args.train_pooler)
    return model


def add_plain_dropout(model: nn.Module, config: TurnoverConfig) -> nn.Module:
    """Ordinary dropout (drop probability ``1 - p``) on exactly the units turn-over would mask: the baseline.

    LoRA rank units have no module boundary, so they get it through the turn-over hook's recomputation, one draw
    per row and rank unit (as the turn-over masks are drawn)."""
    drop = 1.0 - config.p

    def on_output(module, args, output):
        return F.dropout(output, drop, module.training)

    def on_input(module, args):
        return (F.dropout(args[0], drop, module.training), *args[1:])

    def rank_dropout(module, rows, width, device, dtype):
        if not module.training:
            return None
        return F.dropout(torch.ones(rows, width, device=device, dtype=dtype), drop)  # (B, r)

    for name in find_modules(model, config.target_modules, config.exclude_modules):
        hook = make_hook(model, name, "output", config)
        if isinstance(hook, LoRARankHook):
            hook.register(model.get_submodule(name), rank_dropout)
        else:
            model.get_submodule(name).register_forward_hook(on_output)
    for name in find_modules(model, config.head_modules, config.exclude_modules):
        model.get_submodule(name).register_forward_pre_hook(on_input)
    return model
