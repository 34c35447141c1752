"""hf_turnover: training-data influence by turn-over dropout (Kobayashi et al., 2020) for Hugging Face models."""

from .config import TurnoverArguments, TurnoverConfig
from .context import turnover_context
from .curves import LearningCurveCallback
from .evaluation import load_faithfulness_metric, random_half_subsets, score_matrix
from .explain import explain_prediction, explain_predictions, training_pooled_basis
from .fingerprint import training_fingerprint
from .hub import push_turnover_model, register_with_transformers, save_turnover_model
from .influence import estimate_influence, mean_influence, self_influence
from .linear import LinearScorer
from .lora import ADAPTERS_LORA_MODULES, PEFT_HEAD_MODULES, PEFT_LORA_MODULES
from .model import add_turnover, get_turnover_config, load_turnover, remove_turnover, turnover_layers
from .modeling_turnover import TurnoverBertConfig, TurnoverBertForSequenceClassification
from .pipeline_turnover import InfluencePipeline
from .plots import plot_learning_curves, plot_self_influence
from .pooled import PooledBasis, head_features, training_errors
from .results import combine_scores, load_scores, push_scores, save_scores, score_arguments
from .training_set import load_training_set
from .variants import average_scores, ensemble_influence
from .wide import wide_adapter_config

__version__ = "0.1.0"

# transformers.Trainer (and, where peft is installed, peft) costs about half a second to import: the trainer
# classes load on first use, so `import hf_turnover` for scoring and the pipeline does not pay for them.
_LAZY = {name: ".trainer" for name in ("TurnoverCollator", "TurnoverTrainer", "TurnoverTrainingArguments")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module 'hf_turnover' has no attribute {name!r}")


# `pipeline("turnover-influence")` and the Auto classes know turn-over models once hf_turnover is imported.
register_with_transformers()

__all__ = [
    "ADAPTERS_LORA_MODULES",
    "PEFT_HEAD_MODULES",
    "PEFT_LORA_MODULES",
    "InfluencePipeline",
    "LearningCurveCallback",
    "LinearScorer",
    "PooledBasis",
    "TurnoverArguments",
    "TurnoverBertConfig",
    "TurnoverBertForSequenceClassification",
    "TurnoverCollator",
    "TurnoverConfig",
    "TurnoverTrainer",
    "TurnoverTrainingArguments",
    "add_turnover",
    "average_scores",
    "ensemble_influence",
    "load_faithfulness_metric",
    "random_half_subsets",
    "score_matrix",
    "combine_scores",
    "estimate_influence",
    "explain_prediction",
    "explain_predictions",
    "head_features",
    "load_scores",
    "load_training_set",
    "mean_influence",
    "plot_learning_curves",
    "push_turnover_model",
    "save_turnover_model",
    "plot_self_influence",
    "push_scores",
    "save_scores",
    "score_arguments",
    "self_influence",
    "training_fingerprint",
    "training_errors",
    "training_pooled_basis",
    "get_turnover_config",
    "load_turnover",
    "remove_turnover",
    "turnover_context",
    "turnover_layers",
    "wide_adapter_config",
]
