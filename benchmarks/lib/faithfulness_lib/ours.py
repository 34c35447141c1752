"""Turn-over estimates through the public API, the variance-reduction experiments, and the diagnosis.

Variants scored here:
- ``own`` (the paper), ``full`` (footnote 4): :func:`hf_turnover.estimate_influence`.
- ``ensemble``: :func:`hf_turnover.variants.average_scores` over independently seeded models.
- ``null-mask control variate``: regress each target's scores on the mask bits, fitted on ids that were never
  trained (pure mask luck), and keep the residual.
- ``minus init``: subtract the scores the same masks get from the untrained initial model (the init's share of
  mask luck).
"""

from __future__ import annotations

import datasets
import numpy as np
import torch
import torch.nn.functional as F

from hf_turnover.evaluation import score_matrix
from hf_turnover.influence import estimate_influence, self_influence
from hf_turnover.masks import keep_bits, mask_values
from hf_turnover.variants import average_scores

from .batched import MASKED_LAYER, Stack, init_stack, turnover_config

NULL_ID_OFFSET = 1 << 40  # ids far above any training id: masks nobody trained with


def as_targets(x: torch.Tensor, y: torch.Tensor) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"features": x.numpy(), "labels": y.numpy()})


def as_train(x: torch.Tensor, y: torch.Tensor) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {"instance_id": np.arange(len(y)), "features": x.numpy(), "labels": y.numpy()}
    )


def turnover_result(stack: Stack, seed: int, targets: datasets.Dataset, ids, variant: str = "own"):
    model = stack.module(0, turnover_config(seed))
    return estimate_influence(model, None, targets, train_ids=[int(i) for i in ids], variant=variant,
                              check_fingerprint=False, progress=False)  # fmt: skip


def turnover_scores(stack: Stack, seed: int, targets: datasets.Dataset, num_train: int, variant: str = "own"):
    """(T, N) ``I(z_t, z_i)`` of one model, through ``estimate_influence``."""
    ids = np.arange(num_train)
    return score_matrix(turnover_result(stack, seed, targets, ids, variant), range(len(targets)), ids)[0]


def ensemble_scores(models: list[tuple[Stack, int]], targets: datasets.Dataset, num_train: int) -> np.ndarray:
    ids = np.arange(num_train)
    averaged = average_scores([turnover_result(stack, seed, targets, ids) for stack, seed in models])
    return score_matrix(averaged, range(len(targets)), ids)[0]


def mask_features(ids: np.ndarray, hidden: int, seed: int) -> np.ndarray:
    """Centred keep-bits of the masked layer plus an intercept, (len(ids), H + 1)."""
    bits = keep_bits(torch.as_tensor(ids, dtype=torch.int64), hidden, MASKED_LAYER, p=0.5, seed=seed)
    return np.c_[bits.numpy().astype(np.float64) - 0.5, np.ones(len(ids))]


def null_mask_adjusted(stack: Stack, seed: int, targets, scores: np.ndarray, num_null: int) -> np.ndarray:
    """Residual of each target's scores after the linear mask-luck model fitted on ``num_null`` untrained ids."""
    hidden = stack.b1.shape[1]
    null_ids = NULL_ID_OFFSET + np.arange(num_null)
    null_scores = score_matrix(
        turnover_result(stack, seed, targets, null_ids), range(len(targets)), null_ids
    )[0]
    coef = np.linalg.lstsq(mask_features(null_ids, hidden, seed), null_scores.T, rcond=None)[0]  # (H + 1, T)
    return scores - (mask_features(np.arange(scores.shape[1]), hidden, seed) @ coef).T


def minus_init(seed: int, shape: tuple[int, int, int], targets, scores: np.ndarray) -> np.ndarray:
    """Scores minus those of the initial (untrained) parameters under the same masks."""
    start = init_stack(*shape, 1, seed)
    return scores - turnover_scores(start, seed, targets, scores.shape[1])


def mask_luck_r2(hidden: int, seed: int, scores: np.ndarray) -> float:
    """Share of the variance of each target's scores (T, N) explained by a linear function of the mask bits."""
    x = mask_features(np.arange(scores.shape[1]), hidden, seed)
    residual = scores.T - x @ np.linalg.lstsq(x, scores.T, rcond=None)[0]
    return float(1 - (residual**2).sum() / ((scores.T - scores.T.mean(0)) ** 2).sum())


@torch.no_grad()
def scores_under_models(stack: Stack, models: list[int], ids: list[int], seed: int, x_t, y_t) -> np.ndarray:
    """(T, L): the own-vs-flip score of mask ``ids[j]`` computed with model ``models[j]`` of ``stack``."""
    bits = keep_bits(
        torch.as_tensor(ids, dtype=torch.int64), stack.b1.shape[1], MASKED_LAYER, p=0.5, seed=seed
    )
    losses = {}
    for mode in ("flip", "own"):
        mask = mask_values(bits, mode, 0.5, torch.float32)  # (L, H)
        w1, b1, w2, b2 = stack.w1[:, models], stack.b1[models], stack.w2[models], stack.b2[models]
        hidden = torch.relu(torch.einsum("td,dlh->tlh", x_t, w1) + b1) * mask[None]  # (T, L, H)
        logits = torch.einsum("tlh,lhc->tlc", hidden, w2) + b2
        losses[mode] = F.cross_entropy(
            logits.transpose(1, 2), y_t[:, None].expand(-1, len(ids)), reduction="none"
        )
    return (losses["flip"] - losses["own"]).double().numpy()


def signal_and_luck(
    loo_stack: Stack, removed: np.ndarray, seed: int, x_t, y_t
) -> tuple[np.ndarray, np.ndarray]:
    """Split each score into the part z_i caused and mask luck, using the leave-one-out models.

    ``luck[t, j]``: the score of z_j's mask in the model retrained WITHOUT z_j (nothing of z_j in it);
    ``signal = score - luck``: what training on z_j added. Model 0 of ``loo_stack`` is the reference model and
    model ``j + 1`` the one without ``removed[j]``.
    """
    ids = [int(i) for i in removed]
    score = scores_under_models(loo_stack, [0] * len(ids), ids, seed, x_t, y_t)
    luck = scores_under_models(loo_stack, list(range(1, len(ids) + 1)), ids, seed, x_t, y_t)
    return score - luck, luck


def turnover_self(stack: Stack, seed: int, train: datasets.Dataset, variant: str = "own") -> np.ndarray:
    """(N,) self-influence ``I(z_i, z_i)`` through :func:`hf_turnover.self_influence`."""
    model = stack.module(0, turnover_config(seed))
    result = self_influence(model, train, variant=variant, check_fingerprint=False, progress=False)
    return np.asarray(result.sort("train_id")["score"], dtype=np.float64)
