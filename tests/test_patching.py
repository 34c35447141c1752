"""Injection by name, gradient isolation, removal, checkpointing, mixed precision, save/load."""

import pytest
import torch
from conftest import VOCAB, make_tiny_bert
from torch import nn
from transformers import AutoConfig

from hf_turnover import (
    TurnoverConfig,
    add_turnover,
    get_turnover_config,
    load_turnover,
    remove_turnover,
    turnover_context,
    turnover_layers,
    wide_adapter_config,
)
from hf_turnover.masks import keep_bits


def _batch(n=4, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(1, VOCAB, (n, length), generator=g),
        "labels": torch.randint(0, 2, (n,), generator=g),
    }


@pytest.mark.parametrize("adapter_config, per_layer", [("seq_bn", 1), ("double_seq_bn", 2), ("pfeiffer", 1)])
def test_adapters_and_head_are_patched(adapter_config, per_layer):
    model = make_tiny_bert(adapter_config)
    layers = turnover_layers(model)
    assert sum(name.endswith("adapter_down") for name in layers) == 2 * per_layer
    assert layers["classifier"] == "input"


def _wide(width: int):
    """The recommended wide set-up on the tiny BERT: one ``width``-unit seq_bn adapter in the top layer."""
    from transformers import BertConfig

    return wide_adapter_config(BertConfig(hidden_size=32, num_hidden_layers=2), width=width)


@pytest.mark.parametrize("adapter_config, masked", [("double_seq_bn", 5), (_wide(300), 2)])
def test_gradient_isolation_one_sgd_step(adapter_config, masked):
    """One step on instance i changes no parameter that only i's flipped sub-network uses."""
    model = make_tiny_bert(adapter_config)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    instance = 12345
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    with turnover_context([instance], "own"):
        model(**_batch(n=1)).loss.backward()
    optimizer.step()
    config = model.turnover_config
    checked = 0
    for name in turnover_layers(model):
        if name == "classifier":
            weight = f"{name}.weight"
            kept = keep_bits(
                torch.tensor([instance]), before[weight].shape[1], name, p=config.p, seed=config.seed
            )[0]
            flipped_cols = ~kept
            assert torch.equal(model.get_parameter(weight)[:, flipped_cols], before[weight][:, flipped_cols])
            assert not torch.equal(model.get_parameter(weight)[:, kept], before[weight][:, kept])
            checked += 1
            continue
        down, up = f"{name}.0.weight", name.replace("adapter_down", "adapter_up") + ".weight"
        kept = keep_bits(torch.tensor([instance]), before[down].shape[0], name, p=config.p, seed=config.seed)[
            0
        ]
        for param, index in [
            (down, (~kept, slice(None))),
            (f"{name}.0.bias", (~kept,)),
            (up, (slice(None), ~kept)),
        ]:
            assert torch.equal(model.get_parameter(param)[index], before[param][index]), param
        assert not torch.equal(model.get_parameter(down)[kept], before[down][kept])
        checked += 1
    assert checked == masked


def test_rows_of_a_batch_equal_single_rows():
    model = make_tiny_bert().eval()
    batch = _batch(n=5)
    ids = torch.tensor([3, 1, 4, 1, 5])
    for mode in ("own", "flip"):
        with torch.no_grad(), turnover_context(ids, mode):
            logits = model(input_ids=batch["input_ids"]).logits
        for r in range(5):
            with torch.no_grad(), turnover_context(ids[r : r + 1], mode):
                row = model(input_ids=batch["input_ids"][r : r + 1]).logits
            torch.testing.assert_close(logits[r : r + 1], row)


def test_broadcast_one_row_to_many_ids_equals_expanded_batch():
    model = make_tiny_bert().eval()
    x = _batch(n=1)["input_ids"]
    mask = torch.ones_like(x)
    mask[0, -2:] = 0
    ids = torch.arange(7)
    with torch.no_grad():
        with turnover_context(ids, "flip", broadcast=True):
            broadcast = model(input_ids=x, attention_mask=mask).logits
        with turnover_context(ids, "flip"):
            expanded = model(input_ids=x.expand(7, -1), attention_mask=mask.expand(7, -1)).logits
    assert broadcast.shape == (7, 2)
    torch.testing.assert_close(broadcast, expanded)


