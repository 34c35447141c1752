"""TurnoverTrainer: ids travel through collators and column pruning into the masks."""

import pytest
import torch
from conftest import VOCAB, make_tiny_bert, make_token_dataset, tiny_training_args
from transformers import BertTokenizerFast, DataCollatorWithPadding, default_data_collator

from hf_turnover import TurnoverConfig, TurnoverTrainer
from hf_turnover.context import current_state
from hf_turnover.masks import keep_bits

SPY_LAYER = "bert.encoder.layer.0.output.adapters.task.adapter_down"


def _spy(model, name=SPY_LAYER):
    """Records (mode, ids) of every forward and checks each row's dropped units against its id's mask."""
    calls = []
    config = model.turnover_config

    def hook(module, args, out):
        state = current_state()
        if state is None:
            calls.append(("none", []))
            return
        calls.append((state.mode, state.ids.tolist()))
        if state.mode != "full":
            bits = keep_bits(state.ids, out.shape[-1], name, p=config.p, seed=config.seed)
            dropped = out.abs().amax(dim=1) == 0  # (B, d): unit zero at every position
            expected = ~bits if state.mode == "own" else bits
            assert torch.equal(dropped, expected), "rows were masked with the wrong ids"

    model.get_submodule(name).register_forward_hook(hook)
    return calls


def _train_ids(calls):
    return sorted(i for mode, ids in calls if mode == "own" for i in ids)


def test_trains_with_ids_and_eval_runs_full(tmp_path):
    model = make_tiny_bert("double_seq_bn")
    calls = _spy(model)
    train = make_token_dataset(12)
    trainer = TurnoverTrainer(
        model, tiny_training_args(tmp_path), train_dataset=train, eval_dataset=make_token_dataset(4)
    )
    before = model.get_parameter(SPY_LAYER + ".0.weight").detach().clone()
    trainer.train()
    assert _train_ids(calls) == sorted(train["instance_id"])
    assert not torch.equal(before, model.get_parameter(SPY_LAYER + ".0.weight"))
    calls.clear()
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and {mode for mode, _ in calls} == {"none"}


@pytest.mark.parametrize("eval_mode", ["own", "flip"])
def test_evaluate_and_predict_with_masks(tmp_path, eval_mode):
    model = make_tiny_bert()
    calls = _spy(model)
    data = make_token_dataset(6)
    trainer = TurnoverTrainer(
        model, tiny_training_args(tmp_path, turnover_eval_mode=eval_mode), train_dataset=data
    )
    trainer.evaluate(data)
    assert {m for m, _ in calls} == {eval_mode} and sorted(i for _, ids in calls for i in ids) == data[
        "instance_id"
    ]
    calls.clear()
    unlabelled = data.remove_columns("labels")
    out = trainer.predict(unlabelled)
    assert out.predictions.shape == (6, 2) and out.label_ids is None
    assert sorted(i for _, ids in calls for i in ids) == data["instance_id"]


def _tokenizer(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(vocab))
    return BertTokenizerFast(vocab_file=str(path))


def test_padding_collator_and_column_pruning(tmp_path):
    tokenizer = _tokenizer(tmp_path)
    texts = [" ".join(f"w{(i * 7 + j) % 50}" for j in range(3 + i % 4)) for i in range(8)]
    import datasets

    data = datasets.Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(8)]})
    data = data.map(lambda row: tokenizer(row["text"]), remove_columns=[])  # keeps "text": pruned by Trainer
    model = make_tiny_bert()
    calls = _spy(model)
    trainer = TurnoverTrainer(
        model,
        tiny_training_args(tmp_path),
        train_dataset=data,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    assert "instance_id" in trainer.train_dataset.column_names  # row index added before shuffling
    trainer.train()
    assert _train_ids(calls) == list(range(8))


class _TorchRows(torch.utils.data.Dataset):
    def __init__(self, n, with_ids=True):
        self.data = make_token_dataset(n)
        self.with_ids = with_ids

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        row = {k: torch.tensor(v) for k, v in self.data[i].items() if k != "instance_id"}
        row["unused_extra"] = torch.tensor(0)  # removed by RemoveColumnsCollator
        if self.with_ids:
            row["instance_id"] = 1000 + i
        return row


def test_torch_dataset_through_remove_columns_collator(tmp_path):
    model = make_tiny_bert()
    calls = _spy(model)
    trainer = TurnoverTrainer(
        model, tiny_training_args(tmp_path), train_dataset=_TorchRows(8), data_collator=default_data_collator
    )
    trainer.train()
    assert _train_ids(calls) == list(range(1000, 1008))


def test_gradient_accumulation_sees_every_id(tmp_path):
    model = make_tiny_bert()
    calls = _spy(model)
    args = tiny_training_args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=3)
    TurnoverTrainer(model, args, train_dataset=make_token_dataset(12)).train()
    assert _train_ids(calls) == list(range(100, 112))
    assert all(len(ids) == 2 for mode, ids in calls if mode == "own")


