"""How reproducible are the cleansing rankings? Trains the turn-over model of `recipes/cleansing.py` again with
another training seed (same data, same masks) and compares its turn-over mean influence and gradient dot
product with those of a finished recipe run.

    python benchmarks/faithfulness/cleansing_reliability.py --run runs/cleansing --seed 43

Prints the Spearman correlation of each score between the two models and the overlap of their 1% most negative
sets (a random pair of 1% sets shares about 0.85 of 85 sentences).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "recipes"))
from cleansing import CleansingArguments, CleansingTrainingArguments, CleansingTurnoverArguments  # noqa: E402
from cleansing_model import build_classifier  # noqa: E402
from cleansing_parts import encode_splits, load_splits  # noqa: E402
from cleansing_peers import peer_scores  # noqa: E402
from common import train_model  # noqa: E402

from hf_turnover.influence import mean_influence  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", type=Path, default=Path("runs/cleansing"), help="A finished recipe run.")
    parser.add_argument("--seed", type=int, default=43, help="Training seed of the second model.")
    options = parser.parse_args()
    args, turnover_args = CleansingArguments(), CleansingTurnoverArguments()
    training_args = CleansingTrainingArguments(output_dir=str(options.run / "reliability"), seed=options.seed,
                                               data_seed=options.seed, disable_tqdm=True)  # fmt: skip
    data = encode_splits(args, load_splits(args), options.run)  # the run's cache
    build = partial(build_classifier, args, turnover_args, data)
    model = train_model(build, training_args, data.train, data_collator=data.collator).model
    second = pd.DataFrame({"train_id": data.train["instance_id"]})
    second["turnover"] = mean_influence(model, data.train, data.validation, method="linear")["score"]
    second["gradient_dot"] = peer_scores(model, data.train, data.validation, data.collator)["gradient_dot"]
    first = pd.read_parquet(options.run / "mean_influence.parquet").rename(columns={"score": "turnover"})
    first = first.merge(pd.read_parquet(options.run / "peer_scores.parquet"), on="train_id")
    both = first.merge(second, on="train_id", suffixes=("_first", "_second"))
    n = round(0.01 * len(both))
    for name in ("turnover", "gradient_dot"):
        a, b = both[f"{name}_first"], both[f"{name}_second"]
        overlap = len(
            set(both.train_id[np.argsort(a.to_numpy())[:n]])
            & set(both.train_id[np.argsort(b.to_numpy())[:n]])
        )
        print(f"{name}: Spearman {a.corr(b, method='spearman'):.3f} between seeds {options.seed} and the "
              f"run's; {overlap} of the {n} most negative shared")  # fmt: skip


if __name__ == "__main__":
    main()
