"""The Hub-ready model: safetensors + flat remote code; a process without hf_turnover loads it with
trust_remote_code=True and computes the same masks and bit-identical influence scores."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from hub_fixtures import fresh_env, make_model, make_saved, run_fresh
from safetensors.torch import load_file
from transformers.dynamic_module_utils import get_relative_import_files, get_relative_imports

from hf_turnover import estimate_influence, turnover_context, turnover_layers, wide_adapter_config
from hf_turnover.hub import save_turnover_model
from hf_turnover.modeling_turnover import TurnoverBertForSequenceClassification
from hf_turnover.training_set import load_training_set

PACKAGE = Path(__file__).resolve().parents[1] / "hf_turnover"
REMOTE_ENTRY_FILES = ["modeling_turnover.py", "pipeline_turnover.py"]
IDS = [1000, 1003, 1007, 1011, 1023, 5, 2**40]

# Run in a fresh process after a header that loads `model` and defines `turnover_context(ids, mode)` and
# `estimate_influence(train, targets, **kwargs)`: logits of a batch under own and flipped masks of IDS, and
# influence scores, saved to argv[5].
SCORE_BODY = """
ids = json.loads(sys.argv[2])
batch = {k: torch.tensor(v) for k, v in json.loads(sys.argv[3]).items()}
out = {}
with torch.no_grad():
    for mode in ("own", "flip"):
        with turnover_context(ids, mode):
            out[mode] = model(**batch).logits
train = datasets.Dataset.from_parquet(sys.argv[1] + "/training_set.parquet")
scores = estimate_influence(train, [dict(json.loads(sys.argv[4]))], method="exact", progress=False)
out["scores"] = torch.tensor(scores["score"])
out["train_ids"] = torch.tensor(scores["train_id"])
linear = estimate_influence(train, [dict(json.loads(sys.argv[4]))], method="linear", progress=False)
out["linear"] = torch.tensor(linear["score"])
save_file(out, sys.argv[5])
"""
IMPORTS = """
import json, sys
import datasets, torch
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification
"""
# Without hf_turnover: the model's own remote code.
FRESH_SCORES = (
    IMPORTS
    + """
try:  # without trust_remote_code: transformers' own error (stdin is closed, so it cannot prompt)
    AutoModelForSequenceClassification.from_pretrained(sys.argv[1])
    refused = ""
except ValueError as error:
    refused = str(error)
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
turnover_context, estimate_influence = model.turnover_context, model.estimate_influence
"""
    + SCORE_BODY
    + """
print()  # transformers' prompt (answered by the closed stdin) leaves the line open
print(json.dumps({"hf_turnover_imported": any(m.startswith("hf_turnover") for m in sys.modules), "refused": refused,
                  "module": type(model).__mro__[0].__module__, "active": str(model.active_adapters)}))
"""
)
# With hf_turnover imported too: the remote-code model runs its own copy of the modules, and the installed
# hf_turnover must still reach its masks (one shared state per process).
MIXED_SCORES = (
    IMPORTS
    + """
import hf_turnover
from hf_turnover import turnover_context
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
def estimate_influence(train, targets, **kwargs):
    return hf_turnover.estimate_influence(model, train, targets, **kwargs)
"""
    + SCORE_BODY
    + """
