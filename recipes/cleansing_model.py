"""The classifiers of `recipes/cleansing.py`: an MLP on frozen sentence embeddings (`--setup frozen`), or the
backbone with wide bottleneck adapters in its top layers on the cached output of the layers below (`--setup
adapters`), with turn-over masks or without (the retrained models)."""

from __future__ import annotations

import dataclasses
from typing import Any

import adapters
import torch
import torch.nn.functional as F
from cleansing_parts import PreparedData
from common import SmallPreTrainedModel
from frozen_layers import cut_bottom
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification, PretrainedConfig
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_turnover.config import TurnoverArguments
from hf_turnover.default_model import load_default_model
from hf_turnover.fingerprint import check_fingerprint, recorded_fingerprint
from hf_turnover.heads import HEAD_CLASSIFIERS
from hf_turnover.model import add_turnover
from hf_turnover.modeling_turnover import TurnoverBertForSequenceClassification
from hf_turnover.reuse import tail_entry
from hf_turnover.wide import wide_adapter_config


class EmbeddingClassifierConfig(PretrainedConfig):
    model_type = "turnover_embedding_classifier"

    def __init__(
        self, input_size: int = 384, hidden_size: int = 256, hidden_dropout_prob: float = 0.1, **kwargs
    ):
        super().__init__(**kwargs)
        self.input_size, self.hidden_size, self.hidden_dropout_prob = (
            input_size,
            hidden_size,
            hidden_dropout_prob,
        )


class EmbeddingClassifier(SmallPreTrainedModel):
    """An MLP on frozen sentence embeddings; turn-over masks its hidden units at the classifier's input."""

    config_class = EmbeddingClassifierConfig

    def __init__(self, config: EmbeddingClassifierConfig) -> None:
        super().__init__(config)
        self.dense = nn.Linear(config.input_size, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, sentence_embedding: torch.Tensor, labels: torch.Tensor | None = None):
        hidden = self.dropout(torch.relu(self.dense(sentence_embedding)))  # (B, H)
        logits = self.classifier(hidden)  # (B, C)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def build_classifier(args: Any, turnover_args: TurnoverArguments | None, data: PreparedData) -> nn.Module:
    """A fresh classifier for ``args.setup``, with turn-over masks unless ``turnover_args`` is ``None``."""
    num_labels = int(max(data.train["label"])) + 1
    if args.setup == "frozen":
        dropout = 0.0 if turnover_args else args.hidden_dropout  # turn-over replaces dropout, as in the paper
        config = EmbeddingClassifierConfig(data.input_size, args.hidden_size, dropout, num_labels=num_labels)
        model, targets = EmbeddingClassifier(config), ""
    else:
        model = adapter_classifier(args, data.model_path, num_labels, data.cached_layers)
        n = model.config.num_hidden_layers
        top = "|".join(str(i) for i in range(n - (args.turnover_top_layers or args.adapter_layers), n))
        targets = rf"bert\.encoder\.layer\.(?:{top})\.output\.adapters\.cleansing\.adapter_down"
    if turnover_args:
        if turnover_args.turnover_target_modules is None:  # the set-up's default
            turnover_args = dataclasses.replace(turnover_args, turnover_target_modules=targets)
        add_turnover(model, turnover_args.to_config())
    return model


def adapter_classifier(args: Any, path: str, num_labels: int, cached_layers: int) -> nn.Module:
    """The backbone with ``seq_bn`` adapters in its top ``args.adapter_layers`` layers (``args.adapter_width``
    units in the top one, ``args.lower_adapter_width`` below it) and a classifier; only the adapters and the
    classifier train. The embeddings and the bottom ``cached_layers`` layers are replaced by pass-throughs: the
    inputs are their cached output. After the last attention only [CLS] is computed (all the classifier reads)."""
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    n, hidden = model.config.num_hidden_layers, model.config.hidden_size
    adapter = wide_adapter_config(model.config, args.lower_adapter_width, args.adapter_layers)
    factors = {
        **adapter.reduction_factor,
        str(n - 1): hidden / (args.adapter_width + 0.5),
    }  # as wide.py rounds
    adapters.init(model)
    model.add_adapter("cleansing", config=adapter.replace(reduction_factor=factors))
    model.train_adapter("cleansing")
    return _on_cache(model, cached_layers)


def trained_turnover_model(args: Any, data: PreparedData) -> nn.Module:
    """``--turnover_model``, an already trained turn-over model (``"default"``: the embedded default), on the
    cached inputs: the training set must be the one it recorded, its backbone the cached one and its adapters
    above the cached layers. Only its adapters and classifiers count as trained (the gradient peers' parameters)."""
    if args.turnover_model == "default":
        model = load_default_model()
    else:
        model = TurnoverBertForSequenceClassification.from_pretrained(args.turnover_model)
    escape = (
        f" (--turnover_model {args.turnover_model} was trained on another set: drop --max_train_samples, or pass "
        "its --dataset_name)"
    )
    check_fingerprint(recorded_fingerprint(model), data.train, "the training set", escape)
    backbone, ours = AutoModel.from_pretrained(data.model_path).state_dict(), model.bert.state_dict()
    cached = ("embeddings.", *(f"encoder.layer.{i}." for i in range(data.cached_layers)))
    for name, tensor in backbone.items():
        if name.startswith(cached) and not torch.equal(ours[name], tensor):
            raise ValueError(
                f"--turnover_model {args.turnover_model}: its {name} differs from the backbone "
                f"{data.model_path} whose layers are cached; pass that model's backbone as --model_name_or_path."
            )
    for name, param in model.named_parameters():
        param.requires_grad = ".adapters." in name or name.startswith(("classifier.", f"{HEAD_CLASSIFIERS}."))
        layer = name.split("encoder.layer.")[1].split(".")[0] if "encoder.layer." in name else None
        if ".adapters." in name and layer is not None and int(layer) < data.cached_layers:
            raise ValueError(
                f"--turnover_model {args.turnover_model} has adapters in layer {layer}, which "
                f"--adapter_layers {args.adapter_layers} caches; raise --adapter_layers to cover its adapters."
            )
    return _on_cache(model.eval(), data.cached_layers)


def _on_cache(model: nn.Module, cached_layers: int) -> nn.Module:
    """``model`` taking the cached output of its bottom ``cached_layers`` layers, computing [CLS] only after
    its last attention."""
    cut_bottom(model, cached_layers)
    hidden = model.config.hidden_size
    probe = {"inputs_embeds": torch.zeros(1, 2, hidden), "attention_mask": torch.ones(1, 2, dtype=torch.long)}
    entry = tail_entry(model, probe)
    if entry is not None:
        model.get_submodule(entry).register_forward_pre_hook(_first_position, with_kwargs=True)
    return model


def _first_position(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    def cut(x: Any) -> Any:
        return x[:, :1] if isinstance(x, torch.Tensor) and x.dim() >= 2 else x  # (B, T, ...) -> (B, 1, ...)

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}
