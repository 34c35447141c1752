"""Turn-over masks on LoRA rank units, for `adapters`' LoRA and (when installed) peft's: the masked product, gradient
isolation, exact and linear scoring, refusals, training, and save and load (with remote code for adapters)."""

from __future__ import annotations

import json

import adapters
import numpy as np
import pytest
import torch
from adapters import IA3Config, LoRAConfig
from conftest import make_tiny_bert, make_token_dataset, make_train_and_targets, tiny_training_args
from torch import nn

from hf_turnover import (
    ADAPTERS_LORA_MODULES,
    PEFT_HEAD_MODULES,
    PEFT_LORA_MODULES,
    TurnoverConfig,
    TurnoverTrainer,
    add_turnover,
    estimate_influence,
    turnover_context,
    turnover_layers,
)
from hf_turnover.evaluation import score_matrix
from hf_turnover.inputs import per_row_loss
from hf_turnover.linear import layer_bits
from hf_turnover.lora import LoRARankHook
from hf_turnover.masks import mask_values
from hf_turnover.model import turnover_hooks

KINDS = ["adapters", "peft"]
R = 6
ADAPTERS_TURNOVER = TurnoverConfig(target_modules=ADAPTERS_LORA_MODULES, head_modules="classifier")
PEFT_TURNOVER = TurnoverConfig(target_modules=PEFT_LORA_MODULES, head_modules=PEFT_HEAD_MODULES)


def _randomise_b(model: nn.Module) -> nn.Module:
    """LoRA starts with B = 0 (no update); random B makes the rank masks show in the outputs."""
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.5)
    return model


def adapters_lora_bert(
    lora: LoRAConfig | None = None, turnover=ADAPTERS_TURNOVER, seed: int = 0
) -> nn.Module:
    """Tiny BERT with an `adapters` LoRA "task" (r=6 on query and value of both layers)."""
    model = make_tiny_bert(None, turnover=False, seed=seed)
    adapters.init(model)
    model.add_adapter("task", config=lora or LoRAConfig(r=R, alpha=2 * R))
    model.train_adapter("task")
    _randomise_b(model)
    return add_turnover(model, turnover) if turnover else model


def peft_lora_bert(turnover=PEFT_TURNOVER, seed: int = 0, **lora_kwargs) -> nn.Module:
    """Tiny BERT wrapped by peft with LoRA (r=6) on query and value of both layers."""
    peft = pytest.importorskip("peft")
    model = make_tiny_bert(None, turnover=False, seed=seed)
    config = peft.LoraConfig(
        r=R, lora_alpha=2 * R, target_modules=["query", "value"], task_type="SEQ_CLS", **lora_kwargs
    )
    model = _randomise_b(peft.get_peft_model(model, config))
    return add_turnover(model, turnover) if turnover else model


def lora_model(kind: str, **kwargs) -> nn.Module:
    return adapters_lora_bert(**kwargs) if kind == "adapters" else peft_lora_bert(**kwargs)