print(json.dumps({"modules": [c.__module__ for c in type(model).__mro__]}))
"""
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub_model")
    model, tokenizer, train = make_saved(tmp, card={"accuracy": 0.5})
    return model, tokenizer, train, tmp


@pytest.fixture(scope="module")
def saved_wide(tmp_path_factory):
    """The recommended wide set-up: one 70-unit seq_bn adapter in the top layer only."""
    tmp = tmp_path_factory.mktemp("hub_model_wide")
    model, tokenizer, train = make_saved(tmp, adapter_config=lambda c: wide_adapter_config(c, width=70))
    return model, tokenizer, train, tmp


def _batch(tokenizer, n):
    encoded = tokenizer(["w1 w2 w3", "w12 w14 w3 w3 w9", "w5"] * 3, padding=True)
    return {k: torch.tensor(v)[:n] for k, v in encoded.items()}


def test_saved_folder_is_safetensors_and_flat_code(saved):
    _, _, _, tmp = saved
    folder = tmp / "model"
    names = {p.name for p in folder.iterdir()}
    assert {
        "model.safetensors",
        "config.json",
        "training_set.parquet",
        "training_set.json",
        "README.md",
    } <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".tmp"))]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "turnover_bert"
    assert config["auto_map"]["AutoModelForSequenceClassification"] == (
        "modeling_turnover.TurnoverBertForSequenceClassification"
    )
    assert config["custom_pipelines"]["turnover-influence"]["impl"] == "pipeline_turnover.InfluencePipeline"
    assert config["turnover"]["p"] == 0.5 and config["turnover_training"]["num_instances"] == 24
    for path in folder.glob("*.py"):
        _assert_flat(path, names)


def _assert_flat(path: Path, names: set[str]) -> None:
    """Installed packages and `from .sibling import name` only: no subpackages, no hf_turnover imports."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.level == 1 and node.module and "." not in node.module, (
                f"{path.name}: {ast.dump(node)}"
            )
            assert f"{node.module}.py" in names, f"{path.name} imports .{node.module}, which is not saved"
        modules = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        modules += [node.module] if isinstance(node, ast.ImportFrom) and not node.level else []
        assert not [m for m in modules if m and m.split(".")[0] == "hf_turnover"], path.name


@pytest.mark.parametrize("entry", REMOTE_ENTRY_FILES)
def test_remote_entry_files_import_their_whole_closure_directly(entry):
    # transformers copies only the direct relative imports of the entry file when loading from a local folder.
    closure = {Path(f).stem for f in get_relative_import_files(PACKAGE / entry)}
    assert closure <= set(get_relative_imports(PACKAGE / entry))


def test_fresh_process_without_hf_turnover_gives_identical_masks_and_scores(saved):
    """Also: without trust_remote_code the same process gets transformers' error (never turned on for you)."""
    model, tokenizer, train, tmp = saved
    batch = _batch(tokenizer, len(IDS))
    target = {**{k: v[1].tolist() for k, v in batch.items()}, "label": 1}
    env = fresh_env(tmp / "hf_home")
    args = [str(tmp / "model"), json.dumps(IDS), json.dumps({k: v.tolist() for k, v in batch.items()})]
    info = run_fresh(FRESH_SCORES, tmp, env, *args, json.dumps(target), "fresh.safetensors")
    assert not info["hf_turnover_imported"] and info["active"] == "Stack[task]"
    assert "contains custom code which must be executed" in info["refused"]
    assert "trust_remote_code=True" in info["refused"]
    fresh = load_file(str(tmp / "fresh.safetensors"))
    with torch.no_grad():
        for mode in ("own", "flip"):
            with turnover_context(IDS, mode):
                assert torch.equal(model(**batch).logits, fresh[mode]), mode
    assert not torch.equal(fresh["own"], fresh["flip"])  # the masks are active
    local = estimate_influence(
        model, load_training_set(tmp / "model", None), [target], method="exact", progress=False
    )
    assert torch.equal(torch.tensor(local["train_id"]), fresh["train_ids"])
    assert torch.equal(torch.tensor(local["score"]), fresh["scores"])
    assert fresh["scores"].abs().max() > 0
    linear = estimate_influence(model, load_training_set(tmp / "model", None), [target], method="linear")
    torch.testing.assert_close(torch.tensor(linear["score"]), fresh["linear"], rtol=1e-5, atol=1e-7)


