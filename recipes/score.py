"""Score a saved or pushed turn-over model against its training set: pairwise, self or mean influence.

    accelerate launch recipes/score.py --sentences "A gorgeous, witty, seductive movie." --top_k 5

scores the embedded default model (all-MiniLM-L6-v2 + adapters, 8,454 Rotten Tomatoes sentences) offline.
Any model written by `save_turnover_model` / `push_turnover_model` (a folder or a Hub id) works:

    accelerate launch recipes/score.py --model_name_or_path outputs/sst2/model \
        --targets_dataset_name rotten_tomatoes --targets_split validation --top_k 10 --output_dir outputs/score
    accelerate launch --multi_gpu --num_processes 2 recipes/score.py --kind self_influence --output_dir outputs/self
    accelerate launch recipes/score.py --kind mean_influence --targets_split validation --method linear

The training set is the one that travels with the model (`training_set.json`), or `--train_dataset_name` (a
Hub dataset id, a folder written by `save_to_disk`, or a parquet/csv/json file) with the model's id column;
it is checked against the fingerprint the model recorded. Targets: `--sentences`, or a dataset and split
(`--targets_dataset_name`; without it, `--targets_split` names a split of the bundled Rotten Tomatoes data).

Under `accelerate launch --num_processes K` every process scores its shards of the training ids
(`--shard_size` ids each). The result goes to --output_dir (default `outputs/score`) as a dataset: `data/*.parquet`
(read it with `hf_turnover.scoring_run.load_run(output_dir)` or `datasets.load_dataset("parquet",
data_dir=...)`) and `arguments.json`. Finished shards are kept: an interrupted run started again resumes
without losing any, and a rerun of a finished run does no work. The scores equal those of
`hf_turnover.estimate_influence` / `self_influence` / `mean_influence` in one process (bit for bit on the CPU).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import AutoModelForSequenceClassification, HfArgumentParser

import hf_turnover  # noqa: F401  (registers the turn-over model classes with transformers)
from hf_turnover.default_model import DEFAULT_MODEL_DIR
from hf_turnover.distributed import process_state
from hf_turnover.explain import training_reference
from hf_turnover.fingerprint import recorded_fingerprint
from hf_turnover.pipeline_turnover import _backbone_tokenizer as backbone_tokenizer
from hf_turnover.pipeline_turnover import load_reference
from hf_turnover.scoring_run import KINDS, ScoringRun
from hf_turnover.training_set import load_training_set

logger = logging.getLogger(__name__)
BUNDLED = Path(hf_turnover.__file__).resolve().parent / "resources" / "data" / "rotten_tomatoes"
TEXT_COLUMNS = ("sentence", "text")


@dataclass
class ScoreArguments:
    model_name_or_path: str = field(
        default=str(DEFAULT_MODEL_DIR), metadata={"help": "A saved turn-over model folder or Hub id."}
    )
    kind: str = field(default="influence", metadata={"help": f"What to score: one of {KINDS}."})
    train_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "The training set (Hub id, save_to_disk folder or data file); default: the model's."
        },
    )
    train_split: str = field(default="train", metadata={"help": "Split of --train_dataset_name."})
    targets_dataset_name: str | None = field(
        default=None, metadata={"help": "Targets: a Hub id, save_to_disk folder or data file."}
    )
    targets_dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration."})
    targets_split: str = field(
        default="validation",
        metadata={
            "help": "Split of the targets (of the bundled Rotten Tomatoes data without a dataset name)."
        },
    )
    sentences: list[str] | None = field(
        default=None,
        metadata={"help": "Target sentences on the command line (their predicted label is explained)."},
    )
    text_column: str | None = field(
        default=None, metadata={"help": "Text column (default: sentence or text)."}
    )
    max_targets: int | None = field(default=None, metadata={"help": "Score the first N targets only."})
    method: str = field(
        default="linear",
        metadata={
            "help": "linear (first order, the default everywhere), centered (linear minus a reference gradient: "
            "the one saved beside the model, else computed from the training set) or exact (the paper)."
        },
    )
    variant: str = field(default="own", metadata={"help": "own (the paper) or full (its footnote 4)."})
    top_k: int | None = field(default=None, metadata={"help": "Keep the top and bottom k per target."})
    train_batch_size: int | None = field(
        default=None, metadata={"help": "Training ids per forward (default: sized to the input and device)."}
    )
    self_batch_size: int = field(default=64, metadata={"help": "Training rows per self-influence forward."})
    shard_size: int = field(
        default=4096, metadata={"help": "Training ids per shard (the unit of resumption)."}
    )
    max_length: int = field(default=128, metadata={"help": "Tokens per text; longer texts are truncated."})
    output_dir: str = field(default="outputs/score", metadata={"help": "Where the results go."})


def load_any(name: str, split: str | None, config: str | None = None) -> datasets.Dataset:
    """A dataset from a Hub id, a ``save_to_disk`` folder, or a parquet/csv/json(l) file."""
    path = Path(name)
    if path.is_dir() and (path / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(path))
    if path.is_file():
        builder = {".jsonl": "json"}.get(path.suffix, path.suffix.lstrip("."))
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    return datasets.load_dataset(name, config, split=split)


def load_targets(args: ScoreArguments) -> datasets.Dataset | None:
    if args.kind == "self_influence":
        return None
    if args.sentences:
        return datasets.Dataset.from_dict({"sentence": list(args.sentences)})
    if args.targets_dataset_name:
        targets = load_any(args.targets_dataset_name, args.targets_split, args.targets_dataset_config_name)
    else:
        targets = datasets.Dataset.from_parquet(str(BUNDLED / f"{args.targets_split}.parquet"))
    return targets.select(range(min(args.max_targets, len(targets)))) if args.max_targets else targets


def tokenize(dataset: datasets.Dataset, tokenizer, args: ScoreArguments) -> datasets.Dataset:
    column = args.text_column or next((c for c in TEXT_COLUMNS if c in dataset.column_names), None)
    if column is None:
        raise ValueError(f"No text column in {dataset.column_names}: pass --text_column.")
    return dataset.map(
        lambda row: tokenizer(row[column], truncation=True, max_length=args.max_length),
        desc="Tokenizing",
    )


def main(argv: list[str] | None = None) -> ScoringRun:
    (args,) = HfArgumentParser(ScoreArguments).parse_args_into_dataclasses(args=argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    state = process_state()
    device = (
        state.device if state is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    model = AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path).to(device).eval()
    tokenizer = backbone_tokenizer(model)  # beside the model, else (adapter-only) its backbone's
    if args.train_dataset_name:
        train = load_any(args.train_dataset_name, args.train_split)
    else:
        train = load_training_set(args.model_name_or_path, recorded_fingerprint(model))
    if args.kind == "self_influence":
        train = tokenize(train, tokenizer, args)
    targets = load_targets(args)
    if targets is not None:
        targets = tokenize(targets, tokenizer, args)
    reference = None
    if args.method == "centered":  # the reference shipped with the model, else one from the training set
        reference = load_reference(model) or training_reference(
            model, tokenizer, train, max_length=args.max_length
        )
    started = time.time()
    run = ScoringRun(
        args.output_dir, model, train, targets, kind=args.kind, top_k=args.top_k, shard_size=args.shard_size,
        self_batch_size=args.self_batch_size, method=args.method, variant=args.variant,
        train_batch_size=args.train_batch_size, reference=reference,
    )  # fmt: skip
    run.run(state)
    if state is None or state.is_main_process:
        processes = state.num_processes if state is not None else 1
        logger.info(
            f"{args.kind} of {len(run.ids)} training ids by {processes} process(es) in "
            f"{time.time() - started:.1f} s: {args.output_dir}"
        )


if __name__ == "__main__":
    main()
