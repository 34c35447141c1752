"""A tiny trained Hub-ready turn-over model, its tokenizer and training set; and fresh-process helpers.

Everything is built in the test (a word-level vocabulary, a 2-layer BERT), nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import torch
from conftest import PINNED, TINY_BERT, add_task_adapter, tiny_training_args
from transformers import BertTokenizerFast, DataCollatorWithPadding

from hf_turnover import TurnoverConfig, TurnoverTrainer, add_turnover
from hf_turnover.hub import save_turnover_model
from hf_turnover.modeling_turnover import TurnoverBertConfig, TurnoverBertForSequenceClassification

WORDS = [f"w{i}" for i in range(40)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LABELS = {0: "negative", 1: "positive"}

# Makes `import hf_turnover` fail in a fresh process, to prove the saved model needs only its remote code.
BLOCK_HF_TURNOVER = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "hf_turnover" or name.startswith("hf_turnover."):
            raise ImportError(f"hf_turnover is blocked in this process ({name})")
sys.meta_path.insert(0, _Block())
"""


def make_tokenizer(directory: Path) -> BertTokenizerFast:
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + WORDS) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab), model_max_length=32)


def make_texts(n: int, seed: int) -> datasets.Dataset:
    """Sentences of 3-8 words; the label is 1 when w1..w9 outnumber w10..w19 (learnable, not trivial)."""
    g = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for _ in range(n):
        length = int(torch.randint(3, 9, (1,), generator=g))
        words = [WORDS[int(i)] for i in torch.randint(0, 20, (length,), generator=g)]
        texts.append(" ".join(words))
        labels.append(
            int(sum(1 for w in words if 1 <= int(w[1:]) <= 9) > sum(1 for w in words if int(w[1:]) >= 10))
        )
    return datasets.Dataset.from_dict({"sentence": texts, "label": labels})


def make_model(
    turnover: TurnoverConfig | None = None, seed: int = 0, adapter_config=None
) -> TurnoverBertForSequenceClassification:
    """``adapter_config``: an ``adapters`` config or a function of the model config (default Houlsby)."""
    torch.manual_seed(seed)
    config = TurnoverBertConfig(
        vocab_size=len(SPECIAL) + len(WORDS), max_position_embeddings=32, id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()}, **TINY_BERT,
    )  # fmt: skip
    model = TurnoverBertForSequenceClassification(config)
    if callable(adapter_config):
        adapter_config = adapter_config(config)
    add_task_adapter(model, adapter_config or "double_seq_bn")
    model.config.turnover_active_adapters = ["task"]
    return add_turnover(model, turnover or TurnoverConfig())


def make_trained(tmp_path: Path, n: int = 24, adapter_config=None, turnover: TurnoverConfig | None = None):
    """(model, tokenizer, train) after one short TurnoverTrainer run (which records the fingerprint)."""
    tokenizer = make_tokenizer(tmp_path / "tokenizer")
    train = make_texts(n, seed=1).map(lambda row, i: {"instance_id": 1000 + i}, with_indices=True)
    tokenized = train.map(lambda row: tokenizer(row["sentence"]))
    model = make_model(turnover, adapter_config=adapter_config)
    args = tiny_training_args(tmp_path / "trainer", per_device_train_batch_size=8)
    collator = DataCollatorWithPadding(tokenizer)
    TurnoverTrainer(model, args, train_dataset=tokenized, data_collator=collator).train()
    model.eval()
    return model, tokenizer, train


def make_saved(tmp_path: Path, card: dict | None = None, **kwargs):
    """:func:`make_trained` (``kwargs`` go to it), saved Hub-ready with its card to ``tmp_path / "model"``:
    (model, tokenizer, train)."""
    model, tokenizer, train = make_trained(tmp_path, **kwargs)
    save_turnover_model(model, tmp_path / "model", tokenizer=tokenizer, train_dataset=train, card=card)
    return model, tokenizer, train


def fresh_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a fresh process: no PYTHONPATH, its own HF cache (and dynamic-module cache), offline."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(
        HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false"
    )
    env.update(PINNED, **(extra or {}))
    return env


def run_fresh(script: str, cwd: Path, env: dict[str, str], *args: str, block: bool = True) -> dict:
    """Run ``script`` in a fresh Python process (hf_turnover blocked) and return the JSON it prints last."""
    code = (BLOCK_HF_TURNOVER if block else "") + script
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