def test_wide_adapter_model_round_trips_with_remote_code(saved_wide):
    """The wide set-up's per-layer widths and masks survive save and a load with remote code only: the same
    masks and exact scores bit for bit, linear scores to float rounding."""
    model, tokenizer, train, tmp = saved_wide
    assert set(turnover_layers(model)) == {
        "bert.encoder.layer.1.output.adapters.task.adapter_down",
        "classifier",
    }
    assert model.get_submodule("bert.encoder.layer.1.output.adapters.task.adapter_down.0").out_features == 70
    batch = _batch(tokenizer, len(IDS))
    target = {**{k: v[1].tolist() for k, v in batch.items()}, "label": 1}
    args = [str(tmp / "model"), json.dumps(IDS), json.dumps({k: v.tolist() for k, v in batch.items()})]
    run_fresh(FRESH_SCORES, tmp, fresh_env(tmp / "hf_home"), *args, json.dumps(target), "fresh.safetensors")
    fresh = load_file(str(tmp / "fresh.safetensors"))
    with torch.no_grad():
        for mode in ("own", "flip"):
            with turnover_context(IDS, mode):
                assert torch.equal(model(**batch).logits, fresh[mode]), mode
    train_set = load_training_set(tmp / "model", None)
    exact = estimate_influence(model, train_set, [target], method="exact", progress=False)
    assert torch.equal(torch.tensor(exact["score"]), fresh["scores"])
    linear = estimate_influence(model, train_set, [target], method="linear", progress=False)
    # backward reductions are split by thread count: equal to float rounding, not always bit for bit
    torch.testing.assert_close(torch.tensor(linear["score"]), fresh["linear"], rtol=1e-5, atol=1e-7)
    assert fresh["linear"].abs().max() > 0


def test_remote_code_model_scored_with_installed_hf_turnover(saved):
    """Regression: the remote copy once kept its own context, so installed hf_turnover scored all zeros."""
    model, tokenizer, train, tmp = saved
    batch = _batch(tokenizer, len(IDS))
    target = {**{k: v[1].tolist() for k, v in batch.items()}, "label": 1}
    env = fresh_env(tmp / "hf_home_mixed")
    args = [str(tmp / "model"), json.dumps(IDS), json.dumps({k: v.tolist() for k, v in batch.items()})]
    info = run_fresh(MIXED_SCORES, tmp, env, *args, json.dumps(target), "mixed.safetensors", block=False)
    assert any(m.startswith("transformers_modules") for m in info["modules"]), info  # the remote copy
    mixed = load_file(str(tmp / "mixed.safetensors"))
    with torch.no_grad():
        for mode in ("own", "flip"):
            with turnover_context(IDS, mode):
                assert torch.equal(model(**batch).logits, mixed[mode]), mode
    local = estimate_influence(
        model, load_training_set(tmp / "model", None), [target], method="exact", progress=False
    )
    assert torch.equal(torch.tensor(local["score"]), mixed["scores"])
    assert mixed["scores"].abs().max() > 0


def test_config_overrides_reach_the_config(saved):
    _, _, _, tmp = saved
    loaded = TurnoverBertForSequenceClassification.from_pretrained(tmp / "model", output_hidden_states=True)
    assert loaded.config.output_hidden_states and loaded.config.turnover_training


def test_installed_code_loads_without_remote_code(saved):
    model, tokenizer, _, tmp = saved
    from transformers import AutoModelForSequenceClassification

    from hf_turnover.hub import register_with_transformers

    register_with_transformers()
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp / "model").eval()
    assert type(loaded).__mro__[0].__module__ != "transformers_modules"
    assert isinstance(loaded, TurnoverBertForSequenceClassification)
    batch = _batch(tokenizer, 3)
    with torch.no_grad(), turnover_context([1000, 1001, 1002], "flip"):
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_newer_format_version_is_refused(saved, tmp_path):
    _, _, _, tmp = saved
    import shutil

    shutil.copytree(tmp / "model", tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["turnover"]["format_version"] = 99
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="format_version=99.*Upgrade hf_turnover"):
        TurnoverBertForSequenceClassification.from_pretrained(tmp_path / "model")
    info = json.loads((tmp / "model" / "training_set.json").read_text())
    (tmp_path / "model" / "training_set.json").write_text(json.dumps({**info, "format_version": 7}))
    with pytest.raises(ValueError, match="format_version=7.*Upgrade"):
        load_training_set(tmp_path / "model", None)


def test_pickle_is_never_written(tmp_path):
    model = make_model()
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path / "m", safe_serialization=False)
    assert not (tmp_path / "m").exists() or not any((tmp_path / "m").glob("*.bin"))


