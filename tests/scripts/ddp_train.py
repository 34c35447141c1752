"""Run by tests/test_distributed.py under `accelerate launch --cpu --num_processes 2`.

Each rank trains a tiny turn-over BERT, checks inside a hook that every row it sees is masked with that row's
own id, and writes the ids it saw to OUT/rank{N}.json.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for conftest helpers

from conftest import make_tiny_bert, make_token_dataset, tiny_training_args  # noqa: E402
from test_trainer import _spy, _train_ids  # noqa: E402

from hf_turnover import TurnoverTrainer  # noqa: E402


def main(out: Path) -> None:
    model = make_tiny_bert()
    calls = _spy(model)
    trainer = TurnoverTrainer(
        model,
        tiny_training_args(out / "run", per_device_train_batch_size=2),
        train_dataset=make_token_dataset(16),
    )
    trainer.train()
    rank = trainer.args.process_index
    payload = {"world_size": trainer.args.world_size, "ids": _train_ids(calls)}
    (out / f"rank{rank}.json").write_text(json.dumps(payload))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
