"""Smoke tests of recipes/vision.py and recipes/lm_self_influence.py (recipes/cleansing.py: test_recipe_cleansing.py):
tiny settings, run in-process through each recipe's ``main(argv)``; the outputs must exist and hold sane values."""

from __future__ import annotations

import gzip
import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest

from hf_turnover.model import get_turnover_config
from hf_turnover.results import load_scores

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def flags(**options) -> list[str]:
    """``--name value`` command-line arguments, with the quick settings every smoke run shares."""
    options = {"disable_tqdm": "true", "seed": 0, **options}
    return [item for name, value in options.items() for item in (f"--{name}", str(value))]


@pytest.fixture
def recipe(monkeypatch):
    """Import a recipe as its script would run: with recipes/ on sys.path (for `from common import ...`)."""
    monkeypatch.syspath_prepend(str(RECIPES))
    return importlib.import_module


@pytest.fixture
def run_recipe(recipe, tmp_path):
    """Run ``recipes/<name>.py``'s ``main`` with quick settings, writing to ``tmp_path / name``:
    (the results it returns, the output folder)."""

    def run(name: str, **options) -> tuple[dict, Path]:
        out = tmp_path / name
        return recipe(name).main(flags(output_dir=out, **options)), out

    return run


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = bytes([0, 0, 8, array.ndim])  # 8: unsigned byte
    dims = np.asarray(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as handle:
        handle.write(magic + dims + array.astype(np.uint8).tobytes())


def test_vision_reads_idx_files(recipe, tmp_path):
    vision = recipe("vision_parts")
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 28, 28)), rng.integers(0, 10, 5)
    for prefix in ("train", "t10k"):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    arrays, classes = vision.load_fashion_mnist(str(tmp_path))
    np.testing.assert_array_equal(arrays["train"][0], images[:, None])
    np.testing.assert_array_equal(arrays["test"][1], labels)
    assert len(classes) == 10
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        vision.load_fashion_mnist(str(tmp_path / "missing"))


def test_vision_fashion_mnist_package_if_installed(recipe):
    vision = recipe("vision_parts")
    if not Path(vision.FASHION_MNIST_DIR, "t10k-labels-idx1-ubyte.gz").is_file():
        pytest.skip(
            "Debian's dataset-fashion-mnist is not installed (apt-get install -y dataset-fashion-mnist)"
        )
    arrays, _ = vision.load_fashion_mnist(vision.FASHION_MNIST_DIR)
    assert arrays["train"][0].shape == (60000, 1, 28, 28) and arrays["test"][1].shape == (10000,)
    assert set(np.unique(arrays["test"][1])) == set(range(10))


def test_vision_on_digits(run_recipe):
    masked = r"features\.conv2_\d+|classifier\.fc1"  # conv channels and dense units
    results, out = run_recipe(
        "vision", dataset="digits", max_train_samples=200, max_eval_samples=60, num_train_epochs=2,
        channels="8,16", hidden_size=32, turnover_target_modules=masked, num_explained=2, num_shown=1, top_k=2,
    )  # fmt: skip
    assert 0.0 <= results["accuracy_plain"] <= 1.0 and 0.0 <= results["accuracy_turnover"] <= 1.0
    assert results["turnover_layers"] == ["classifier.fc1", "features.conv2_1"]  # the later layers only
    explained = results["explained_test_ids"]
    assert 1 <= len(explained) <= 2, "an undertrained net misclassifies some of 60 test images"
    scores = load_scores(out / "influence.parquet").to_pandas()
    assert sorted(scores.target_id.unique()) == sorted(explained)
    assert scores.groupby("target_id").size().eq(4).all() and scores.train_id.between(0, 199).all()
    assert set(results["label_checks"]) == {
        "helpful_true_label",
        "harmful_predicted_label",
        "chance_true_label",
        "chance_predicted_label",
    }
    assert all(0.0 <= v <= 1.0 for v in results["label_checks"].values())
    assert (out / "misclassified_influence.png").stat().st_size > 0
    assert (out / "model" / "config.json").is_file()


