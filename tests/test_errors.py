"""Every bad input gets an error that names the value and the fix."""

import datasets
import pytest
import torch
from conftest import make_tiny_bert, make_token_dataset, tiny_training_args
from test_trainer import _TorchRows

from hf_turnover import (
    TurnoverConfig,
    TurnoverTrainer,
    TurnoverTrainingArguments,
    add_turnover,
    turnover_context,
)


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1, 1.5])
def test_p_outside_unit_interval(p):
    with pytest.raises(ValueError, match=rf"p must lie in \(0, 1\), got p={p}"):
        TurnoverConfig(p=p)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"scheme": "sin"}, "scheme='sin' is unknown"),
        ({"seed": -1}, "seed must be a non-negative int, got seed=-1"),
        ({"scheme": "codebook", "codebook_k": 0}, "codebook_k=0 must lie in"),
        ({"target_modules": None, "head_modules": None}, "nothing would be masked"),
        ({"format_version": 99}, "format_version=99.*Upgrade hf_turnover"),
    ],
)
def test_bad_config_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TurnoverConfig(**kwargs)


def test_unknown_config_keys():
    with pytest.raises(ValueError, match=r"Unknown TurnoverConfig keys \['q'\]"):
        TurnoverConfig.from_dict({"p": 0.5, "q": 1})


@pytest.mark.parametrize(
    "ids, error, message",
    [
        ([1.0, 2.0], TypeError, "must be integers, got 1.0"),
        (torch.tensor([1.0, 2.0]), TypeError, "must be an integer tensor, got dtype torch.float32"),
        ([3, -1], ValueError, r"must lie in \[0, 2\*\*62\), got -1"),
        (torch.tensor([2**62]), ValueError, r"must lie in \[0, 2\*\*62\), got 4611686018427387904"),
        ([True], TypeError, "must be integers, got True"),
    ],
)
def test_bad_instance_ids(ids, error, message):
    with pytest.raises(error, match=message):
        with turnover_context(ids):
            pass


def test_unknown_mode():
    with pytest.raises(ValueError, match="Unknown turn-over mode 'both'"):
        with turnover_context([1], "both"):
            pass


def test_nothing_matched_names_the_pattern():
    model = make_tiny_bert(adapter_config=None, turnover=False)
    with pytest.raises(
        ValueError, match=r"target_modules=.*adapter_down' matched no module.*add the adapters first"
    ):
        add_turnover(model, TurnoverConfig())


def test_patching_twice():
    with pytest.raises(ValueError, match="already has turn-over layers"):
        add_turnover(make_tiny_bert(), TurnoverConfig())


def test_training_mode_without_ids():
    model = make_tiny_bert().train()
    with pytest.raises(RuntimeError, match="ran in training mode without instance ids.*turnover_context"):
        model(input_ids=torch.ones(2, 4, dtype=torch.long))


def test_mask_batch_size_mismatch():
    model = make_tiny_bert().eval()
    with pytest.raises(RuntimeError, match="got 2 rows but 3 instance ids"):
        with turnover_context([1, 2, 3]):
            model(input_ids=torch.ones(2, 4, dtype=torch.long))


def test_adapter_composition_that_replicates_the_batch():
    from adapters.composition import Parallel

    model = make_tiny_bert("seq_bn", turnover=False)
    model.add_adapter("other", config="seq_bn")
    model.active_adapters = Parallel("task", "other")
    add_turnover(model, TurnoverConfig())  # each parallel adapter gets its own copy of the rows: fine
    model.eval()
    # ... but the head sees the replicated batch: 4 rows for 2 ids.
    with pytest.raises(RuntimeError, match="'classifier' got 4 rows but 2 instance ids.*Parallel"):
        with turnover_context([1, 2]):
            model(input_ids=torch.ones(2, 4, dtype=torch.long))


def test_trainer_needs_turnover_layers(tmp_path):
    with pytest.raises(ValueError, match="has no turn-over layers.*add_turnover"):
        TurnoverTrainer(
            make_tiny_bert(turnover=False), tiny_training_args(tmp_path), train_dataset=make_token_dataset(4)
        )


def test_torch_dataset_without_ids(tmp_path):
    with pytest.raises(ValueError, match=r"train_dataset has no 'instance_id' column.*with_indices=True"):
        TurnoverTrainer(
            make_tiny_bert(), tiny_training_args(tmp_path), train_dataset=_TorchRows(4, with_ids=False)
        )


def test_no_row_ids_added_when_disabled(tmp_path):
    args = tiny_training_args(tmp_path, turnover_add_row_ids=False)
    with pytest.raises(ValueError, match="train_dataset has no 'instance_id' column"):
        TurnoverTrainer(make_tiny_bert(), args, train_dataset=make_token_dataset(4, with_ids=False))


def test_float_id_column(tmp_path):
    data = make_token_dataset(4).cast_column("instance_id", datasets.Value("float64"))
    trainer = TurnoverTrainer(make_tiny_bert(), tiny_training_args(tmp_path), train_dataset=data)
    with pytest.raises(TypeError, match=r"Column 'instance_id' must hold integers, got 100.0.*cast_column"):
        trainer.train()


def test_negative_id_column(tmp_path):
    data = make_token_dataset(4).map(lambda row, i: {"instance_id": -i}, with_indices=True)
    trainer = TurnoverTrainer(make_tiny_bert(), tiny_training_args(tmp_path), train_dataset=data)
    with pytest.raises(ValueError, match=r"instance_id must lie in \[0, 2\*\*62\), got -[1-3]"):
        trainer.train()


def test_eval_with_masks_needs_ids(tmp_path):
    trainer = TurnoverTrainer(
        make_tiny_bert(),
        tiny_training_args(tmp_path, turnover_eval_mode="own"),
        train_dataset=make_token_dataset(4),
    )
    with pytest.raises(ValueError, match="this batch has no 'instance_id' column"):
        trainer.evaluate(make_token_dataset(4, with_ids=False))


def test_bad_eval_mode(tmp_path):
    with pytest.raises(ValueError, match="turnover_eval_mode='dropout' is unknown"):
        TurnoverTrainingArguments(output_dir=str(tmp_path), turnover_eval_mode="dropout")
