"""`InfluencePipeline` ("turnover-influence"): a prediction and the training instances behind it.

    >>> from transformers import pipeline
    >>> import hf_turnover  # registers the task and its embedded default model
    >>> explain = pipeline("turnover-influence")
    >>> explain("A gorgeous, witty, seductive movie.", top_k=3)
    {"prediction": {"label": "positive", "score": 0.97}, "helpful": [...], "harmful": [...], ...}

Influence sign convention: ``I(z_t, z_i) = L(flip mask of z_i, z_t) - L(own mask of z_i, z_t)`` for the
predicted label; **positive: training instance z_i helped the prediction**, negative: it opposed it.

This file travels with Hub models as remote code: ``pipe.save_pretrained(dir)`` / ``pipe.push_to_hub(repo)``
write it next to the model, and ``pipeline(model=dir_or_repo, trust_remote_code=True)`` loads it in a process
without hf_turnover. Flat: installed packages and sibling modules only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import datasets
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, Pipeline
from transformers.utils import cached_file, logging

# transformers copies only the modules that a remote-code file imports directly when it loads from a local
# directory (the Hub path recurses), so this file imports every module of its closure itself (the noqa ones).
from .atomic import atomic_directory
from .config import TurnoverConfig  # noqa: F401
from .context import turnover_context  # noqa: F401
from .distributed import shardable  # noqa: F401
from .explain import (
    POOLING_FILE,
    REFERENCE_FILE,
    explain_prediction,
    explain_predictions,
    training_pooled_basis,
    training_reference,
)
from .fingerprint import check_fingerprint, recorded_fingerprint, training_fingerprint
from .heads import single_head  # noqa: F401
from .influence import estimate_influence  # noqa: F401
from .inputs import check_dataset, per_row_loss  # noqa: F401
from .layer import TurnoverHook  # noqa: F401
from .linear import check_method, make_scorer
from .lora import LoRARankHook  # noqa: F401
from .masks import keep_bits  # noqa: F401
from .model import add_turnover  # noqa: F401
from .modeling_turnover import copy_code_files, resolve_base_model
from .pipeline_inputs import (
    checked_max_length,
    checked_texts,
    model_token_limit,
    positive_int,
    query_fields,
    texts_of,
    truncation_flag,
)
from .pooled import PooledBasis
from .query_checks import content_ids, seen_tokens, token_warnings, unknown_share, unseen_share
from .results import scores_dataset  # noqa: F401
from .reuse import tail_entry  # noqa: F401
from .scorer import TurnoverScorer
from .scoring_steps import TargetPrep  # noqa: F401
from .sharding import implements  # noqa: F401
from .training_set import INFO_FILE, TEXT_COLUMNS, load_training_set, save_training_set
from .wide import wide_adapter_config  # noqa: F401

logger = logging.get_logger(__name__)

TASK = "turnover-influence"
# "linear" (the library functions' default), "centered" and "exact" (the paper) are a call argument away
DEFAULT_METHOD = "pooled"
DEFAULT_TOP_K = 5  # instances per side
DEFAULT_TEXT_BATCH = 16  # texts per forward and backward pass of the linear methods
CUSTOM_PIPELINE = {
    "impl": "pipeline_turnover.InfluencePipeline",
    "pt": ("AutoModelForSequenceClassification",),
    "tf": (),
    "type": "text",
}


class InfluencePipeline(Pipeline):
    """Explains predictions of a turn-over text classifier by its most helpful and most harmful training
    instances.

    Call with a text (returns a dict), a list of texts (a list), or a generator, ``KeyDataset`` or
    ``datasets.Dataset`` (its ``text``/``sentence`` column; returns an iterator that explains ``batch_size`` texts
    at a time as it is read). Options, at construction or per call, as in transformers' pipelines:

    - ``top_k``: instances per side (default 5; clipped to what exists); ``top_k=None`` lists every instance
      with a positive score in ``helpful`` and every one with a negative score in ``harmful`` (as ``top_k=None``
      means every label in transformers' text classification);
    - ``batch_size``: texts per batch (the linear methods share one forward and backward pass per batch; default
      16; ``"exact"`` explains one text at a time); ``train_batch_size``: training instances per forward of
      ``"exact"`` (default: sized to the input and device);
    - ``max_length`` (default 128 or the model's limit if lower; above the model's limit is refused) and
      ``truncation`` (default ``True``: longer texts are cut and flagged ``"truncated": True``; ``False``:
      longer texts are refused);
    - ``restrict_to_label``: ``True`` keeps only training instances carrying the predicted label (for a wrong
      prediction, the paper's "influential instances with the error label"), or a label id or name;
    - ``method``: ``"pooled"``, the pipeline's default: the linear scores pooled over groups of alike training
      instances (label and the top principal components of the classifier's input), each instance's own residual
      kept in proportion to its share above the mask noise (see :mod:`hf_turnover.pooled`; the groups travel with
      a saved pipeline, else they are built once, one forward pass over the training texts). On the embedded
      default its top helpful sentence carries the predicted label for 94% of 200 held-out test sentences and two
      seeds agree at per-target Spearman 0.85, where ``"linear"`` gets 56% and 0.004 (``benchmarks/RESULTS.md``).
      ``"linear"``, the library functions' default: first order in the masks, one forward and backward pass per
      text and a product with the training set's cached mask bits, a few milliseconds against thousands of
      instances; ``"centered"``: linear with the training set's typical gradient taken out of each
      text's (see :mod:`hf_turnover.linear`; the reference gradient travels with a saved pipeline), which keeps
      instances whose masks happen to help every prediction off the lists; ``"exact"``: own and flipped forward
      passes for every instance, the paper's estimate, about 2N forwards of the masked layers per text (a progress
      bar shows on long runs; ``transformers.utils.logging.disable_progress_bar()`` hides it).

    Construction takes ``train_dataset`` when no training set travels with the model.

    Each output has the schema of :func:`~hf_turnover.explain.explain_prediction`: ``{"prediction": {"label",
    "score"}, "helpful": [...], "harmful": [...], "restricted_to_label", "warnings"}`` with each instance
    ``{"train_id", "text", "label", "score", "percentile"}``: ``score`` is the raw influence (> 0 in ``helpful``,
    < 0 in ``harmful``, never in both; its scale varies from query to query), ``percentile`` its rank among all
    scored instances of this query (100 = highest), comparable across queries. The pipeline adds
    ``"truncated"``, ``"unknown_token_share"`` and ``"unseen_token_share"`` (the shares of the text's tokens that
    the tokenizer does not know, and that no training text holds; above one half the output carries a warning,
    see :mod:`hf_turnover.query_checks`). Empty strings and non-text inputs raise ``ValueError`` / ``TypeError``
    naming the input; an empty list gives ``[]``.
    """

    _load_tokenizer = None  # optional: adapter-only checkpoints take the tokenizer of their backbone
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False

    def __init__(self, *args: Any, train_dataset: datasets.Dataset | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batch_size = positive_int("batch_size", self._batch_size) if self._batch_size else None
        self._scorers: dict[tuple[str, int | None], TurnoverScorer] = {}
        self._reference: dict[str, torch.Tensor] | None = None
        self._basis: PooledBasis | None = None
        self._seen_tokens: torch.Tensor | None | bool = False  # False: not read yet
        if self.tokenizer is None:
            self.tokenizer = _backbone_tokenizer(self.model)
        recorded = recorded_fingerprint(self.model)
        if train_dataset is not None:
            train_dataset = check_dataset(train_dataset, "train_dataset")
            check_fingerprint(recorded, train_dataset, "train_dataset")
            self.train_dataset = train_dataset
        elif not self.model.name_or_path:
            raise ValueError(
                "This model was not loaded from a folder or repo, so no training set travels with it: pass the "
                "exact training set it was trained on, with its instance ids, as train_dataset=."
            )
        else:
            self.train_dataset = load_training_set(
                self.model.name_or_path, recorded, **_hub_kwargs(self.model)
            )
        if recorded is None:
            logger.warning("This model recorded no training fingerprint: the training set cannot be checked.")

    def _sanitize_parameters(
        self,
        top_k: Any = "",  # "" = not given (None means every instance), as in transformers' text classification
        restrict_to_label=None,
        train_batch_size=None,
        max_length=None,
        truncation=None,
        method=None,
        **kwargs,
    ) -> tuple[dict, dict, dict]:
        if kwargs:
            raise TypeError(
                f"Unknown option(s) {sorted(kwargs)}; use top_k, restrict_to_label, batch_size, train_batch_size, "
                "max_length, truncation, method."
            )
        preprocess = {}
        if max_length is not None:
            preprocess["max_length"] = positive_int("max_length", max_length)
        if truncation is not None:
            preprocess["truncation"] = truncation_flag(truncation)
        forward = {}
        if top_k != "":
            forward["top_k"] = None if top_k is None else positive_int("top_k", top_k)
        if restrict_to_label is not None:
            forward["restrict_to_label"] = self._label_id(restrict_to_label)
        if train_batch_size is not None:
            forward["train_batch_size"] = positive_int("train_batch_size", train_batch_size)
        if method is not None:
            forward["method"] = check_method(method)
        return preprocess, forward, {}

    def __call__(self, inputs: Any, **kwargs: Any) -> dict | list[dict] | Iterator[dict]:
        """Explain one text (a dict), each text of a list (a list of dicts), or each text of a generator,
        ``KeyDataset`` or ``datasets.Dataset`` (an iterator of dicts, ``batch_size`` texts explained at a time)."""
        batch_size = kwargs.pop("batch_size", None)
        batch_size = positive_int("batch_size", batch_size) if batch_size is not None else self._batch_size
        preprocess, forward, _ = self._sanitize_parameters(**kwargs)
        options = ({**self._preprocess_params, **preprocess}, {**self._forward_params, **forward})
        if isinstance(inputs, str):
            return self._explain_texts(checked_texts([inputs]), *options, batch_size)[0]
        if isinstance(inputs, (list, tuple)):
            return self._explain_texts(checked_texts(list(inputs)), *options, batch_size)
        return self._stream(texts_of(inputs), options, batch_size or DEFAULT_TEXT_BATCH)

    def _stream(self, texts: Iterable[Any], options: tuple[dict, dict], batch_size: int) -> Iterator[dict]:
        """Explanations of the texts of an iterable, read and explained ``batch_size`` at a time."""
        chunk: list[Any] = []
        offset = 0
        for text in texts:
            chunk.append(text)
            if len(chunk) == batch_size:
                yield from self._explain_texts(checked_texts(chunk, offset), *options, batch_size)
                offset, chunk = offset + len(chunk), []
        if chunk:
            yield from self._explain_texts(checked_texts(chunk, offset), *options, batch_size)

    def _explain_texts(
        self, texts: list[str], preprocess: dict, forward: dict, batch_size: int | None
    ) -> list[dict]:
        """Texts with ``method="pooled"``, ``"linear"`` or ``"centered"``: padded batches of ``batch_size`` share one forward
        and backward pass and one product with the mask table (see
        :func:`~hf_turnover.explain.explain_predictions`); ``"exact"``: one text at a time."""
        prepared = [self.preprocess(text, **preprocess) for text in texts]
        if forward.get("method", DEFAULT_METHOD) == "exact":
            return [self.postprocess(self._forward(p, **forward)) for p in prepared]
        method = forward.get("method", DEFAULT_METHOD)
        targets = [{k: v[0].tolist() for k, v in p["inputs"].items()} for p in prepared]
        explanations = explain_predictions(
            self.model, self.train_dataset, targets, batch_size=batch_size or DEFAULT_TEXT_BATCH,
            top_k=forward.get("top_k", DEFAULT_TOP_K), restrict_to_label=forward.get("restrict_to_label"),
            check_fingerprint=False, scorer=self._scorer(method, None),
        )  # fmt: skip
        return [
            self.postprocess({**e, **query_fields(p)}) for e, p in zip(explanations, prepared, strict=True)
        ]

    def preprocess(self, text: str, max_length: int | None = None, truncation: bool = True) -> dict[str, Any]:
        limit = checked_max_length(self.model, self.tokenizer, max_length)
        # One tokenization: the part past ``limit`` comes back as overflow (fast tokenizers: extra rows).
        encoded = self.tokenizer(
            text, truncation=True, max_length=limit, return_overflowing_tokens=True, verbose=False
        )
        if "overflow_to_sample_mapping" in encoded:
            truncated = len(encoded["input_ids"]) > 1
            encoded = {k: v[0] for k, v in encoded.items() if k != "overflow_to_sample_mapping"}
        else:
            truncated = bool(encoded.get("num_truncated_tokens", 0) > 0)
            encoded = {
                k: v for k, v in encoded.items() if k not in ("overflowing_tokens", "num_truncated_tokens")
            }
        warnings = []
        if truncated:
            if not truncation:
                raise ValueError(
                    f"The input {text!r:.60} is longer than max_length={limit} tokens and truncation=False: "
                    f"shorten it, pass truncation=True (explains its first {limit} tokens), or a larger "
                    f"max_length (this model reads at most {model_token_limit(self.model, self.tokenizer)})."
                )
            warnings.append(
                f"Input longer than {limit} tokens truncated to {limit}: only its beginning is explained."
            )
        ids = content_ids(encoded["input_ids"], self.tokenizer)
        unknown, unseen = unknown_share(ids, self.tokenizer), unseen_share(ids, self._training_tokens(limit))
        warnings += token_warnings(unknown, unseen)
        for warning in warnings:
            logger.warning(warning)
        return {
            "inputs": {k: torch.tensor([v]) for k, v in encoded.items()},
            "truncated": truncated,
            "unknown_token_share": unknown,
            "unseen_token_share": unseen,
            "warnings": warnings,
        }

    def _training_tokens(self, max_length: int) -> torch.Tensor | None:
        """Which token ids the training texts hold (read once; ``None`` without a text column)."""
        if self._seen_tokens is False:
            column = next((c for c in TEXT_COLUMNS if c in self.train_dataset.column_names), None)
            texts = self.train_dataset[column] if column else None
            self._seen_tokens = seen_tokens(self.tokenizer, list(texts), max_length) if column else None
        return self._seen_tokens

    def _forward(
        self,
        model_inputs: dict[str, Any],
        top_k: int | None = DEFAULT_TOP_K,
        restrict_to_label=None,
        train_batch_size=None,
        method=DEFAULT_METHOD,
    ):
        target = {name: tensor[0].tolist() for name, tensor in model_inputs["inputs"].items()}
        explanation = explain_prediction(
            self.model,
            self.train_dataset,
            target,
            top_k=top_k,
            restrict_to_label=restrict_to_label,
            check_fingerprint=False,  # checked once, when the training set was attached
            progress=None,  # a bar on long exact runs
            scorer=self._scorer(method, train_batch_size),
        )
        return {**explanation, **query_fields(model_inputs)}

    def _scorer(self, method: str, batch_size: int | None) -> TurnoverScorer:
        """One scorer per (method, batch size), kept across calls: the model is probed once and the linear
        scorers keep the training set's mask table (one for every batch size: they run no id batches)."""
        key = (method, batch_size if method == "exact" else None)
        if key not in self._scorers:
            reference = self.centered_reference() if method == "centered" else None
            basis = self.pooled_basis() if method == "pooled" else None
            self._scorers[key] = make_scorer(
                self.model, method, reference, basis=basis, batch_size=batch_size
            )
        return self._scorers[key]

    def centered_reference(self) -> dict[str, torch.Tensor]:
        """The reference gradient of ``method="centered"``: read from the model's folder or repo
        (``turnover_reference.safetensors``), else computed once from the training set
        (:func:`~hf_turnover.explain.training_reference`, a few seconds) and written by ``save_pretrained``."""
        if self._reference is None:
            self._reference = load_reference(self.model)
        if self._reference is None:
            logger.info("Computing the centered method's reference gradient from the training set.")
            self._reference = training_reference(
                self.model,
                self.tokenizer,
                self.train_dataset,
                max_length=model_token_limit(self.model, self.tokenizer),
            )
        return self._reference

    def set_centered_reference(self, reference: dict[str, torch.Tensor]) -> None:
        """Use ``reference`` (e.g. computed by a training script) for ``method="centered"`` and when saving."""
        self._reference = {
            name: torch.as_tensor(g, dtype=torch.float32).cpu() for name, g in reference.items()
        }
        self._scorers = {k: v for k, v in self._scorers.items() if k[0] != "centered"}

    def pooled_basis(self) -> PooledBasis:
        """The training set's groups for ``method="pooled"``: read from the model's folder or repo
        (``turnover_pooling.safetensors``), else built once from the training set
        (:func:`~hf_turnover.explain.training_pooled_basis`: one forward pass over every training text, with a
        progress bar; about 2 minutes for 8,454 sentences on 2 CPU cores) and written by ``save_pretrained``."""
        if self._basis is None:
            path = _file_beside(self.model, POOLING_FILE)
            if path is not None:
                self._basis = PooledBasis.from_state_dict(load_file(path))
        if self._basis is None:
            logger.info(
                "Building the pooled method's basis from the training set (one forward pass per text)."
            )
            self._basis = training_pooled_basis(
                self.model,
                self.tokenizer,
                self.train_dataset,
                max_length=model_token_limit(self.model, self.tokenizer),
            )
        return self._basis

    def set_pooled_basis(self, basis: PooledBasis) -> None:
        """Use ``basis`` (e.g. built by a training script on cached inputs) for ``method="pooled"`` and when
        saving."""
        self._basis = basis
        self._scorers = {k: v for k, v in self._scorers.items() if k[0] != "pooled"}

    def postprocess(self, outputs: dict[str, Any]) -> dict[str, Any]:
        """The library explanation (labels are already names) with the text's own fields; no ``true_label``
        (a text carries none)."""
        out = {k: v for k, v in outputs.items() if k not in ("true_label", "query_warnings")}
        out["warnings"] = [*outputs["query_warnings"], *outputs["warnings"]]
        return out

    def _label_id(self, label: bool | int | str) -> bool | int:
        if label is True or (isinstance(label, int) and not isinstance(label, bool)):
            if label is not True and label not in self.model.config.id2label:
                raise ValueError(
                    f"restrict_to_label={label} is not a label id; ids: {self.model.config.id2label}."
                )
            return label
        if isinstance(label, str) and label in self.model.config.label2id:
            return int(self.model.config.label2id[label])
        raise ValueError(
            f"restrict_to_label={label!r} is not True, a label id or a label name; names: "
            f"{list(self.model.config.label2id)}."
        )

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        safe_serialization: bool = True,
        card: str | None = None,
        **kwargs,
    ):
        """Write model, tokenizer, training set, card and this pipeline's code into ``save_directory`` (atomic).

        ``card``: the model card's text; by default the card of the turn-over model this one was loaded from.
        """
        if not safe_serialization:
            raise ValueError(
                "Turn-over pipelines are saved as safetensors only; drop safe_serialization=False."
            )
        with atomic_directory(save_directory) as tmp:
            self.model.config.custom_pipelines = {TASK: dict(CUSTOM_PIPELINE)}
            self.model.save_pretrained(tmp)
            copy_code_files(Path(__file__), tmp)
            self.tokenizer.save_pretrained(tmp)
            save_training_set(self.train_dataset, tmp, recorded_fingerprint(self.model) or _fingerprint(self))
            save_file({k: v.contiguous() for k, v in self.centered_reference().items()}, tmp / REFERENCE_FILE)
            save_file(self.pooled_basis().state_dict(), tmp / POOLING_FILE)
            if card is not None:
                (tmp / "README.md").write_text(card, encoding="utf-8")
            else:
                _copy_card(self.model, tmp)


def _fingerprint(pipe: InfluencePipeline) -> dict[str, Any]:
    """For models trained without TurnoverTrainer: the fingerprint of the training set attached now."""
    return training_fingerprint(pipe.train_dataset, pipe.model.turnover_config.id_column)


def load_reference(model: Any) -> dict[str, torch.Tensor] | None:
    """The reference gradient saved beside the model (folder or Hub repo), or ``None``."""
    path = _file_beside(model, REFERENCE_FILE)
    return load_file(path) if path is not None else None


def _file_beside(model: Any, filename: str) -> str | None:
    """The local path of ``filename`` in the folder or Hub repo the model was loaded from, or ``None`` (no such
    file, or a model built in memory)."""
    if not model.name_or_path:
        return None
    hub = {**_hub_kwargs(model), "_raise_exceptions_for_missing_entries": False}
    try:
        return cached_file(model.name_or_path, filename, **hub)
    except (OSError, ValueError):  # not a folder or repo id
        return None


def _hub_kwargs(model: Any) -> dict[str, Any]:
    """The revision (commit) the model was loaded at and the token it was loaded with, for its other files."""
    return {
        "revision": getattr(model.config, "_commit_hash", None),
        "token": getattr(model, "turnover_hub_token", None),
    }


def _backbone_tokenizer(model: Any) -> Any:
    """The tokenizer beside the model, else (adapter-only checkpoints) the one of its backbone."""
    base = getattr(model.config, "turnover_base_model", None)
    source = resolve_base_model(base) if base else model.name_or_path
    try:
        return AutoTokenizer.from_pretrained(source, token=getattr(model, "turnover_hub_token", None))
    except (OSError, ValueError) as error:
        raise ValueError(
            f"No tokenizer found for the model {model.name_or_path!r} ({error}). Pass tokenizer= to pipeline()."
        ) from error


def _copy_card(model: Any, directory: Path) -> None:
    """Carry the model card of the turn-over folder or repo the model came from, if it has one (not the card
    of a backbone the model was built from)."""
    if (directory / "README.md").exists() or _file_beside(model, INFO_FILE) is None:
        return
    card = _file_beside(model, "README.md")
    if card is not None:
        (directory / "README.md").write_text(Path(card).read_text(encoding="utf-8"), encoding="utf-8")