def test_masks_change_outputs_and_full_equals_unmasked():
    model = make_tiny_bert().eval()
    x = _batch(n=3)["input_ids"]
    with torch.no_grad():
        plain = model(input_ids=x).logits
        with turnover_context([0, 1, 2], "full"):
            full = model(input_ids=x).logits
        with turnover_context([0, 1, 2], "own"):
            own = model(input_ids=x).logits
    assert torch.equal(plain, full)
    assert not torch.allclose(plain, own)


def test_remove_restores_the_original_model():
    model = make_tiny_bert().eval()
    x = _batch(n=2)["input_ids"]
    remove_turnover(model)
    assert turnover_layers(model) == {} and get_turnover_config(model) is None
    with torch.no_grad():
        plain = model(input_ids=x).logits
        with turnover_context([0, 1], "own"):
            after = model(input_ids=x).logits
    assert torch.equal(plain, after)
    model.train()
    model(input_ids=x)  # no error: nothing is masked any more


class _VGGish(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 8, 3),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.pool(self.features(x)).flatten(1))))


def test_only_later_layers_by_regex_and_exclude():
    model = _VGGish()
    cfg = TurnoverConfig(
        target_modules=r"features\.[024]|fc1", exclude_modules=["features.0"], head_modules=["fc2"]
    )
    add_turnover(model, cfg)
    assert turnover_layers(model) == {
        "features.2": "output",
        "features.4": "output",
        "fc1": "output",
        "fc2": "input",
    }
    model.eval()
    x = torch.randn(3, 1, 8, 8)
    captured = {}
    model.features[4].register_forward_hook(lambda m, a, out: captured.setdefault("conv", out))
    with torch.no_grad(), turnover_context([10, 11, 12], "own"):
        model(x)
    bits = keep_bits(torch.tensor([10, 11, 12]), 8, "features.4", p=0.5, seed=0)
    # Whole channels are zero exactly where the mask drops them (the hook runs after ours).
    zero_channels = captured["conv"].abs().amax(dim=(2, 3)) == 0
    assert torch.equal(zero_channels, ~bits)


def test_list_patterns_match_names_and_suffixes():
    model = _VGGish()
    add_turnover(model, TurnoverConfig(target_modules=["fc1", "features.4"], head_modules=None))
    assert set(turnover_layers(model)) == {"fc1", "features.4"}


