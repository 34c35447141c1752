"""Model cards for turn-over models, from the template in ``model_cards/turnover_model_card.md``."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from .fingerprint import recorded_fingerprint
from .model import get_turnover_config, turnover_layers

# The template is edited in model_cards/ at the top of the source tree; resources/model_cards/ links to it, so
# wheels (which copy the linked file) and source checkouts both find it here.
TEMPLATE = Path(__file__).resolve().parent / "resources" / "model_cards" / "turnover_model_card.md"
PAPER_SIDE_EFFECT = "the paper reports 90.0 (dropout) vs 88.3 (turn-over) on SST-2 with 5,000 instances"


def model_card(
    model: nn.Module,
    *,
    repo_id: str | None = None,
    dataset_name: str | None = None,
    accuracy: float | None = None,
    baseline_accuracy: float | None = None,
    eval_split: str = "validation",
    base_model: str | None = None,
    command: str | None = None,
    faithfulness: dict | None = None,
    template_path: str | Path | None = None,
) -> ModelCard:
    """A `huggingface_hub.ModelCard` for a turn-over model: settings, training data and fingerprint, results.

    ``accuracy`` is the turn-over model's on ``eval_split``; ``baseline_accuracy`` that of the same set-up
    trained with ordinary dropout (the side effect of turn-over dropout), when measured. ``faithfulness``: what
    is known of how well its scores explain it, as measured by :func:`hf_turnover.evaluation.explanation_checks`
    (``num_queries``, ``top_k``, ``identical_class_rate``, ``distinct_top1``, ``distinct_top_k``) and ``method`` plus,
    optionally, ``lds`` (a list of ``{"setting", "value", "source"}`` rows from a retraining benchmark).
    """
    config = get_turnover_config(model)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no turn-over config; a turn-over card needs one.")
    template_path = template_path or TEMPLATE
    if not Path(template_path).is_file():
        raise FileNotFoundError(
            f"Model card template {template_path} is missing; it ships with hf_turnover "
            "(hf_turnover/resources/model_cards/). Reinstall hf_turnover or pass template_path=."
        )
    fingerprint = recorded_fingerprint(model) or {}
    base_model = base_model or _base_model(model)
    card_data = ModelCardData(
        language="en",
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag="text-classification",
        tags=["turnover-dropout", "training-data-influence", "adapters", "hf_turnover"],
        base_model=base_model
        if base_model and "/" in base_model and not base_model.startswith("/")
        else None,
        datasets=[dataset_name] if dataset_name and "/" in dataset_name else None,
        metrics=["accuracy"],
        model_name=repo_id or "turnover-model",
        eval_results=_eval_results(dataset_name, eval_split, accuracy),
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        model_title=repo_id or "Turn-over dropout text classifier",
        repo_id=repo_id or "path/to/this/model",
        base_model_text=f"`{base_model}`" if base_model else "unknown",
        adapter_text=_adapter_text(model),
        labels_text=", ".join(f"{i} = {name}" for i, name in sorted(model.config.id2label.items())),
        turnover=config,
        num_masked=len(turnover_layers(model)),
        dataset_text=f"Trained on `{dataset_name or 'an unnamed dataset'}`."
        + (f" Command: `{command}`." if command else ""),
        num_instances=fingerprint.get("num_instances", "unknown"),
        fingerprint_columns=", ".join(f"`{c}`" for c in fingerprint.get("columns", [])) or "unknown",
        fingerprint_sha256=fingerprint.get("sha256", "not recorded"),
        results_text=_results_text(accuracy, baseline_accuracy, eval_split),
        faithfulness_text=_faithfulness_text(faithfulness),
    )


def _base_model(model: nn.Module) -> str | None:
    base = getattr(model.config, "turnover_base_model", None) or {}  # adapter-only checkpoints record it
    return base.get("hub_id") or base.get("package")


def _adapter_text(model: nn.Module) -> str:
    config = getattr(model, "adapters_config", None)
    if config is None or not config.adapters:
        return "none"
    parts = []
    for name in config.adapters:
        settings = config.get(name)
        kind = type(settings).__name__
        factor = getattr(settings, "reduction_factor", None)
        leave_out = getattr(settings, "leave_out", None)
        parts.append(
            f"`{name}`: {kind} (reduction factor {factor}"
            + (f", no adapters in layers {list(leave_out)}" if leave_out else "")
            + ")"
        )
    heads = getattr(model.config, "turnover_heads", None)
    if heads:
        parts[-1] += (
            f" ({len(heads)} masked heads, one per adapter, each with its own classifier; the model is their mean)"
        )
    return "; ".join(parts)


def _eval_results(dataset_name: str | None, split: str, accuracy: float | None) -> list[EvalResult] | None:
    if accuracy is None:
        return None
    name = dataset_name or "unnamed"
    return [
        EvalResult(
            task_type="text-classification",
            dataset_type=name,
            dataset_name=name,
            dataset_split=split,
            metric_type="accuracy",
            metric_value=round(float(accuracy), 4),
        )
    ]


def _results_text(accuracy: float | None, baseline: float | None, split: str) -> str:
    if accuracy is None:
        return "Not evaluated."
    lines = [
        "| Training | Accuracy (" + split + ") |",
        "|---|---|",
        f"| turn-over dropout (this model) | {accuracy:.4f} |",
    ]
    if baseline is not None:
        lines.append(f"| same set-up, ordinary dropout (baseline) | {baseline:.4f} |")
        lines.append("")
        lines.append(
            f"Side effect of turn-over dropout: {100 * (accuracy - baseline):+.1f} accuracy points "
            f"({PAPER_SIDE_EFFECT})."
        )
    else:
        lines.append("")
        lines.append(f"No ordinary-dropout baseline was trained for this model ({PAPER_SIDE_EFFECT}).")
    return "\n".join(lines)


def _faithfulness_text(faithfulness: dict | None) -> str:
    if not faithfulness:
        return "Not measured for this model."
    f = faithfulness
    lines = [
        f"Measured on {f['num_queries']} held-out queries ({f.get('queries', 'validation sentences')}), "
        f"`method={f['method']!r}`, the top {f['top_k']} helpful training instances of each prediction:",
        "",
        "| Check | Value |",
        "|---|---|",
        f"| identical-class rate (the top helpful instance has the predicted label) | {f['identical_class_rate']:.2f} |",
        f"| distinct training instances among the top-1 lists | {f['distinct_top1']} of {f['num_queries']} |",
        f"| distinct training instances among the top-{f['top_k']} lists | {f['distinct_top_k']} of "
        f"{f['num_queries'] * f['top_k']} |",
    ]
    return "\n".join(lines) + lds_text(f.get("lds") or [])


def lds_text(lds: list[dict]) -> str:
    """Markdown for LDS rows ``{"setting", "value", "source"}`` (and ``"se"``, the standard error, if known; and
    ``"same_class"``, ``"agreement"``: the top-1 same-class rate and the seed agreement on mean influence)."""
    lines = []
    if lds:
        stability = any(key in row for row in lds for key in ("same_class", "agreement"))
        extra = " top-1 same class | seed agreement (mean influence) |" if stability else ""
        lines += [
            "",
            "Linear datamodeling score (Spearman correlation of summed scores with the losses of models "
            "retrained on random halves of the training set; 0 = random, 1 = perfect):",
            "",
            f"| Setting | LDS |{extra} Source |",
            "|---|---|" + ("---|---|" if stability else "") + "---|",
        ]
        for row in lds:
            value = f"{row['value']:.3f}" + (f" ± {row['se']:.3f}" if row.get("se") is not None else "")
            cells = [row["setting"], value]
            if stability:
                cells += [_cell(row.get("same_class"), ".2f"), _cell(row.get("agreement"), ".3f")]
            lines.append("| " + " | ".join([*cells, str(row["source"])]) + " |")
    return "\n".join(lines)


def _cell(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)