def test_lm_instances_are_context_next_word_pairs(recipe):
    lm = recipe("lm_self_influence_parts")
    vocabulary = lm.build_vocabulary([["Good", "film", "."], ["good", "."]], min_frequency=2)
    assert vocabulary == [lm.BOS, lm.EOS, lm.UNK, ".", "good"]
    index = {w: i for i, w in enumerate(vocabulary)}
    rows = lm.instances([["Good", "film", "."]], index, context_size=2).to_pandas()
    # <s> <s> -> good, <s> good -> film (<unk>), good <unk> -> ".", <unk> . -> </s>
    assert [list(map(int, ids)) for ids in rows.input_ids] == [[0, 0], [0, 4], [4, 2], [2, 3]]
    assert rows.labels.tolist() == [4, 2, 3, 1] and rows.instance_id.tolist() == [0, 1, 2, 3]
    assert rows.position.tolist() == [0, 1, 2, 3] and rows.text_index.tolist() == [0, 0, 0, 0]


def test_lm_self_influence(recipe, run_recipe):
    lm = recipe("lm_self_influence")
    results, out = run_recipe(
        "lm_self_influence", max_train_samples=80, max_eval_samples=20, num_train_epochs=1, embedding_size=8,
        hidden_size=16, num_hidden_layers=2, num_rendered_texts=5, num_top=5,
    )  # fmt: skip
    texts, _ = lm.load_texts(lm.LMArguments(max_train_samples=80, max_eval_samples=20))
    assert results["num_train_instances"] == sum(len(t) + 1 for t in texts)
    scores = load_scores(out / "self_influence.parquet").to_pandas()
    assert scores.train_id.tolist() == list(range(results["num_train_instances"]))
    assert scores.score.notna().all() and (scores.score != 0).any()
    assert math.isfinite(results["validation_perplexity"]) and results["validation_perplexity"] > 1
    page = (out / "self_influence.html").read_text()
    assert page.count("<span") == sum(len(t) + 1 for t in texts[:5])
    top = json.loads((out / "top_self_influence.json").read_text())
    values = [r["self_influence"] for r in top["top_instances"]]
    assert len(values) == 5 and values == sorted(values, reverse=True) and values[0] == scores.score.max()
    model = lm.NGramLM.from_pretrained(out / "model")
    assert get_turnover_config(model).head_modules == r"hidden\.1|lm_head"  # both hidden layers' outputs
    assert (out / "self_influence.png").stat().st_size > 0


PUSH = """
import json, sys
sys.path.insert(0, sys.argv[1])
from common import RecipeTrainingArguments, push_outputs
from huggingface_hub import HfApi

args = RecipeTrainingArguments(output_dir=sys.argv[2], push_to_hub=True, hub_model_id="test-user/recipe-run")
assert not args.push_to_hub  # the Trainers never push; push_outputs does, once
push_outputs(sys.argv[2], args)
print(json.dumps(sorted(HfApi().list_repo_files("test-user/recipe-run"))))
"""


def test_push_outputs_puts_the_model_at_the_repo_root_beside_the_results(tmp_path):
    from hub_double import HubDouble
    from hub_fixtures import run_fresh

    out = tmp_path / "out"
    for name in (
        "model/config.json",
        "model/model.safetensors",
        "results.json",
        "figures/a.png",
        "cache/x.npy",
    ):
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(name)
    with HubDouble(tmp_path / "hub") as hub:
        files = run_fresh(
            PUSH, tmp_path, hub.client_env(tmp_path / "home"), str(RECIPES), str(out), block=False
        )
    assert set(files) - {".gitattributes"} == {
        "config.json",
        "model.safetensors",
        "results.json",
        "figures/a.png",
    }