def lora_weights(model: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A (r, in), B (out, r)) of the LoRA whose rank units the target ``name`` masks."""
    module = model.get_submodule(name)
    if isinstance(turnover_hooks(model)[name], LoRARankHook):
        return module.lora_A, module.lora_B
    layer, adapter = name.rsplit(".lora_A.", 1)
    return module.weight, model.get_submodule(layer).lora_B[adapter].weight


def _batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    rows = make_token_dataset(n, length=6, seed=seed)
    return {"input_ids": torch.tensor(rows["input_ids"]), "labels": torch.tensor(rows["labels"])}


@pytest.mark.parametrize("kind", KINDS)
def test_the_rank_units_of_every_lora_are_the_targets(kind):
    model = lora_model(kind)
    layers = turnover_layers(model)
    lora = {name for name, where in layers.items() if where == "output"}
    assert len(lora) == 4 and all(("query" in n) != ("value" in n) for n in lora)
    assert [where for name, where in layers.items() if name not in lora] == ["input"]  # the classifier
    for name in lora:
        a, b = lora_weights(model, name)
        assert a.shape == (R, 32) and b.shape == (32, R)


@pytest.mark.parametrize("use_gating, dropout", [(False, 0.0), (True, 0.0), (False, 0.3)])
def test_adapters_lora_output_is_the_product_with_masked_rank_units(use_gating, dropout):
    """Under a mask m the LoRA module returns ((x @ A.T) * m) @ B.T times its scaling (or its gate); outside a
    context and in mode full, the module's own output, bit for bit (dropout is off in eval)."""
    lora = LoRAConfig(r=R, alpha=2 * R, use_gating=use_gating, dropout=dropout)
    model = adapters_lora_bert(lora, turnover=None).eval()
    batch = {"input_ids": _batch(3)["input_ids"]}
    with torch.no_grad():
        plain = model(**batch).logits
    add_turnover(model, ADAPTERS_TURNOVER)
    name = "bert.encoder.layer.1.attention.self.value.loras.task"
    module = model.get_submodule(name)
    seen = {}
    # registered after turn-over's hook: sees the masked output
    module.register_forward_hook(lambda m, args, out: seen.update(x=args[1], out=out))
    ids = torch.tensor([5, 17, 2**40])
    with torch.no_grad():
        for mode in ("own", "flip"):
            with turnover_context(ids, mode):
                model(**batch)
            m = mask_values(layer_bits(model, name, ids, R), mode, 0.5, torch.float32)  # (3, r)
            expected = ((seen["x"] @ module.lora_A.T) * m[:, None, :]) @ module.lora_B.T
            expected = expected * (seen["out"][1] if use_gating else module.scaling)
            torch.testing.assert_close(seen["out"][0], expected, rtol=1e-5, atol=1e-6)
        with turnover_context(ids, "full"):
            assert torch.equal(model(**batch).logits, plain)
        assert torch.equal(model(**batch).logits, plain)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_isolation_of_the_rank_units(kind):
    """An instance's loss gives exactly zero gradient to the A rows and B columns of its flipped rank units (and
    some to its own), in training mode with LoRA dropout on."""
    if kind == "adapters":
        model = adapters_lora_bert(LoRAConfig(r=R, alpha=2 * R, dropout=0.2)).train()
    else:
        model = peft_lora_bert(lora_dropout=0.2).train()
    instance = 12345
    with turnover_context([instance], "own"):
        model(**_batch(1, seed=3)).loss.backward()
    checked = 0
    for name, where in turnover_layers(model).items():
        if where != "output":
            continue
        a, b = lora_weights(model, name)
        kept = layer_bits(model, name, torch.tensor([instance]), R)[0]
        assert 0 < int(kept.sum()) < R
        assert torch.count_nonzero(a.grad[~kept]) == 0 and torch.count_nonzero(b.grad[:, ~kept]) == 0, name
        assert torch.count_nonzero(a.grad[kept]) > 0 and torch.count_nonzero(b.grad[:, kept]) > 0, name
        checked += 1
    assert checked == 4


@pytest.mark.parametrize("kind", KINDS)
def test_trainer_leaves_the_flipped_rank_units_of_its_instance_unchanged(kind, tmp_path):
    """One TurnoverTrainer step on one row: the ids reach the LoRA masks through the trainer and the model."""
    model = lora_model(kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    row = make_token_dataset(1, seed=4)
    args = tiny_training_args(tmp_path, per_device_train_batch_size=1, max_steps=1, weight_decay=0.0)
    TurnoverTrainer(model, args, train_dataset=row).train()
    for name, where in turnover_layers(model).items():
        if where != "output":
            continue
        a, b = lora_weights(model, name)
        a_name, b_name = (n for n, p in model.named_parameters() if p is a or p is b)
        kept = layer_bits(model, name, torch.tensor(row["instance_id"]), R)[0]
        assert torch.equal(a[~kept], before[a_name][~kept])
        assert torch.equal(b[:, ~kept], before[b_name][:, ~kept])
        assert not torch.equal(a[kept], before[a_name][kept])


def reference_scores(model: nn.Module, target: dict, ids: list[int]) -> torch.Tensor:
    """Two explicit batch-1 forwards per training id."""
    x = {k: torch.tensor([target[k]]) for k in ("input_ids", "attention_mask")}
    y = torch.tensor([target["labels"]])
    out = []
    with torch.no_grad():
        for i in ids:
            losses = {}
            for mode in ("flip", "own"):
                with turnover_context([i], mode):
                    losses[mode] = per_row_loss(model(**x).logits, y)
            out.append((losses["flip"] - losses["own"]).item())
    return torch.tensor(out)


@pytest.mark.parametrize("kind", KINDS)
def test_exact_scores_equal_the_row_by_row_reference(kind):
    """peft's LoRA sits inside transformers' attention, which cannot broadcast one row against many masks: the
    scorer finds that out and repeats the row instead; adapters' attention broadcasts."""
    train, targets = make_train_and_targets()
    train, targets = train.select(range(12)), targets.select([0, 1])  # target 0 is padded
    model = lora_model(kind).eval()
    result = estimate_influence(
        model, train, targets, train_batch_size=5, progress=False, method="exact"
    )  # chunks of 5, 5, 2
    ids = sorted(train["instance_id"])
    matrix = score_matrix(result, [0, 1], ids)[0]
    for t in range(2):
        expected = reference_scores(model, targets[t], ids)
        scores = torch.tensor(matrix[t], dtype=torch.float32)
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-4)
        assert expected.abs().min() > 0


