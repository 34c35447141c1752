"""Pieces of `recipes/lm_self_influence.py`: the n-gram language model, its instances, and the reports."""

from __future__ import annotations

import html
import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from common import SmallPreTrainedModel, markdown_table, pyplot, save_figure, write_json
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_outputs import CausalLMOutput

from hf_turnover.atomic import atomic_write_text
from hf_turnover.data import load_text_classification

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
TOKEN = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


class NGramLMConfig(PretrainedConfig):
    model_type = "turnover_ngram_lm"

    def __init__(
        self,
        vocab_size: int = 1000,
        context_size: int = 3,
        embedding_size: int = 64,
        hidden_size: int = 256,
        num_hidden_layers: int = 1,
        hidden_dropout_prob: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocab_size, self.context_size, self.embedding_size = vocab_size, context_size, embedding_size
        self.hidden_size, self.num_hidden_layers = hidden_size, num_hidden_layers
        self.hidden_dropout_prob = hidden_dropout_prob


class NGramLM(SmallPreTrainedModel):
    """Bengio et al. (2003): context embeddings -> tanh hidden layers (``hidden.{i}``) -> ``lm_head`` logits."""

    config_class = NGramLMConfig

    def __init__(self, config: NGramLMConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_size)
        sizes = [config.context_size * config.embedding_size] + [
            config.hidden_size
        ] * config.num_hidden_layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:], strict=True))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> CausalLMOutput:
        hidden = self.embeddings(input_ids).flatten(1)  # (B, n-1) -> (B, (n-1) * E)
        for layer in self.hidden:
            hidden = self.dropout(torch.tanh(layer(hidden)))  # (B, H)
        logits = self.lm_head(hidden)  # (B, V)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return CausalLMOutput(loss=loss, logits=logits)


def tokenize(text: str) -> list[str]:
    """Words (with their apostrophe suffix) and punctuation marks, case kept for display."""
    return TOKEN.findall(text)


def load_texts(args: Any) -> tuple[list[list[str]], list[list[str]]]:
    """Tokenized training and validation texts (empty texts dropped)."""
    corpus = load_text_classification(args.dataset_name, args.dataset_config_name)
    out = []
    for split, limit in (("train", args.max_train_samples), ("validation", args.max_eval_samples)):
        column = args.text_column or next(c for c in ("sentence", "text") if c in corpus[split].column_names)
        texts = [tokenize(t) for t in corpus[split][column]]
        out.append([t for t in texts if t][:limit])
    return out[0], out[1]


def build_vocabulary(texts: list[list[str]], min_frequency: int) -> list[str]:
    counts = Counter(w.lower() for text in texts for w in text)
    words = sorted((w for w, c in counts.items() if c >= min_frequency), key=lambda w: (-counts[w], w))
    return [BOS, EOS, UNK, *words]


def instances(texts: list[list[str]], vocab: dict[str, int], context_size: int) -> datasets.Dataset:
    """One row per (context -> next word) pair, the end-of-text marker included; ``instance_id`` = row."""
    rows = {"input_ids": [], "labels": [], "text_index": [], "position": []}
    for index, text in enumerate(texts):
        ids = [vocab[BOS]] * context_size + [vocab.get(w.lower(), vocab[UNK]) for w in text] + [vocab[EOS]]
        for position in range(len(text) + 1):
            rows["input_ids"].append(ids[position : position + context_size])
            rows["labels"].append(ids[position + context_size])
            rows["text_index"].append(index)
            rows["position"].append(position)
    rows["instance_id"] = list(range(len(rows["labels"])))
    return datasets.Dataset.from_dict(rows)


def color(score: float, scale: float) -> tuple[float, float, float]:
    """White at 0, red for positive (the word is fit through itself), blue for negative."""
    t = min(abs(score) / scale, 1.0) if scale > 0 else 0.0
    return (1.0, 1 - t, 1 - t) if score > 0 else (1 - t, 1 - t, 1.0)


def render_html(texts, train, scores: np.ndarray, vocabulary: list[str], count: int, scale: float) -> str:
    spans = []
    positions = np.asarray(train["text_index"])
    for index in range(min(count, len(texts))):
        words = texts[index] + [EOS]
        line = []
        for word, score in zip(words, scores[positions == index], strict=True):
            rgb = ",".join(str(round(255 * c)) for c in color(score, scale))
            line.append(
                f'<span style="background:rgb({rgb})" title="self-influence {score:+.4f}">{html.escape(word)}</span>'
            )
        spans.append(f"<p>{' '.join(line)}</p>")
    legend = (
        f"<p>Each token is colored by the self-influence of the training instance that predicts it from the "
        f"previous words: red positive (fit only through itself), blue negative; full color at |score| >= "
        f"{scale:.3f}. Hover for the value. Vocabulary {len(vocabulary)} words.</p>"
    )
    return f"<!DOCTYPE html><html><meta charset='utf-8'><body style='font-family:sans-serif'>{legend}{''.join(spans)}</body></html>\n"