def test_failed_save_leaves_the_previous_folder_intact(saved, monkeypatch):
    model, tokenizer, train, tmp = saved
    folder = tmp / "model"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    import hf_turnover.pipeline_turnover as pipeline_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pipeline_module, "save_training_set", broken)
    with pytest.raises(OSError, match="disk full"):
        save_turnover_model(model, folder, tokenizer=tokenizer, train_dataset=train)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not [p for p in tmp.iterdir() if p.name.startswith(".model.")]  # no temporary folder left


def test_card_is_written_inside_the_atomic_save_and_never_a_backbone_card(saved, tmp_path, monkeypatch):
    from hf_turnover import InfluencePipeline

    model, tokenizer, train, tmp = saved
    card = (tmp / "model" / "README.md").read_text()
    assert "turn-over" in card.lower()
    # A card that cannot be built fails before anything is written.
    monkeypatch.setattr("hf_turnover.hub.model_card", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        save_turnover_model(model, tmp_path / "never", tokenizer=tokenizer, train_dataset=train)
    assert not (tmp_path / "never").exists()
    # Re-saving a loaded turn-over model carries its card; a model built from a backbone folder does not get
    # that folder's card.
    loaded = TurnoverBertForSequenceClassification.from_pretrained(tmp / "model")
    InfluencePipeline(model=loaded, tokenizer=tokenizer).save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "README.md").read_text() == card
    backbone = tmp_path / "backbone"
    backbone.mkdir()
    (backbone / "README.md").write_text("# Some backbone's card")
    original, model.name_or_path = model.name_or_path, str(backbone)
    try:
        InfluencePipeline(model=model, tokenizer=tokenizer, train_dataset=train).save_pretrained(
            tmp_path / "new"
        )
    finally:
        model.name_or_path = original
    assert not (tmp_path / "new" / "README.md").exists()


def test_adapter_only_checkpoint_loads_on_its_pinned_backbone(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from hf_turnover.default_model import save_adapter_only
    from hf_turnover.modeling_turnover import file_sha256

    model = make_model().eval()
    package = tmp_path / "site" / "tiny_backbone"
    (package / "model").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    backbone = model.bert.state_dict()  # what the package ships: the backbone only, as BertModel keys
    backbone = {
        k: v.contiguous() for k, v in backbone.items() if "adapters." not in k and "prompt_tuning" not in k
    }
    save_file(backbone, str(package / "model" / "model.safetensors"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    reference = {
        "package": "tiny_backbone",
        "path": "model",
        "sha256": file_sha256(package / "model" / "model.safetensors"),
    }
    save_adapter_only(model, tmp_path / "adapter_only", reference)
    model.config.save_pretrained(package / "model")  # the backbone folder needs a config too
    loaded = TurnoverBertForSequenceClassification.from_pretrained(tmp_path / "adapter_only").eval()
    batch = {"input_ids": torch.tensor([[2, 7, 9, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())  # every weight, bit for bit
    with torch.no_grad(), turnover_context([4], "own"):
        # Same weights, but safetensors-loaded tensors may sit at other alignments, and the CPU GEMM picks
        # kernels by alignment: equal to float rounding.
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=1e-6, atol=1e-7)
    overridden = TurnoverBertForSequenceClassification.from_pretrained(
        tmp_path / "adapter_only", output_hidden_states=True
    )  # config overrides reach the config, as with any from_pretrained
    assert overridden.config.output_hidden_states
    save_adapter_only(model, tmp_path / "adapter_only", {**reference, "sha256": "0" * 64})
    with pytest.raises(ValueError, match="not the ones this checkpoint was trained on"):
        TurnoverBertForSequenceClassification.from_pretrained(tmp_path / "adapter_only")


def test_card_template_ships_inside_the_package():
    """Wheels carry package data only: the template under resources/ is (a link to) the one in model_cards/."""
    from hf_turnover.card import TEMPLATE

    assert TEMPLATE.is_relative_to(PACKAGE)
    assert TEMPLATE.read_text() == (PACKAGE.parent / "model_cards" / "turnover_model_card.md").read_text()
