"""How the model's error on each training instance enters the groups of ``method="pooled"``: the variants compared
before the error became the basis's first component (``PooledBasis.from_features(errors=)``).

    python benchmarks/faithfulness/pooled_error_variants.py \
        --output_json benchmarks/faithfulness/results_pooled_error_variants/results.json

The 2-head default's set-up (``frontier.py``'s point ``width=1536,lower_width=384,epochs=1,lr=3e-3,
schedule=linear,heads=2``), models of seeds 0 and 1, test-split targets 0-99, 100-299 and 300-499, scored against
the retrained halves that ``results_frontier_heads``, ``results_frontier_heads_heldout`` and
``results_frontier_error_fresh`` saved (no retraining; the first two sets were looked at while choosing). Per
variant and target set: LDS, the paired LDS difference to the gradient dot product and to label match, the
identical-class rate on seed 0's predictions, and the agreement of seeds 0 and 1. With ``e_i = 1 - p(y_i)`` under
the trained model and ``PC`` the head input's standardised principal components:

* ``labels x PCs``: the groups before (16 components);
* ``labels x (e, PCs)``: ``e`` standardised as the first component, 15 PCs (what ``errors=`` does);
* ``labels x (e, PC_1, e PC_1, ...)``: ``e`` and its products with the PCs, 16 components;
* ``e x labels x PCs`` and ``sqrt(e) x labels x PCs``: every row of the design scaled (the trace proportional to
  the error).

About 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import _paths  # noqa: F401  (benchmarks/lib on sys.path)
import frontier as F
import numpy as np
import torch
from faithfulness_lib import minilm as M
from faithfulness_lib import minilm_top as top
from faithfulness_lib.minilm_top_grads import grad_dot
from minilm_top_lds import build, train_options
from transformers import HfArgumentParser

from hf_turnover.atomic import atomic_write_text
from hf_turnover.evaluation import random_half_subsets, seed_agreement
from hf_turnover.pooled import PooledBasis, training_errors

HERE = Path(__file__).resolve().parent
POINT = "width=1536,lower_width=384,epochs=1,lr=3e-3,schedule=linear,heads=2"
TARGET_SETS = {"targets 0-99": ("results_frontier_heads", 1, slice(0, 100)),
               "targets 100-299": ("results_frontier_heads_heldout", 0, slice(100, 300)),
               "targets 300-499": ("results_frontier_error_fresh", 0, slice(300, 500))}  # fmt: skip


@dataclass
class VariantArguments:
    output_json: str = field(default="benchmarks/faithfulness/results_pooled_error_variants/results.json")
    threads: int = field(default=2, metadata={"help": "torch threads."})


class ScaledBasis(PooledBasis):
    """A basis whose design rows are multiplied by ``weights`` (N,)."""

    weights: torch.Tensor

    def design(self, num_labels: int) -> torch.Tensor:
        return super().design(num_labels) * self.weights[:, None].double()


def standardised(x: torch.Tensor) -> torch.Tensor:
    return (x - x.mean()) / x.std()


def variants(ids: np.ndarray, y: torch.Tensor, features: torch.Tensor, errors: torch.Tensor) -> dict:
    plain = PooledBasis.from_features(ids, y, features)
    e = standardised(errors.double())
    products = [e]
    for j in range(plain.components.shape[1]):
        c = plain.components[:, j].double()
        products += [c, standardised(e * c)]
    out = {"labels x PCs": plain,
           "labels x (e, PCs)": PooledBasis.from_features(ids, y, features, errors=errors),
           "labels x (e, PC_1, e PC_1, ...)": PooledBasis(ids, y, torch.stack(products[:16], 1).float())}  # fmt: skip
    for name, w in (("e x labels x PCs", errors), ("sqrt(e) x labels x PCs", errors.sqrt())):
        scaled = ScaledBasis(ids, y, plain.components)
        scaled.weights = w.float()
        out[name] = scaled
    return out


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(VariantArguments).parse_args_into_dataclasses(argv)
    torch.set_num_threads(args.threads)
    frontier_args = F.FrontierArguments(num_targets=500, threads=args.threads, points=POINT)
    a = F.setup_arguments(frontier_args, F.parse_points(POINT)[0])
    below, data = F.load_frontier_data(frontier_args, a)
    (hidden, y), (hidden_t, y_t) = data["train"], data["targets"]
    n, yn, ytn = len(y), y.numpy(), y_t.numpy()
    members = random_half_subsets(n, 16, seed=1)
    scores, predicted, dot = {}, None, None
    for seed in (0, 1):
        model = build(a, seed)
        with top.cut_bottom(model, below):
            top.train_top(model, M.snapshot(model), hidden, y, **train_options(a, seed))
            features, train_logits = top.pooled_features(model, hidden, return_logits=True)
            bases = variants(np.arange(n), y, features, training_errors(train_logits, y))
            for name, basis in bases.items():
                scores.setdefault(name, []).append(F.label_scores(model, hidden_t, n, "pooled", basis=basis))
                print(f"seed {seed}: {name}", flush=True)
            if seed == 0:
                predicted = top.logits(model, hidden_t).argmax(-1)
                dot = grad_dot(model, hidden_t, {"true": y_t}, hidden, y)["true"]
    pred = predicted.numpy()
    results = {"command": "python benchmarks/faithfulness/pooled_error_variants.py " + " ".join(argv or sys.argv[1:]),
               "point": POINT, "num_train": n, "target_sets": {}}  # fmt: skip
    label_match = F.label_match_scores(yn, ytn)
    for target_set, (folder, index, rows) in TARGET_SETS.items():
        source = json.loads((HERE / folder / "results.json").read_text())
        losses = np.asarray(source["points"][index]["target_losses"])
        out = {"gradient dot product LDS": F.faithfulness(dot[rows], members, losses)["lds"]}
        for name, (s0, s1) in scores.items():
            first, second = F.pick(s0, ytn)[rows], F.pick(s1, ytn)[rows]
            out[name] = {**F.faithfulness(first, members, losses),
                         "minus gradient dot product": F.paired_difference(first, dot[rows], members, losses),
                         "minus label match": F.paired_difference(first, label_match[rows], members, losses),
                         **M.identical_class(F.pick(s0, pred)[rows], pred[rows], yn),
                         "agreement": seed_agreement(first, second, labels=yn)}  # fmt: skip
        results["target_sets"][target_set] = out
    path = Path(args.output_json)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=2))
    for target_set, out in results["target_sets"].items():
        print(f"{target_set}: gradient dot product LDS {out['gradient dot product LDS']:.3f}")
        for name, row in out.items():
            if isinstance(row, dict):
                d = row["minus gradient dot product"]
                print(f"  {name:32s} LDS {row['lds']:.3f}  minus grad dot {d['difference']:+.3f} ± "
                      f"{d['targets_se']:.3f} (± {d['halves_se']:.3f})  same class {row['helpful_same_class']:.2f}  "
                      f"mean influence {row['agreement']['mean_influence_spearman']:.3f}")  # fmt: skip
    return results


if __name__ == "__main__":
    main()