def interpolated_loss(model: nn.Module, target: dict, train_id: int, mode: str | None, eps: float) -> float:
    """The target's loss with every mask value moved from 1 towards ``mode``'s mask: ``1 + eps * (m - 1)``, through
    each hook's own way of scaling its units (the LoRA rank units included)."""

    def values(module, rows, width, device, dtype, name):
        if mode is None:
            return None
        m = mask_values(layer_bits(model, name, torch.tensor([train_id]), width), mode, 0.5, dtype)
        return 1 + eps * (m - 1)  # (1, d)

    handles = [
        hook.register(model.get_submodule(name), lambda *a, name=name: values(*a, name=name))
        for name, hook in turnover_hooks(model).items()
    ]
    try:
        with torch.no_grad(), turnover_context([train_id], "full"):
            inputs = {k: torch.tensor([target[k]]) for k in ("input_ids", "attention_mask")}
            logits = model(**inputs).logits
            return float(torch.nn.functional.cross_entropy(logits, torch.tensor([target["labels"]])))
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("kind", KINDS)
def test_linear_score_is_the_derivative_of_the_exact_score(kind):
    """d/de [L(1 + e(m~ - 1)) - L(1 + e(m - 1))] at e = 0 is the linearized score (float64, central differences)."""
    model = lora_model(kind).double().eval()
    row = make_token_dataset(1, seed=5)[0]
    target = {k: row[k] for k in ("input_ids", "attention_mask", "labels")}
    ids, eps = [100, 101, 102, 103], 1e-5
    expected = []
    for i in ids:
        exact = [
            interpolated_loss(model, target, i, "flip", e) - interpolated_loss(model, target, i, "own", e)
            for e in (eps, -eps)
        ]
        expected.append((exact[0] - exact[1]) / (2 * eps))

    def loss64(logits, labels):
        return torch.nn.functional.cross_entropy(logits, labels.expand(len(logits)), reduction="none")

    result = estimate_influence(model, None, [target], train_ids=ids, method="linear", loss_fn=loss64,
                                check_fingerprint=False, progress=False)  # fmt: skip
    linear = score_matrix(result, [0], ids)[0][0]
    np.testing.assert_allclose(linear, expected, rtol=1e-4, atol=1e-9)
    assert np.abs(linear).min() > 0


def _gpt2_with_fused_lora() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    adapters.init(model)
    model.add_adapter("task", config=LoRAConfig(r=2))
    return model


def _merged(model: nn.Module) -> nn.Module:
    model.merge_adapter("task")
    return model


@pytest.mark.parametrize(
    "build, config, match",
    [
        (lambda: adapters_lora_bert(LoRAConfig(r=R, use_dora=True), None), ADAPTERS_TURNOVER, "uses DoRA"),
        (lambda: adapters_lora_bert(IA3Config(), None), ADAPTERS_TURNOVER, "adapters IA3 module"),
        (lambda: _merged(adapters_lora_bert(turnover=None)), ADAPTERS_TURNOVER, "merged into its layer"),
        (_gpt2_with_fused_lora, TurnoverConfig(target_modules=ADAPTERS_LORA_MODULES, head_modules=None),
         "fused QKV layer"),
        (lambda: adapters_lora_bert(turnover=None), TurnoverConfig(head_modules=ADAPTERS_LORA_MODULES,
         target_modules=None), "not as a head"),
        (lambda: peft_lora_bert(None, use_dora=True), PEFT_TURNOVER, "uses a variant"),
    ],
    ids=["adapters_dora", "adapters_ia3", "adapters_merged", "adapters_fused_qkv", "lora_as_head", "peft_dora"],
)  # fmt: skip
def test_lora_set_ups_that_cannot_isolate_units_are_refused(build, config, match):
    with pytest.raises(ValueError, match=match):
        add_turnover(build(), config)