def render_png(texts, train, scores: np.ndarray, count: int, scale: float, path: Path) -> None:
    """The first ``count`` texts as colored words (a picture of the HTML for the README)."""
    fig = pyplot().figure(figsize=(10, 0.5 * count + 0.5))
    renderer = fig.canvas.get_renderer()
    positions = np.asarray(train["text_index"])
    x, y, line_height = 0.01, 0.98, 1.0 / (1.6 * count + 1)
    for index in range(min(count, len(texts))):
        for word, score in zip(texts[index] + [EOS], scores[positions == index], strict=True):
            label = fig.text(
                x, y, word, fontsize=9, va="top", bbox={"fc": color(score, scale), "ec": "none", "pad": 1}
            )
            width = label.get_window_extent(renderer).width / fig.bbox.width + 0.006
            if x + width > 0.97:  # wrap: move this word to the next line
                x, y = 0.01, y - line_height
                label.set_position((x, y))
            x += width
        x, y = 0.01, y - 1.6 * line_height
    save_figure(fig, path)


def top_lists(train, scores: np.ndarray, vocabulary: list[str], texts, num_top: int) -> dict:
    order = np.argsort(-scores, kind="stable")[:num_top]
    context_ids, labels = list(train["input_ids"]), np.asarray(train["labels"])
    top_instances = []
    for i in order:
        words = texts[train[int(i)]["text_index"]] + [EOS]
        top_instances.append(
            {
                "instance_id": int(i),
                "self_influence": float(scores[i]),
                "context": " ".join(vocabulary[t] for t in context_ids[i]),
                "word": words[train[int(i)]["position"]],
                "vocabulary_word": vocabulary[labels[i]],
            }
        )
    frequency = np.bincount(labels, minlength=len(vocabulary))
    mean = np.bincount(labels, weights=scores, minlength=len(vocabulary)) / np.maximum(frequency, 1)
    frequent = np.flatnonzero(frequency >= 5)  # a mean over at least 5 occurrences
    top_words = [
        {"word": vocabulary[w], "mean_self_influence": float(mean[w]), "count": int(frequency[w])}
        for w in frequent[np.argsort(-mean[frequent], kind="stable")][:num_top]
    ]
    rank = lambda a: np.argsort(np.argsort(a, kind="stable"), kind="stable")  # noqa: E731
    spearman = float(np.corrcoef(rank(frequency[labels]), rank(scores))[0, 1])
    return {
        "top_instances": top_instances,
        "top_words": top_words,
        "spearman_frequency_vs_self_influence": spearman,
    }


def top_markdown(top: dict) -> str:
    instances_table = markdown_table(
        ["instance", "self-influence", "context", "next word"],
        [
            [r["instance_id"], f"{r['self_influence']:+.3f}", r["context"], r["word"]]
            for r in top["top_instances"]
        ],
    )
    words_table = markdown_table(
        ["word", "mean self-influence", "occurrences"],
        [[r["word"], f"{r['mean_self_influence']:+.3f}", r["count"]] for r in top["top_words"]],
    )
    return (
        "# Highest self-influence\n\n## Training instances (context -> next word)\n\n"
        + instances_table
        + "\n## Words (mean over their occurrences as the predicted word, at least 5)\n\n"
        + words_table
        + f"\nSpearman correlation between a word's training frequency and the self-influence of the instances "
        f"predicting it: {top['spearman_frequency_vs_self_influence']:+.3f}.\n"
    )


@torch.inference_mode()
def perplexity(model: nn.Module, data: datasets.Dataset, batch_size: int = 4096) -> float:
    model.eval()
    device, total = next(model.parameters()).device, 0.0
    for start in range(0, len(data), batch_size):
        rows = data[start : start + batch_size]
        inputs = torch.tensor(rows["input_ids"], device=device)
        logits = model(input_ids=inputs).logits
        total += F.cross_entropy(logits, torch.tensor(rows["labels"], device=device), reduction="sum").item()
    return math.exp(total / len(data))


def write_reports(args: Any, output: Path, texts, train, vocabulary: list[str], values: np.ndarray) -> dict:
    """The colored HTML and PNG, and the top self-influence lists (Markdown and JSON); returns the lists."""
    scale = float(np.quantile(np.abs(values), 0.99))  # full color from the 99th percentile of |score|
    page = render_html(texts, train, values, vocabulary, args.num_rendered_texts, scale)
    atomic_write_text(output / "self_influence.html", page)
    render_png(texts, train, values, 8, scale, output / "self_influence.png")
    top = top_lists(train, values, vocabulary, texts, args.num_top)
    atomic_write_text(output / "top_self_influence.md", top_markdown(top))
    write_json(output / "top_self_influence.json", top)
    return top
