"""hf_turnover: training-data influence by turn-over dropout (Kobayashi et al., 2020) for Hugging Face models."""

from .config import TurnoverConfig
from .context import turnover_context
from .model import add_turnover, get_turnover_config, load_turnover, remove_turnover, turnover_layers
from .trainer import TurnoverCollator, TurnoverTrainer, TurnoverTrainingArguments

__version__ = "0.1.0"

__all__ = [
    "TurnoverCollator",
    "TurnoverConfig",
    "TurnoverTrainer",
    "TurnoverTrainingArguments",
    "add_turnover",
    "get_turnover_config",
    "load_turnover",
    "remove_turnover",
    "turnover_context",
    "turnover_layers",
]
