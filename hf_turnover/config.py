"""`TurnoverConfig`: which layers get instance masks, and how the masks are drawn."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .masks import MASK_SCHEMES

FORMAT_VERSION = 1
CONFIG_KEY = "turnover"  # attribute of the model's PretrainedConfig, written into config.json


@dataclass
class TurnoverConfig:
    """Turn-over dropout settings. Saved in the model's ``config.json`` under ``"turnover"``.

    Loading a model with the same config re-creates bit-identical masks: the mask of instance ``i`` on layer
    ``name`` depends only on ``(seed, name, i)`` and ``p``/``scheme``.
    """

    p: float = field(
        default=0.5,
        metadata={"help": "Keep probability of a unit in an instance's own sub-network, in (0, 1)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the instance masks (any non-negative int)."})
    scheme: str = field(
        default="hash",
        metadata={
            "help": "'hash': one counter-based hash per (instance, unit). 'codebook': the paper's Appendix-D "
            "AND of codebook_k primitive masks out of codebook_size."
        },
    )
    codebook_size: int = field(default=64, metadata={"help": "Primitive masks in the codebook scheme."})
    codebook_k: int = field(default=4, metadata={"help": "Primitive masks AND-ed per instance (codebook)."})
    target_modules: str | list[str] | None = field(
        default=r".*\.adapters\.[^.]+\.adapter_down",
        metadata={
            "help": "Modules whose OUTPUT units are masked per instance (nn.Linear features, nn.Conv channels, "
            "bottleneck units of `adapters` adapters, the rank units of an `adapters` LoRA module: "
            "hf_turnover.ADAPTERS_LORA_MODULES, or of peft's lora_A: PEFT_LORA_MODULES). A regex (full match) or "
            "a list of names/suffixes."
        },
    )
    head_modules: str | list[str] | None = field(
        default="classifier",
        metadata={
            "help": "Modules whose INPUT units are masked: the hidden units that feed an output projection. "
            "A regex (full match) or a list of names/suffixes."
        },
    )
    exclude_modules: str | list[str] | None = field(
        default=None, metadata={"help": "Modules never masked, same syntax as target_modules."}
    )
    id_column: str = field(
        default="instance_id",
        metadata={"help": "Dataset column holding each training instance's integer id."},
    )
    format_version: int = field(
        default=FORMAT_VERSION, metadata={"help": "Format of this config (read-only)."}
    )

    def __post_init__(self) -> None:
        if not 0.0 < self.p < 1.0:
            raise ValueError(f"TurnoverConfig.p must lie in (0, 1), got p={self.p!r}.")
        if self.scheme not in MASK_SCHEMES:
            raise ValueError(f"TurnoverConfig.scheme={self.scheme!r} is unknown; use one of {MASK_SCHEMES}.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"TurnoverConfig.seed must be a non-negative int, got seed={self.seed!r}.")
        if self.scheme == "codebook" and not 1 <= self.codebook_k <= self.codebook_size:
            raise ValueError(
                f"codebook_k={self.codebook_k} must lie in [1, codebook_size={self.codebook_size}]."
            )
        if self.target_modules is None and self.head_modules is None:
            raise ValueError("Set target_modules and/or head_modules: with neither, nothing would be masked.")
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"This turn-over config has format_version={self.format_version}, but this hf_turnover reads "
                f"versions up to {FORMAT_VERSION}. Upgrade hf_turnover (pip install -U hf_turnover)."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TurnoverConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown and data.get("format_version", FORMAT_VERSION) <= FORMAT_VERSION:
            raise ValueError(f"Unknown TurnoverConfig keys {unknown}; known keys are {sorted(known)}.")
        return cls(**{k: v for k, v in data.items() if k in known})


def _option(name: str) -> Any:
    """A ``TurnoverConfig`` field's default and help, for :class:`TurnoverArguments`."""
    source = TurnoverConfig.__dataclass_fields__[name]
    return field(default=source.default, metadata={"help": source.metadata["help"]})


@dataclass
class TurnoverArguments:
    """``TurnoverConfig`` as command-line options for ``transformers.HfArgumentParser``.

    Every field carries a ``turnover_`` prefix (``--seed`` belongs to ``TrainingArguments``) and module patterns
    are regex strings (an empty string: none)::

        parser = HfArgumentParser((TurnoverArguments, TurnoverTrainingArguments))
        turnover_args, training_args = parser.parse_args_into_dataclasses()
        add_turnover(model, turnover_args.to_config())
    """

    turnover_p: float = _option("p")
    turnover_seed: int = _option("seed")
    turnover_scheme: str = _option("scheme")
    turnover_codebook_size: int = _option("codebook_size")
    turnover_codebook_k: int = _option("codebook_k")
    turnover_target_modules: str = _option("target_modules")
    turnover_head_modules: str = _option("head_modules")
    turnover_exclude_modules: str = field(
        default="", metadata={"help": TurnoverConfig.__dataclass_fields__["exclude_modules"].metadata["help"]}
    )
    turnover_id_column: str = _option("id_column")

    def to_config(self) -> TurnoverConfig:
        values = {f.name.removeprefix("turnover_"): getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("target_modules", "head_modules", "exclude_modules"):
            values[name] = values[name] or None
        return TurnoverConfig(**values)
