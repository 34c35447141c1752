"""hf_turnover: training-data influence by turn-over dropout (Kobayashi et al., 2020) for Hugging Face models."""

from .config import TurnoverConfig
from .context import turnover_context
from .fingerprint import training_fingerprint
from .influence import estimate_influence, mean_influence, self_influence
from .model import add_turnover, get_turnover_config, load_turnover, remove_turnover, turnover_layers
from .results import combine_scores, load_scores, push_scores, save_scores, score_arguments
from .trainer import TurnoverCollator, TurnoverTrainer, TurnoverTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "TurnoverCollator",
    "TurnoverConfig",
    "TurnoverTrainer",
    "TurnoverTrainingArguments",
    "add_turnover",
    "combine_scores",
    "estimate_influence",
    "load_scores",
    "mean_influence",
    "push_scores",
    "save_scores",
    "score_arguments",
    "self_influence",
    "training_fingerprint",
    "get_turnover_config",
    "load_turnover",
    "remove_turnover",
    "turnover_context",
    "turnover_layers",
]