def test_resume_from_checkpoint_gives_identical_training(tmp_path):
    data = make_token_dataset(16)

    def run(output, **kwargs):
        model = make_tiny_bert()
        calls = _spy(model)
        args = tiny_training_args(
            output,
            num_train_epochs=2,
            save_strategy="steps",
            save_steps=4,
            lr_scheduler_type="constant",
            **kwargs,
        )
        trainer = TurnoverTrainer(model, args, train_dataset=data)
        return trainer, model, calls

    trainer, straight, straight_calls = run(tmp_path / "a")
    trainer.train()
    trainer, _, _ = run(tmp_path / "b", max_steps=4)
    trainer.train()  # stops after 4 of 8 steps, checkpoint-4 written
    trainer, resumed, resumed_calls = run(tmp_path / "b")
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-4"))
    # Same ids in the same order on the remaining steps, hence the same masks and the same weights.
    assert [c for c in resumed_calls if c[0] == "own"] == [c for c in straight_calls if c[0] == "own"][4:]
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_turnover_config_argument_patches_the_model(tmp_path):
    model = make_tiny_bert(turnover=False)
    trainer = TurnoverTrainer(
        model,
        tiny_training_args(tmp_path),
        train_dataset=make_token_dataset(4),
        turnover_config=TurnoverConfig(p=0.25),
    )
    assert trainer.turnover_config.p == 0.25
    trainer.train()


@pytest.mark.parametrize(
    "extra",
    [{"bf16": True}, {"gradient_checkpointing": True}],
    ids=["bf16_autocast", "gradient_checkpointing"],
)
def test_mixed_precision_and_gradient_checkpointing(tmp_path, extra):
    model = make_tiny_bert()
    calls = _spy(model)  # checks every masked row against its own id, in bf16 too
    TurnoverTrainer(model, tiny_training_args(tmp_path, **extra), train_dataset=make_token_dataset(8)).train()
    own = [ids for mode, ids in calls if mode == "own"]
    # Checkpointing re-runs each forward during backward: the recomputation sees the same ids and masks.
    repeats = 2 if "gradient_checkpointing" in extra else 1
    assert sorted(i for ids in own for i in ids) == sorted(list(range(100, 108)) * repeats)


def test_reading_only_the_cls_position_trains_the_same_weights(tmp_path):
    """Slicing the layers after the last attention to [CLS] in training changes no loss and no gradient: the
    top layer's adapters train to the same weights (to float rounding) as with every position computed."""
    train = make_token_dataset(12)
    trained = []
    for read_only in (True, False):
        model = make_tiny_bert("double_seq_bn")
        seen = []
        tail = model.get_submodule("bert.encoder.layer.1.intermediate")
        tail.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0].shape[1]))
        args = tiny_training_args(tmp_path / str(read_only), turnover_read_positions_only=read_only)
        TurnoverTrainer(model, args, train_dataset=train).train()
        # (with slicing, the first forward is the once-only probe for the first module after attention)
        assert set(seen[1:] if read_only else seen) == ({1} if read_only else {8})
        trained.append({n: p.detach() for n, p in model.named_parameters() if p.requires_grad})
    for name, value in trained[0].items():
        torch.testing.assert_close(value, trained[1][name], rtol=1e-5, atol=1e-6, msg=name)