def test_gradient_checkpointing_recomputes_the_same_masks():
    grads = []
    for checkpointing in (False, True):
        model = make_tiny_bert()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        with turnover_context([4, 8, 15, 16], "own"):
            model(**_batch(n=4)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_bfloat16_autocast_uses_the_same_mask_bits():
    model = make_tiny_bert().eval()
    x = _batch(n=2)["input_ids"]
    seen = {}
    name = "bert.encoder.layer.1.output.adapters.task.adapter_down"
    model.get_submodule(name).register_forward_hook(lambda m, a, out: seen.setdefault(out.dtype, out))
    with torch.no_grad(), turnover_context([1, 2], "own"):
        model(input_ids=x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=x)
    assert set(seen) == {torch.float32, torch.bfloat16}
    # Units the mask drops are exactly zero in both precisions: the same bits.
    assert torch.equal(seen[torch.float32].abs().amax(1) == 0, seen[torch.bfloat16].abs().amax(1) == 0)
    bits = keep_bits(torch.tensor([1, 2]), seen[torch.float32].shape[-1], name, p=0.5, seed=0)
    assert torch.equal(seen[torch.float32].abs().amax(1) == 0, ~bits)


def test_config_round_trips_through_save_pretrained(tmp_path):
    cfg = TurnoverConfig(p=0.3, seed=42, scheme="codebook", codebook_size=32, codebook_k=2)
    model = make_tiny_bert("seq_bn", turnover=cfg).eval()
    x = _batch(n=3)["input_ids"]
    with torch.no_grad(), turnover_context([7, 8, 2**40], "flip"):
        expected = model(input_ids=x).logits
    model.save_pretrained(tmp_path)
    saved = AutoConfig.from_pretrained(tmp_path).turnover
    assert saved == cfg.to_dict() and TurnoverConfig.from_dict(saved) == cfg
    # A fresh model of the same structure with the saved weights and config masks identically.
    fresh = make_tiny_bert("seq_bn", turnover=False, seed=1).eval()
    fresh.load_state_dict(model.state_dict())
    fresh.config.turnover = saved
    load_turnover(fresh)
    with torch.no_grad(), turnover_context([7, 8, 2**40], "flip"):
        assert torch.equal(fresh(input_ids=x).logits, expected)


def test_turnover_arguments_parse_next_to_training_arguments():
    """HfArgumentParser: prefixed options (no clash with the Trainer's --seed), regex strings, '' for none."""
    from transformers import HfArgumentParser

    from hf_turnover import TurnoverArguments, TurnoverTrainingArguments

    parser = HfArgumentParser((TurnoverArguments, TurnoverTrainingArguments))
    turnover, training = parser.parse_args_into_dataclasses(
        ["--output_dir", "unused", "--seed", "7", "--turnover_seed", "3", "--turnover_p", "0.25",
         "--turnover_target_modules", r"fc\d", "--turnover_head_modules", "", "--turnover_scheme", "codebook"]
    )  # fmt: skip
    assert training.seed == 7
    config = turnover.to_config()
    assert (config.seed, config.p, config.scheme) == (3, 0.25, "codebook")
    assert (config.target_modules, config.head_modules, config.exclude_modules) == (r"fc\d", None, None)
    defaults = parser.parse_args_into_dataclasses(["--output_dir", "unused"])[0].to_config()
    assert defaults == TurnoverConfig()


def test_contexts_left_in_any_order_remove_their_own_state():
    """Nested contexts (or two threads) with several ids each: leaving one must not compare id tensors."""
    from hf_turnover.context import current_state

    outer = turnover_context([1, 2], "own")
    state = outer.__enter__()
    with turnover_context([3, 4], "flip") as inner:
        assert current_state() is inner
    assert current_state() is state
    outer.__exit__(None, None, None)
    assert current_state() is None


@pytest.mark.parametrize("width", [1, 7, 70, 129, 1000])
def test_wide_adapter_has_exactly_the_requested_units_in_the_top_layer_only(width):
    model = make_tiny_bert(_wide(width))
    downs = {n: m for n, m in model.named_modules() if n.endswith("adapter_down")}
    assert list(downs) == ["bert.encoder.layer.1.output.adapters.task.adapter_down"]
    assert next(iter(downs.values()))[0].out_features == width


def test_wide_adapter_lower_layers_get_their_own_width():
    import adapters
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(
        BertConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2)
    )
    adapters.init(model)
    model.add_adapter("task", config=wide_adapter_config(model.config, 70, 2, lower_width=9))
    widths = {n: m[0].out_features for n, m in model.named_modules() if n.endswith("adapter_down")}
    assert widths == {
        "bert.encoder.layer.1.output.adapters.task.adapter_down": 9,
        "bert.encoder.layer.2.output.adapters.task.adapter_down": 70,
    }


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"width": 0}, "width must be a positive int"),
        ({"lower_width": 2.5}, "lower_width must be a positive int"),
        ({"top_layers": 3}, r"top_layers must .* \[1, 2\]"),
    ],
)
def test_wide_adapter_config_names_bad_values(kwargs, match):
    from transformers import BertConfig

    with pytest.raises(ValueError, match=match):
        wide_adapter_config(BertConfig(hidden_size=32, num_hidden_layers=2), **kwargs)
