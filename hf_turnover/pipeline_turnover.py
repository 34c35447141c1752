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
from .explain import REFERENCE_FILE, explain_prediction, explain_predictions, training_reference
from .fingerprint import check_fingerprint, recorded_fingerprint, training_fingerprint
from .influence import estimate_influence  # noqa: F401
from .inputs import per_row_loss  # noqa: F401
from .layer import TurnoverHook  # noqa: F401
from .linear import check_method, make_scorer
from .lora import LoRARankHook  # noqa: F401
from .masks import keep_bits  # noqa: F401
from .model import add_turnover  # noqa: F401
from .modeling_turnover import copy_code_files, resolve_base_model
from .results import scores_dataset  # noqa: F401
from .reuse import tail_entry  # noqa: F401
from .scorer import TurnoverScorer
from .scoring_steps import TargetPrep  # noqa: F401
from .sharding import implements  # noqa: F401
from .training_set import INFO_FILE, load_training_set, save_training_set

logger = logging.get_logger(__name__)

TASK = "turnover-influence"
DEFAULT_METHOD = "linear"  # method="centered" / "exact" (the paper) are a call argument away
CUSTOM_PIPELINE = {
    "impl": "pipeline_turnover.InfluencePipeline",
    "pt": ("AutoModelForSequenceClassification",),
    "tf": (),
    "type": "text",
}