def _logits_and_scores(model, batch, ids, train, targets):
    with torch.no_grad():
        logits = {}
        for mode in ("own", "flip"):
            with turnover_context(ids, mode):
                logits[mode] = model(**batch).logits
    scores = estimate_influence(model, train, targets, progress=False, method="exact")
    return logits, torch.tensor(scores["score"])


def test_peft_lora_saved_and_loaded_gives_the_same_masks_and_scores(tmp_path):
    """peft saves the LoRA and classifier weights (the backbone is the pretrained one); the same TurnoverConfig on
    the loaded model re-creates the masks (a function of the config, the module names and the ids), so the
    scores agree bit for bit."""
    peft = pytest.importorskip("peft")
    train, targets = make_train_and_targets()
    model = peft_lora_bert().eval()
    model.save_pretrained(tmp_path / "lora")
    config = json.loads(json.dumps(model.turnover_config.to_dict()))
    loaded = peft.PeftModel.from_pretrained(make_tiny_bert(None, turnover=False), tmp_path / "lora")
    add_turnover(loaded.eval(), TurnoverConfig.from_dict(config))
    batch, ids = {"input_ids": _batch(3)["input_ids"]}, [4, 9, 2**33]
    logits, scores = _logits_and_scores(model, batch, ids, train, targets)
    loaded_logits, loaded_scores = _logits_and_scores(loaded, batch, ids, train, targets)
    assert all(torch.equal(logits[m], loaded_logits[m]) for m in logits)
    assert not torch.equal(logits["own"], logits["flip"])
    assert torch.equal(scores, loaded_scores) and scores.abs().max() > 0


def test_adapters_lora_model_round_trips_with_remote_code(tmp_path):
    """A Hub-ready model with adapters' LoRA, saved and loaded by the installed code and, in a process without
    hf_turnover, by its remote code: the same masks and exact scores bit for bit, linear scores to rounding."""
    from hub_fixtures import fresh_env, make_saved, run_fresh
    from safetensors.torch import load_file
    from test_hub_model import FRESH_SCORES, IDS
    from transformers import AutoModelForSequenceClassification

    from hf_turnover.training_set import load_training_set

    lora = LoRAConfig(r=R, alpha=2 * R, init_weights="bert")
    model, tokenizer, _ = make_saved(tmp_path, adapter_config=lora, turnover=ADAPTERS_TURNOVER)
    assert sum(isinstance(h, LoRARankHook) for h in turnover_hooks(model).values()) == 4
    encoded = tokenizer(["w1 w2 w3", "w12 w14 w3 w3 w9", "w5"] * 3, padding=True)
    batch = {k: torch.tensor(v)[: len(IDS)] for k, v in encoded.items()}
    target = {**{k: v[1].tolist() for k, v in batch.items()}, "label": 1}
    args = [str(tmp_path / "model"), json.dumps(IDS), json.dumps({k: v.tolist() for k, v in batch.items()})]
    env = fresh_env(tmp_path / "hf_home")
    info = run_fresh(FRESH_SCORES, tmp_path, env, *args, json.dumps(target), "fresh.safetensors")
    assert not info["hf_turnover_imported"] and (tmp_path / "model" / "lora.py").is_file()
    fresh = load_file(str(tmp_path / "fresh.safetensors"))
    installed = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model")  # no remote code
    installed.eval()
    assert turnover_layers(installed) == turnover_layers(model)
    with torch.no_grad():
        for mode in ("own", "flip"):
            with turnover_context(IDS, mode):
                logits = model(**batch).logits
                assert torch.equal(logits, fresh[mode]), mode
                assert torch.equal(installed(**batch).logits, logits), mode
    assert not torch.equal(fresh["own"], fresh["flip"])
    train = load_training_set(tmp_path / "model", None)
    exact = estimate_influence(model, train, [target], progress=False, method="exact")
    assert torch.equal(torch.tensor(exact["score"]), fresh["scores"]) and fresh["scores"].abs().max() > 0
    linear = estimate_influence(model, train, [target], method="linear", progress=False)
    torch.testing.assert_close(torch.tensor(linear["score"]), fresh["linear"], rtol=1e-5, atol=1e-7)
