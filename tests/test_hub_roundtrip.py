"""Hub round trip against the local TEST DOUBLE (tests/hub_double.py): push the model, the pipeline and influence
results; load them back in a fresh process without hf_turnover; same scores. Plus a real-Hub test that runs only
when HF_TOKEN is set (it creates a private repo and deletes it).

huggingface_hub reads HF_ENDPOINT at import time, so pushing and loading run in subprocesses.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest
from hub_fixtures import make_saved, run_fresh

try:
    from tests.hub_double import DEFAULT_TOKEN, HubDouble
except ImportError:  # pytest put tests/ itself on sys.path
    from hub_double import DEFAULT_TOKEN, HubDouble  # type: ignore[no-redef]

from hf_turnover import estimate_influence, save_scores
from hf_turnover.pipeline_turnover import InfluencePipeline

TEXTS = ["w1 w2 w3", "w12 w14 w16 w2"]

PUSH = """
import json, sys
from hf_turnover import load_scores, push_scores
from hf_turnover.hub import push_turnover_model
from hf_turnover.modeling_turnover import TurnoverBertForSequenceClassification
from hf_turnover.pipeline_turnover import InfluencePipeline
from hf_turnover.training_set import load_training_set
from transformers import AutoTokenizer

folder, model_repo, pipe_repo, scores_repo, scores_file = sys.argv[1:6]
model = TurnoverBertForSequenceClassification.from_pretrained(folder)
tokenizer = AutoTokenizer.from_pretrained(folder)
train = load_training_set(folder, model.config.turnover_training)
push_turnover_model(model, model_repo, tokenizer=tokenizer, train_dataset=train, card={"accuracy": 0.5}, private=True)
InfluencePipeline(model=model, tokenizer=tokenizer, train_dataset=train).push_to_hub(pipe_repo, private=True)
push_scores(load_scores(scores_file), scores_repo, private=True)
print(json.dumps({"ok": True}))
"""

LOAD = """
import json, sys
import datasets
from huggingface_hub import HfApi, hf_hub_download
from transformers import AutoModelForSequenceClassification, pipeline

model_repo, pipe_repo, scores_repo, texts, target = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), json.loads(sys.argv[5])
out = {"files": sorted(HfApi().list_repo_files(model_repo))}
out["from_model_repo"] = pipeline(model=model_repo, trust_remote_code=True)(texts, top_k=3, method="exact")
out["from_pipe_repo"] = pipeline(model=pipe_repo, trust_remote_code=True)(texts, top_k=3, restrict_to_label=True, method="exact")
model = AutoModelForSequenceClassification.from_pretrained(model_repo, trust_remote_code=True)
train = datasets.Dataset.from_parquet(hf_hub_download(model_repo, "training_set.parquet"))
scores = model.estimate_influence(train, [target], method="exact", progress=False)
out["scores"] = dict(zip(map(str, scores["train_id"]), scores["score"]))
pushed = datasets.Dataset.from_parquet(hf_hub_download(scores_repo, "influence.parquet", repo_type="dataset"))
out["pushed_scores"] = dict(zip(map(str, pushed["train_id"]), pushed["score"]))
out["card_has_fingerprint"] = model.config.turnover_training["sha256"] in open(hf_hub_download(model_repo, "README.md")).read()
out["hf_turnover_imported"] = any(m.startswith("hf_turnover") for m in sys.modules)
print(json.dumps(out))
"""

# A private repo loaded in a process that has no token of its own: only the token given to pipeline() opens it,
# and it must reach the training-set download too.
LOAD_PRIVATE = """
import json, sys
from transformers import pipeline
model_repo, token, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = {}
try:
    pipeline(model=model_repo, trust_remote_code=True)
    out["without_token"] = "loaded"
except Exception as error:
    out["without_token"] = type(error).__name__
out["with_token"] = pipeline(model=model_repo, token=token, trust_remote_code=True)(texts, top_k=3, method="exact")
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("roundtrip")
    model, tokenizer, train = make_saved(tmp)
    pipe = InfluencePipeline(model=model, tokenizer=tokenizer, train_dataset=train)
    target = {**dict(tokenizer(TEXTS[1])), "label": 1}
    scores = estimate_influence(model, train, [target], method="exact", progress=False)
    save_scores(scores, tmp / "scores.parquet")
    return pipe, target, scores, tmp


def test_push_and_load_back_through_the_hub_double(local):
    pipe, target, scores, tmp = local
    with HubDouble(tmp / "hub") as hub:
        env = hub.client_env(tmp / "push_home")
        repos = [
            "test-user/tiny-turnover",
            "test-user/tiny-turnover-pipeline",
            "test-user/tiny-turnover-scores",
        ]
        run_fresh(PUSH, tmp, env, str(tmp / "model"), *repos, str(tmp / "scores.parquet"), block=False)
        load_env = hub.client_env(tmp / "load_home")  # a fresh cache: everything comes from the double
        out = run_fresh(LOAD, tmp, load_env, *repos, json.dumps(TEXTS), json.dumps(target))
        no_token_env = {k: v for k, v in hub.client_env(tmp / "private_home").items() if k != "HF_TOKEN"}
        private = run_fresh(LOAD_PRIVATE, tmp, no_token_env, repos[0], DEFAULT_TOKEN, json.dumps(TEXTS))
    assert private["without_token"] in ("OSError", "RepositoryNotFoundError")
    assert private["with_token"] == json.loads(json.dumps(pipe(TEXTS, top_k=3, method="exact")))
    assert not out["hf_turnover_imported"]
    assert {
        "model.safetensors",
        "modeling_turnover.py",
        "pipeline_turnover.py",
        "training_set.parquet",
    } <= set(out["files"])
    assert out["from_model_repo"] == json.loads(json.dumps(pipe(TEXTS, top_k=3, method="exact")))
    assert out["from_pipe_repo"] == json.loads(
        json.dumps(pipe(TEXTS, top_k=3, restrict_to_label=True, method="exact"))
    )
    expected = dict(zip(map(str, scores["train_id"]), scores["score"], strict=True))
    assert out["scores"] == expected and out["pushed_scores"] == expected
    assert out["card_has_fingerprint"]