class InfluencePipeline(Pipeline):
    """Explains predictions of a turn-over text classifier by its most helpful and most harmful training
    instances.

    Call with a text or a list of texts. Options (at construction or per call): ``top_k`` (instances per
    side, default 5), ``restrict_to_label`` (``True``: only training instances carrying the predicted label,
    i.e. for a wrong prediction the paper's "influential instances with the error label"; or a label id or
    name), ``batch_size`` (training instances per forward pass; default: sized to the input and device),
    ``max_length`` (tokens; longer texts are truncated and the output says ``"truncated": True``),
    ``method``: ``"linear"``, the default: first order in the masks, one forward and backward pass per text and a
    product with the training set's cached mask bits, a few milliseconds against thousands of instances;
    ``"centered"``: linear with the training set's typical gradient taken out of each text's (see
    :mod:`hf_turnover.linear`; the reference gradient travels with a saved pipeline), which keeps instances whose
    masks happen to help every prediction off the lists; ``"exact"``: own and flipped forward passes for every
    instance, the paper's estimate, about 2N forwards of the masked layers per text.
    Construction takes ``train_dataset`` when no training set travels with the model.

    Each output: ``{"prediction": {"label", "score"}, "helpful": [...], "harmful": [...], "truncated",
    "restricted_to_label"}``, each instance ``{"id", "text", "label", "score"}``. Empty strings and
    non-text inputs raise ``ValueError`` / ``TypeError`` naming the input; an empty list gives ``[]``.
    """

    _load_tokenizer = None  # optional: adapter-only checkpoints take the tokenizer of their backbone
    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False

    def __init__(self, *args: Any, train_dataset: datasets.Dataset | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # None: chunks sized to the input and device (see TurnoverScorer)
        self.scoring_batch_size = _positive_int("batch_size", self._batch_size) if self._batch_size else None
        self._batch_size = None  # inputs are explained one by one; batch_size means training instances
        self._scorers: dict[tuple[str, int | None], TurnoverScorer] = {}
        self._reference: dict[str, torch.Tensor] | None = None
        if self.tokenizer is None:
            self.tokenizer = _backbone_tokenizer(self.model)
        recorded = recorded_fingerprint(self.model)
        if train_dataset is not None:
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
        top_k=None,
        restrict_to_label=None,
        scoring_batch_size=None,
        max_length=None,
        method=None,
        **kwargs,
    ) -> tuple[dict, dict, dict]:
        if kwargs:
            raise TypeError(
                f"Unknown option(s) {sorted(kwargs)}; use top_k, restrict_to_label, batch_size, max_length, method."
            )
        preprocess = {"max_length": _positive_int("max_length", max_length)} if max_length is not None else {}
        forward = {}
        if top_k is not None:
            forward["top_k"] = _positive_int("top_k", top_k)
        if restrict_to_label is not None:
            forward["restrict_to_label"] = self._label_id(restrict_to_label)
        if scoring_batch_size is not None:
            forward["batch_size"] = _positive_int("batch_size", scoring_batch_size)
        if method is not None:
            forward["method"] = check_method(method)
        return preprocess, forward, {}

    def __call__(self, inputs: str | list[str], **kwargs: Any) -> dict | list[dict]:
        """Explain one text (returns a dict) or each text of a list (returns a list of dicts)."""
        texts = [inputs] if isinstance(inputs, str) else inputs
        if not isinstance(texts, (list, tuple)):
            raise TypeError(
                f"InfluencePipeline takes a text or a list of texts, got {type(inputs).__name__}: {inputs!r:.80}."
            )
        for index, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"Input {index} is a {type(text).__name__} ({text!r:.80}), not a text.")
            if not text.strip():
                raise ValueError(f"Input {index} is an empty string: there is no prediction to explain.")
        # Pipeline.__call__ would batch the inputs with batch_size; here it counts training instances.
        if "batch_size" in kwargs:
            kwargs["scoring_batch_size"] = kwargs.pop("batch_size")
        preprocess, forward, _ = self._sanitize_parameters(**kwargs)
        forward = {**self._forward_params, **forward}
        if forward.get("method", DEFAULT_METHOD) != "exact" and len(texts) > 1:
            return self._explain_linear_batch(list(texts), {**self._preprocess_params, **preprocess}, forward)
        outputs = super().__call__(list(texts), batch_size=1, **kwargs)
        return outputs[0] if isinstance(inputs, str) else outputs

    def _explain_linear_batch(self, texts: list[str], preprocess: dict, forward: dict) -> list[dict]:
        """A list of texts with ``method="linear"`` or ``"centered"``: padded batches share one forward and
        backward pass and one product with the mask table (see :func:`~hf_turnover.explain.explain_predictions`)."""
        method = forward.get("method", DEFAULT_METHOD)
        prepared = [self.preprocess(text, **preprocess) for text in texts]
        targets = [{k: v[0].tolist() for k, v in p["inputs"].items()} for p in prepared]
        restrict = forward.get("restrict_to_label")
        explanations = explain_predictions(
            self.model, self.train_dataset, targets, top_k=forward.get("top_k", 5), restrict_to_label=restrict,
            check_fingerprint=False, scorer=self._scorer(method, forward.get("batch_size") or self.scoring_batch_size),
        )  # fmt: skip
        return [
            self.postprocess({**e, "truncated": p["truncated"], "restricted": restrict})
            for e, p in zip(explanations, prepared, strict=True)
        ]

    def preprocess(self, text: str, max_length: int | None = None) -> dict[str, Any]:
        limit = max_length or _max_length(self.model, self.tokenizer)
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
        if truncated:
            logger.warning(
                f"Input longer than {limit} tokens truncated to {limit}: only its beginning is explained."
            )
        return {"inputs": {k: torch.tensor([v]) for k, v in encoded.items()}, "truncated": truncated}

    def _forward(
        self,
        model_inputs: dict[str, Any],
        top_k: int = 5,
        restrict_to_label=None,
        batch_size=None,
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
            progress=False,
            scorer=self._scorer(method, batch_size or self.scoring_batch_size),
        )
        return {**explanation, "truncated": model_inputs["truncated"], "restricted": restrict_to_label}

    def _scorer(self, method: str, batch_size: int | None) -> TurnoverScorer:
        """One scorer per (method, batch size), kept across calls: the model is probed once and the linear
        scorers keep the training set's mask table (one for every batch size: they run no id batches)."""
        key = (method, batch_size if method == "exact" else None)
        if key not in self._scorers:
            reference = self.centered_reference() if method == "centered" else None
            self._scorers[key] = make_scorer(self.model, method, reference, batch_size=batch_size)
        return self._scorers[key]

    def centered_reference(self) -> dict[str, torch.Tensor]:
        """The reference gradient of ``method="centered"``: read from the model's folder or repo
        (``turnover_reference.safetensors``), else computed once from the training set
        (:func:`~hf_turnover.explain.training_reference`, a few seconds) and written by ``save_pretrained``."""
        if self._reference is None:
            self._reference = _load_reference(self.model)
        if self._reference is None:
            logger.info("Computing the centered method's reference gradient from the training set.")
            self._reference = training_reference(
                self.model,
                self.tokenizer,
                self.train_dataset,
                max_length=_max_length(self.model, self.tokenizer),
            )
        return self._reference

    def set_centered_reference(self, reference: dict[str, torch.Tensor]) -> None:
        """Use ``reference`` (e.g. computed by a training script) for ``method="centered"`` and when saving."""
        self._reference = {
            name: torch.as_tensor(g, dtype=torch.float32).cpu() for name, g in reference.items()
        }
        self._scorers = {k: v for k, v in self._scorers.items() if k[0] != "centered"}

    def postprocess(self, outputs: dict[str, Any]) -> dict[str, Any]:
        name = self._label_name
        prediction = outputs["prediction"]
        restricted = outputs["restricted"]
        if restricted is True:
            restricted = prediction["label"]

        def instance(item: dict[str, Any]) -> dict[str, Any]:
            return {
                "id": item["train_id"],
                "text": item["text"],
                "label": name(item["label"]),
                "score": item["score"],
            }

        return {
            "prediction": {"label": name(prediction["label"]), "score": prediction["score"]},
            "helpful": [instance(item) for item in outputs["helpful"]],
            "harmful": [instance(item) for item in outputs["harmful"]],
            "truncated": outputs["truncated"],
            "restricted_to_label": None if restricted is None else name(restricted),
        }

    def _label_name(self, label: Any) -> Any:
        return self.model.config.id2label.get(int(label), label) if label is not None else None

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
            if card is not None:
                (tmp / "README.md").write_text(card, encoding="utf-8")
            else:
                _copy_card(self.model, tmp)


def _fingerprint(pipe: InfluencePipeline) -> dict[str, Any]:
    """For models trained without TurnoverTrainer: the fingerprint of the training set attached now."""
    return training_fingerprint(pipe.train_dataset, pipe.model.turnover_config.id_column)


def _load_reference(model: Any) -> dict[str, torch.Tensor] | None:
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


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")
    return value


def _max_length(model: Any, tokenizer: Any) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or 512
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if tokenizer_limit and tokenizer_limit < 1_000_000:  # "no limit" is a huge sentinel value
        limit = min(limit, tokenizer_limit)
    return limit


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
