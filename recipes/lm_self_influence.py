"""Self-influence of every training token of a feed-forward n-gram language model (Kobayashi et al. 2020,
Appendix A and Figure 6).

    python recipes/lm_self_influence.py --output_dir runs/lm_self_influence

The model is Bengio et al. (2003)'s: the embeddings of the previous n-1 words, concatenated, a tanh hidden
layer (or several) and a softmax over the vocabulary. Turn-over dropout masks the hidden units (the inputs of
every layer after the first hidden one). Each training instance is one (context -> next word) pair with its
own id, so its self-influence ``I(z, z) = L(flipped sub-network, z) - L(own sub-network, z)`` says how much the
model fits that word only through having trained on it: high for rare and unpredictable words.

Data: the bundled movie sentences (Rotten Tomatoes train; validation split for perplexity), or a Hub corpus
with a network, e.g. `--dataset_name wikitext --dataset_config_name wikitext-2-raw-v1` (one line = one text).

Writes `self_influence.html` (every token colored by the self-influence of the instance predicting it),
`self_influence.png` (the first sentences, for the README), `top_self_influence.md`/`.json` (the instances and
words with the highest self-influence), `self_influence.parquet`, `results.json` and the turn-over model
(`model/`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
from common import RecipeTrainingArguments, parse_arguments, push_outputs, train_model, write_json
from lm_self_influence_parts import (
    NGramLM,
    NGramLMConfig,
    build_vocabulary,
    instances,
    load_texts,
    perplexity,
    write_reports,
)

from hf_turnover.config import TurnoverArguments
from hf_turnover.influence import self_influence
from hf_turnover.model import add_turnover, get_turnover_config
from hf_turnover.results import save_scores


@dataclass
class LMArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Bundled name or Hub id of the corpus (default: bundled rotten_tomatoes)."},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "e.g. wikitext-2-raw-v1."})
    text_column: str | None = field(default=None, metadata={"help": "Text column ('sentence' or 'text')."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N training texts."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use the first N validation texts."})
    context_size: int = field(
        default=3, metadata={"help": "Words of context n-1 (a 4-gram model by default)."}
    )
    min_word_frequency: int = field(default=2, metadata={"help": "Rarer training words become <unk>."})
    embedding_size: int = field(default=64, metadata={"help": "Word embedding size."})
    hidden_size: int = field(default=256, metadata={"help": "Units per hidden layer."})
    num_hidden_layers: int = field(default=1, metadata={"help": "Hidden layers (all masked)."})
    num_rendered_texts: int = field(default=60, metadata={"help": "Training texts colored in the HTML."})
    num_top: int = field(default=40, metadata={"help": "Rows of the top self-influence lists."})


@dataclass
class LMTurnoverArguments(TurnoverArguments):
    turnover_target_modules: str = field(
        default="", metadata={"help": "Modules whose output units are masked."}
    )
    turnover_head_modules: str | None = field(
        default=None,
        metadata={
            "help": "Modules whose input units are masked (regex, full match). Default: the hidden units after "
            "their tanh, i.e. the inputs of every later hidden layer and of lm_head."
        },
    )


@dataclass
class LMTrainingArguments(RecipeTrainingArguments):
    output_dir: str = field(default="runs/lm_self_influence", metadata={"help": "Where the results go."})
    num_train_epochs: float = field(default=3.0, metadata={"help": "Training epochs."})
    per_device_train_batch_size: int = field(default=256, metadata={"help": "Training batch size."})
    per_device_eval_batch_size: int = field(default=1024, metadata={"help": "Evaluation batch size."})
    logging_steps: float = field(default=200, metadata={"help": "Log the training loss every N steps."})


def build_model(args: LMArguments, turnover_args: LMTurnoverArguments, vocab_size: int) -> NGramLM:
    config = NGramLMConfig(
        vocab_size, args.context_size, args.embedding_size, args.hidden_size, args.num_hidden_layers
    )
    if turnover_args.turnover_head_modules is None:
        masked = "|".join([*(rf"hidden\.{i}" for i in range(1, args.num_hidden_layers)), "lm_head"])
        turnover_args = replace(turnover_args, turnover_head_modules=masked)
    return add_turnover(NGramLM(config), turnover_args.to_config())


def main(argv: list[str] | None = None) -> dict:
    """Run the recipe; ``argv`` as on the command line (``None``: ``sys.argv[1:]``). Returns results.json."""
    args, turnover_args, training_args = parse_arguments(
        (LMArguments, LMTurnoverArguments, LMTrainingArguments), argv
    )
    started, output = time.time(), Path(training_args.output_dir)
    texts, validation_texts = load_texts(args)
    vocabulary = build_vocabulary(texts, args.min_word_frequency)
    index = {w: i for i, w in enumerate(vocabulary)}
    train = instances(texts, index, args.context_size)
    validation = instances(validation_texts, index, args.context_size)
    trainer = train_model(partial(build_model, args, turnover_args, len(vocabulary)), training_args, train)
    trainer.save_model(str(output / "model"))
    model = trainer.model
    scores = self_influence(model, train, batch_size=training_args.per_device_eval_batch_size)
    save_scores(scores, output / "self_influence.parquet")
    values = np.asarray(scores["score"])  # row i is instance i
    top = write_reports(args, output, texts, train, vocabulary, values)
    results = {
        "arguments": asdict(args),
        "turnover": get_turnover_config(model).to_dict(),
        "num_train_epochs": training_args.num_train_epochs,
        "seed": training_args.seed,
        "num_train_texts": len(texts),
        "num_train_instances": len(train),
        "vocabulary_size": len(vocabulary),
        "validation_perplexity": perplexity(model, validation),
        "train_perplexity": perplexity(model, train),
        "self_influence_mean": float(values.mean()),
        "spearman_frequency_vs_self_influence": top["spearman_frequency_vs_self_influence"],
        "runtime_s": round(time.time() - started, 1),
    }
    print(f"validation perplexity {results['validation_perplexity']:.1f}")
    print("highest mean self-influence words:", [r["word"] for r in top["top_words"][:10]])
    write_json(output / "results.json", results)
    push_outputs(output, training_args)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