@pytest.mark.skipif(
    not os.environ.get("HF_TOKEN"), reason="needs HF_TOKEN (pushes to a real private Hub repo)"
)
def test_push_to_a_real_private_repo(local):
    pipe, target, scores, tmp = local
    env = {k: v for k, v in os.environ.items() if k not in ("HF_ENDPOINT", "HF_HUB_OFFLINE", "PYTHONPATH")}
    env["HF_HOME"] = str(tmp / "real_home")
    from huggingface_hub import HfApi

    api = HfApi()
    user = api.whoami()["name"]
    repos = [f"{user}/hf-turnover-test-{uuid.uuid4().hex[:8]}{suffix}" for suffix in ("", "-pipe", "-scores")]
    try:
        run_fresh(PUSH, tmp, env, str(tmp / "model"), *repos, str(tmp / "scores.parquet"), block=False)
        assert api.model_info(repos[0]).private
        out = run_fresh(LOAD, tmp, env, *repos, json.dumps(TEXTS), json.dumps(target))
        assert out["from_model_repo"] == json.loads(json.dumps(pipe(TEXTS, top_k=3, method="exact")))
        assert out["scores"] == dict(zip(map(str, scores["train_id"]), scores["score"], strict=True))
    finally:
        for repo, kind in zip(repos, ("model", "model", "dataset"), strict=True):
            api.delete_repo(repo, repo_type=kind, missing_ok=True)


PUSH_DEFAULT = """
import json, sys
from transformers import AutoTokenizer
from hf_turnover.default_model import DEFAULT_MODEL_DIR, load_default_model
from hf_turnover.hub import push_turnover_model
from hf_turnover.modeling_turnover import resolve_base_model
from hf_turnover.training_set import load_training_set

model = load_default_model()
tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(model.config.turnover_base_model))
train = load_training_set(DEFAULT_MODEL_DIR, model.config.turnover_training)
push_turnover_model(model, sys.argv[1], tokenizer=tokenizer, train_dataset=train, private=True)
print(json.dumps({"ok": True}))
"""

LOAD_DEFAULT = """
import json, sys
import datasets
from huggingface_hub import hf_hub_download
from transformers import AutoModelForSequenceClassification, pipeline

repo, target, ids, texts = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
model = AutoModelForSequenceClassification.from_pretrained(repo, trust_remote_code=True)
train = datasets.Dataset.from_parquet(hf_hub_download(repo, "training_set.parquet"))
out = {"hf_turnover_imported": "hf_turnover" in sys.modules}
for method in ("exact", "linear"):
    scores = model.estimate_influence(train, [target], train_ids=ids, method=method, progress=False)
    out[method] = dict(zip(map(str, scores["train_id"]), scores["score"]))
out["explained"] = pipeline(model=repo, trust_remote_code=True)(texts, top_k=3)
print(json.dumps(out))
"""


def test_default_model_round_trips_through_push_and_remote_code(tmp_path):
    """The embedded default, pushed to the test double as a full model and loaded back by a process without
    hf_turnover: the same exact scores bit for bit, linear scores and explanations to float rounding."""
    from test_pipeline import assert_close
    from transformers import AutoTokenizer

    from hf_turnover.default_model import DEFAULT_MODEL_DIR, load_default_model
    from hf_turnover.modeling_turnover import resolve_base_model
    from hf_turnover.training_set import load_training_set

    model = load_default_model()
    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model(model.config.turnover_base_model))
    train = load_training_set(DEFAULT_MODEL_DIR, model.config.turnover_training)
    target = {**dict(tokenizer("A gorgeous, witty, seductive movie.")), "label": 1}
    ids = [int(i) for i in train.select(range(40))["instance_id"]]
    local = {
        method: estimate_influence(model, train, [target], train_ids=ids, method=method, progress=False)
        for method in ("exact", "linear")
    }
    texts = ["A gorgeous, witty, seductive movie.", "The plot is a mess."]
    explained = InfluencePipeline(model=model, tokenizer=tokenizer, train_dataset=train)(texts, top_k=3)
    with HubDouble(tmp_path / "hub") as hub:
        run_fresh(PUSH_DEFAULT, tmp_path, hub.client_env(tmp_path / "push"), "test-user/default", block=False)
        args = ("test-user/default", json.dumps(target), json.dumps(ids), json.dumps(texts))
        out = run_fresh(LOAD_DEFAULT, tmp_path, hub.client_env(tmp_path / "load"), *args)
    assert not out["hf_turnover_imported"]
    exact = dict(zip(map(str, local["exact"]["train_id"]), local["exact"]["score"], strict=True))
    assert out["exact"] == exact and len(exact) == 40
    linear = dict(zip(map(str, local["linear"]["train_id"]), local["linear"]["score"], strict=True))
    assert out["linear"] == pytest.approx(linear, rel=1e-4, abs=1e-6)
    assert_close(out["explained"], json.loads(json.dumps(explained)), tol=1e-5)
