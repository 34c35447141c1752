"""Saving and pushing Hub-ready turn-over models, and registering them with transformers.

A saved folder (or Hub repo) holds everything a fresh process needs::

    config.json              architecture, adapters, turn-over config, training fingerprint, auto_map,
                             custom_pipelines ("turnover-influence")
    model.safetensors        weights (safetensors only: no pickle is written or read)
    *.py                     the flat remote code: modeling_turnover.py, pipeline_turnover.py and their modules
    tokenizer files
    training_set.parquet     the training instances with their ids, and training_set.json (fingerprint)
    turnover_reference.safetensors   the reference gradient of method="centered" (one vector per masked layer)
    turnover_pooling.safetensors     the groups of method="pooled" (ids, labels, components), when built
    README.md                the model card

The folder is written under a temporary name and renamed into place, so a failed save never leaves a
half-written model.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import datasets
import torch
from huggingface_hub import HfApi
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedTokenizerBase
from transformers.pipelines import PIPELINE_REGISTRY

from .card import model_card
from .default_model import DEFAULT_MODEL_DIR
from .modeling_turnover import TurnoverBertConfig, TurnoverBertForSequenceClassification
from .pipeline_turnover import TASK, InfluencePipeline
from .pooled import PooledBasis


def register_with_transformers() -> None:
    """Make the installed code load turn-over models and the "turnover-influence" task (idempotent).

    After this, ``AutoModelForSequenceClassification.from_pretrained(path)`` loads a turn-over model with the
    installed hf_turnover code (no remote code runs), ``pipeline("turnover-influence")`` loads the embedded
    default model, and ``pipeline("turnover-influence", model=path, pipeline_class=InfluencePipeline)`` a
    saved one. Processes without hf_turnover need ``trust_remote_code=True`` (never turned on for you).
    """
    AutoConfig.register(TurnoverBertConfig.model_type, TurnoverBertConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(
        TurnoverBertConfig, TurnoverBertForSequenceClassification, exist_ok=True
    )
    pipelines_logger = logging.getLogger("transformers.pipelines")
    if not any(isinstance(f, _EmbeddedDefaultNotice) for f in pipelines_logger.filters):
        pipelines_logger.addFilter(_EmbeddedDefaultNotice())
    if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
        default = (
            {"pt": (str(DEFAULT_MODEL_DIR), None)} if (DEFAULT_MODEL_DIR / "config.json").is_file() else None
        )
        PIPELINE_REGISTRY.register_pipeline(
            TASK,
            pipeline_class=InfluencePipeline,
            pt_model=AutoModelForSequenceClassification,
            default=default,
            type="text",
        )


class _EmbeddedDefaultNotice(logging.Filter):
    """Drops transformers' "No model was supplied, defaulted to <model> ... (https://huggingface.co/<model>)"
    notice when <model> is the embedded default: it is a folder inside hf_turnover, pinned by this version, not
    a Hub repo at a floating revision, so the notice and its link would mislead. Any other default still warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(f"No model was supplied, defaulted to {DEFAULT_MODEL_DIR} ")


def save_turnover_model(
    model: torch.nn.Module,
    save_directory: str | os.PathLike,
    *,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: datasets.Dataset,
    card: dict[str, Any] | None = None,
    centered_reference: dict[str, torch.Tensor] | None = None,
    pooled_basis: PooledBasis | None = None,
) -> Path:
    """Save ``model`` with its code, tokenizer, training set and model card, Hub-ready (atomically).

    ``model``: a trained ``TurnoverBertForSequenceClassification`` (``from_backbone``), or a
    ``BertForSequenceClassification`` with ``adapters`` and turn-over layers, which is saved as one
    (:meth:`~hf_turnover.modeling_turnover.TurnoverBertForSequenceClassification.from_model`; same weights and
    masks). Other models raise ``TypeError``.
    ``train_dataset`` must be the set the model was trained on (checked against the recorded fingerprint).
    ``card`` holds what the card should report: ``dataset_name``, ``accuracy``, ``baseline_accuracy``,
    ``eval_split``, ``repo_id``, ``base_model``, ``command`` (see :func:`hf_turnover.card.model_card`).
    ``centered_reference``: the reference gradient of ``method="centered"`` if already computed
    (:func:`hf_turnover.explain.training_reference`); else it is computed from ``train_dataset`` here.
    ``pooled_basis``: the groups of ``method="pooled"`` (:func:`hf_turnover.explain.dataset_pooled_basis`),
    saved beside the model; without it the pipeline builds them on first use.
    """
    model = TurnoverBertForSequenceClassification.from_model(model)  # a plain BERT with adapters converts
    card_text = str(model_card(model, **(card or {})))  # before writing anything: a bad card fails early
    pipe = InfluencePipeline(model=model, tokenizer=tokenizer, train_dataset=train_dataset, task=TASK)
    if centered_reference is not None:
        pipe.set_centered_reference(centered_reference)
    if pooled_basis is not None:
        pipe.set_pooled_basis(pooled_basis)
    pipe.save_pretrained(save_directory, card=card_text)  # atomic: model, code, tokenizer, training set, card
    return Path(save_directory)


def push_turnover_model(
    model: torch.nn.Module,
    repo_id: str,
    *,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: datasets.Dataset,
    card: dict[str, Any] | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload turn-over model",
) -> str:
    """Push what :func:`save_turnover_model` writes to the Hub repo ``repo_id``; returns the commit URL."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        save_turnover_model(
            model,
            folder,
            tokenizer=tokenizer,
            train_dataset=train_dataset,
            card={**(card or {}), "repo_id": repo_id},
        )
        info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
    return str(info)
