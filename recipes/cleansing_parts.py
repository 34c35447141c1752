"""The data of `recipes/cleansing.py`: the splits, their model inputs (sentence embeddings or the cached output of
the layers below the adapters), the rows of the centered reference, and the sets with rows removed."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from cleansing_peers import PEERS
from common import default_backbone
from frozen_layers import (
    PadStates,
    bottom_layer_states,
    cached,
    length_sorted_batches,
    with_states,
)
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    default_data_collator,
)

from hf_turnover.data import load_text_classification
from hf_turnover.explain import reference_rows


@dataclass
class CleansingArguments:
    setup: str = field(
        default="adapters",
        metadata={
            "help": "'adapters' (fine-tuned top-layer adapters) or 'frozen' (an MLP on sentence embeddings)."
        },
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Encoder path or Hub id; default: the offline all-MiniLM-L6-v2."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Training set: bundled name or Hub id (default bundled rotten_tomatoes)."},
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Hub config, e.g. sst2 for glue."}
    )
    target_dataset_name: str = field(
        default="amazon_electronics",
        metadata={"help": "Target domain with validation (influence targets) and test splits."},
    )
    text_column: str = field(default="sentence", metadata={"help": "Text column of both datasets."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training rows."})
    max_validation_samples: int | None = field(default=None, metadata={"help": "Use the first N targets."})
    max_test_samples: int | None = field(default=None, metadata={"help": "Use the first N test rows."})
    max_length: int = field(default=128, metadata={"help": "Tokens per sentence (longer are truncated)."})
    remove_fraction: float = field(default=0.01, metadata={"help": "Fraction of training rows to remove."})
    num_seeds: int = field(default=4, metadata={"help": "Retraining seeds per condition: seed, seed+1, ..."})
    peers: str = field(
        default=",".join(PEERS),
        metadata={"help": f"Comma-separated peer rankings to retrain with, of {PEERS} ('' for none)."},
    )
    adapter_layers: int = field(
        default=3,
        metadata={
            "help": "Adapters setup: seq_bn adapters in the top N layers; the layers below are cached."
        },
    )
    adapter_width: int = field(
        default=1536,
        metadata={"help": "Adapters setup: units of the top layer's adapter (the wide masked layer)."},
    )
    lower_adapter_width: int = field(
        default=384, metadata={"help": "Adapters setup: units of each adapter below the top layer."}
    )
    turnover_top_layers: int | None = field(
        default=None,
        metadata={"help": "Adapters setup: mask the adapters of the top N layers (default: every adapter)."},
    )
    turnover_model: str | None = field(
        default=None,
        metadata={
            "help": "Adapters setup: score with this trained turn-over model (a path, or 'default' for the "
            "embedded default) instead of training one; it must have been trained on this training set with these "
            "ids, on the --model_name_or_path backbone, its adapters within the top --adapter_layers layers (2 "
            "for the default)."
        },
    )
    hidden_size: int = field(
        default=1536, metadata={"help": "Frozen setup: MLP hidden units, the masked units."}
    )
    hidden_dropout: float = field(
        default=0.1, metadata={"help": "Frozen setup: ordinary dropout of the retrained MLPs."}
    )
    influence_method: str = field(
        default="linear",
        metadata={"help": "Mean influence: 'linear' (first order in the masks) or 'exact' (the paper)."},
    )
    influence_batch_size: int | None = field(
        default=None, metadata={"help": "Training ids per scoring forward (default: sized to the input)."}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Cache of the frozen encoder's outputs (default: --output_dir/cache)."},
    )
    paired_batches: bool = field(
        default=True,
        metadata={
            "help": "Retrain every condition of a seed on the same minibatches, its removed sentences skipped in "
            "place (recipes/paired_retraining.py); false: each condition's set shuffled anew."
        },
    )
    centered: bool = field(
        default=True,
        metadata={
            "help": "Also rank by centered mean influence (method='centered', reference: 1,024 training "
            "sentences under their predicted labels), retrained as one more condition."
        },
    )
    pooled: bool = field(
        default=False,
        metadata={
            "help": "Also rank by pooled mean influence (method='pooled': groups by label and the top principal "
            "components of the classifier's input over every training row; see hf_turnover.pooled)."
        },
    )

    def __post_init__(self) -> None:
        if self.setup not in ("frozen", "adapters"):
            raise ValueError(f"--setup {self.setup!r} is unknown; use 'adapters' or 'frozen'.")
        if self.turnover_model and self.setup != "adapters":
            raise ValueError(
                f"--turnover_model {self.turnover_model} needs --setup adapters (a trained adapter model), got "
                f"--setup {self.setup}."
            )
        if not 0.0 < self.remove_fraction < 1.0:
            raise ValueError(f"--remove_fraction must lie in (0, 1), got {self.remove_fraction}.")
        if self.num_seeds < 1:
            raise ValueError(f"--num_seeds must be >= 1, got {self.num_seeds}.")
        self.peer_list = [p for p in self.peers.split(",") if p]
        unknown = set(self.peer_list) - set(PEERS)
        if unknown:
            raise ValueError(f"--peers {sorted(unknown)} unknown; choose from {PEERS}.")


@dataclass
class PreparedData:
    train: datasets.Dataset
    validation: datasets.Dataset
    test: datasets.Dataset
    collator: object
    model_path: str
    input_size: int = 0
    cached_layers: int = 0  # adapters setup: the bottom layers whose output the splits hold


@torch.inference_mode()
def encode(model_path: str, sentences: list[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings ``(N, D)``, as all-MiniLM-L6-v2 was trained to give."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoder = AutoModel.from_pretrained(model_path).eval()
    out = np.empty((len(sentences), encoder.config.hidden_size), dtype=np.float32)
    for rows, batch in length_sorted_batches(
        tokenizer, sentences, max_length, batch_size, "Encoding sentences"
    ):
        hidden = encoder(**batch).last_hidden_state  # (B, T, D)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        out[rows] = F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1).numpy()
    return out


def encode_splits(args: Any, splits: dict[str, datasets.Dataset], output: Path) -> PreparedData:
    """Model inputs for every split: sentence embeddings (frozen setup) or the cached output of the layers below
    the adapters (adapters setup)."""
    path = args.model_name_or_path or default_backbone()
    cache_dir = Path(args.cache_dir) if args.cache_dir else output / "cache"
    if args.setup == "frozen":
        feature = datasets.List(datasets.Value("float32"))
        for name, split in splits.items():
            sentences = list(split[args.text_column])
            compute = lambda sentences=sentences: (encode(path, sentences, args.max_length),)  # noqa: E731
            (embeddings,) = cached(compute, cache_dir, "embeddings", path, args.max_length, sentences)
            splits[name] = split.add_column("sentence_embedding", list(embeddings), feature=feature)
        return PreparedData(
            **splits, collator=default_data_collator, model_path=path, input_size=embeddings.shape[1]
        )
    below = AutoConfig.from_pretrained(path).num_hidden_layers - args.adapter_layers
    for name, split in splits.items():
        sentences = list(split[args.text_column])
        compute = partial(bottom_layer_states, path, sentences, args.max_length, below)
        states, offsets = cached(compute, cache_dir, "states", path, args.max_length, below, sentences)
        splits[name] = with_states(split, states, offsets)
    return PreparedData(**splits, collator=PadStates(), model_path=path, cached_layers=below)


def load_splits(args: Any) -> dict[str, datasets.Dataset]:
    """Training sentences and the target domain's validation/test sentences, truncated by the max_* flags."""
    train = load_text_classification(args.dataset_name, args.dataset_config_name)["train"]
    target = load_text_classification(args.target_dataset_name)
    splits = {"train": train, "validation": target["validation"], "test": target["test"]}
    limits = {"train": args.max_train_samples, "validation": args.max_validation_samples}
    limits["test"] = args.max_test_samples
    for name, limit in limits.items():
        if limit is not None:
            splits[name] = splits[name].select(range(min(limit, len(splits[name]))))
    # Ids are the row positions of the training set as used here (after --max_train_samples).
    train = splits["train"]
    if "instance_id" in train.column_names:
        train = train.remove_columns("instance_id")
    splits["train"] = train.add_column("instance_id", list(range(len(train))))
    return splits


def reference_batches(train: datasets.Dataset, collator: Any, batch_size: int = 64, rows=None):
    """Model inputs (no labels) of the training rows the library averages into the centered method's reference
    (:func:`hf_turnover.explain.reference_rows`), or of ``rows`` (positions, in order)."""
    rows = reference_rows(len(train)) if rows is None else rows
    columns = [c for c in ("inputs_embeds", "sentence_embedding", "label") if c in train.column_names]
    train = train.select_columns(columns)
    for start in range(0, len(rows), batch_size):
        batch = collator([train[int(row)] for row in rows[start : start + batch_size]])
        yield {k: v for k, v in batch.items() if k not in ("labels", "label")}


def without_rows(train: datasets.Dataset, rows: list[int]) -> datasets.Dataset:
    """``train`` without the rows at positions ``rows``."""
    skipped = set(rows)
    return train.select([row for row in range(len(train)) if row not in skipped])
