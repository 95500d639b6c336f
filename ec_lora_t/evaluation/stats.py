"""The statistics of a sweep: rank correlation, slope, range ratio, a blocked permutation test
and the block-bootstrap standard error of the rank correlation.

Pure functions of (target, score) arrays, so they can be tested on tables whose answer is known.
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats


def spearman(target: np.ndarray, predicted: np.ndarray) -> float:
    """Spearman rank correlation over all images; NaN where either side is constant."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        return float(stats.spearmanr(target, predicted).statistic)


def block_bootstrap_se(
    target: np.ndarray, predicted: np.ndarray, blocks: np.ndarray, *, resamples: int = 999, seed: int = 0
) -> float:
    """Block-bootstrap standard error of `spearman(target, predicted)`: how much the figure would move
    with other prompts and sampling seeds of the same kind.

    Whole blocks (the (prompt, seed) pairs of the permutation test) are resampled with replacement,
    because the images of one block share their initial noise and are not independent draws
    (`scipy.stats.bootstrap` over block indices). Drawing the same adapter at other sampling seeds
    moved its ground-truth Spearman by up to 0.12 (docs/research.md, 16y and 16z); this puts a
    number on that noise for every run. NaN with fewer than 2 blocks or a constant side.
    """
    target = np.asarray(target, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64)
    block_rows = list(pd.Series(np.arange(len(target))).groupby(np.asarray(blocks)).indices.values())
    if len(block_rows) < 2 or np.ptp(target) == 0 or np.ptp(predicted) == 0:
        return math.nan
    sizes = {len(rows) for rows in block_rows}
    if len(sizes) == 1:
        # Blocks of one size (every sweep's): all resamples at once, a row of row indices each.
        block_matrix = np.stack(block_rows)

        def statistic(chosen: np.ndarray, axis: int = -1) -> np.ndarray:
            rows = block_matrix[chosen].reshape(*chosen.shape[:-1], -1)
            return _rowwise_spearman(target[rows], predicted[rows])
    else:
        def statistic(chosen: np.ndarray) -> float:
            return spearman(*(side[np.concatenate([block_rows[i] for i in chosen])] for side in (target, predicted)))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)  # a resample of constant scores
        result = stats.bootstrap((np.arange(len(block_rows)),), statistic, vectorized=len(sizes) == 1,
                                 n_resamples=resamples, method="percentile", random_state=seed)
    return float(result.standard_error)


def _rowwise_spearman(target: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Spearman of each row pair (average ranks for ties, as `spearman`); NaN where a row is constant."""
    ranks = [stats.rankdata(side, axis=-1) for side in (target, predicted)]
    ranks = [rank - rank.mean(axis=-1, keepdims=True) for rank in ranks]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (ranks[0] * ranks[1]).sum(-1) / np.sqrt((ranks[0] ** 2).sum(-1) * (ranks[1] ** 2).sum(-1))


def slope(target: np.ndarray, predicted: np.ndarray) -> float:
    """Least-squares slope of predicted on target: 1 for a predictor that tracks the target 1:1."""
    target = np.asarray(target, dtype=np.float64)
    if np.ptp(target) == 0:
        raise ValueError("slope needs at least 2 distinct targets")
    return float(stats.linregress(target, np.asarray(predicted, dtype=np.float64)).slope)


def target_table(target: np.ndarray, predicted: np.ndarray) -> pd.DataFrame:
    """Per target: mean, population std and count of the predictions (the report's table, with spread)."""
    frame = pd.DataFrame({"target": np.asarray(target, dtype=np.float64), "predicted": predicted})
    table = frame.groupby("target")["predicted"].agg(mean="mean", std=lambda v: float(np.std(v)), n="size")
    return table.reset_index()


def range_ratio(target: np.ndarray, predicted: np.ndarray) -> float:
    """(max - min of the per-target mean prediction) / (max - min target).

    Per-target means, not single images, so that seed-to-seed noise does not pass for range.
    1 where the predictions span the targets; the report's sweep gives (0.0827 - 0.0549) / 1 = 0.028.
    """
    target = np.asarray(target, dtype=np.float64)
    if np.ptp(target) == 0:
        raise ValueError("range_ratio needs at least 2 distinct targets")
    means = target_table(target, predicted)["mean"]
    return float((means.max() - means.min()) / np.ptp(target))


@dataclass(frozen=True)
class PermutationTest:
    statistic: float  # observed Spearman
    p_value: float  # one-sided, alternative: Spearman > 0
    num_permutations: int
    exact: bool  # every within-block arrangement enumerated (no Monte Carlo error)


def permutation_test_spearman(
    target: np.ndarray,
    predicted: np.ndarray,
    blocks: np.ndarray | None = None,
    *,
    permutations: int = 1000,
    seed: int = 0,
) -> PermutationTest:
    """One-sided permutation test of Spearman(target, predicted) > 0, targets shuffled within blocks.

    Blocks are the (prompt, seed) pairs: images of one prompt and seed share their initial noise
    and differ only by the target, so under "the target has no effect" their targets are
    exchangeable within the block, but not across blocks. (scipy.stats.permutation_test
    shuffles freely and has no strata, hence this function.) Where all arrangements number at
    most `permutations` they are enumerated and the p-value is exact; otherwise it is the
    Monte Carlo estimate (1 + #{null >= observed}) / (1 + permutations), which is never 0.
    A constant side gives statistic NaN and p-value 1.
    """
    target_rank = stats.rankdata(np.asarray(target, dtype=np.float64))
    predicted_rank = stats.rankdata(np.asarray(predicted, dtype=np.float64))
    if len(target_rank) != len(predicted_rank):
        raise ValueError(f"target has {len(target_rank)} values, predicted has {len(predicted_rank)}")
    blocks = np.zeros(len(target_rank), dtype=np.int64) if blocks is None else np.asarray(blocks)
    if len(blocks) != len(target_rank):
        raise ValueError(f"blocks has {len(blocks)} values, target has {len(target_rank)}")
    if np.ptp(target_rank) == 0 or np.ptp(predicted_rank) == 0:
        return PermutationTest(statistic=math.nan, p_value=1.0, num_permutations=0, exact=True)

    # Spearman is Pearson on ranks; permuting targets within blocks permutes their global ranks,
    # so every null statistic is one dot product with the centred predicted ranks.
    centred_predicted = predicted_rank - predicted_rank.mean()
    centred_predicted /= np.linalg.norm(centred_predicted)
    centred_target = target_rank - target_rank.mean()
    scale = np.linalg.norm(centred_target)
    observed = float(centred_target @ centred_predicted / scale)

    block_rows = [np.flatnonzero(blocks == block) for block in np.unique(blocks)]
    num_arrangements = math.prod(math.factorial(len(rows)) for rows in block_rows)
    exact = num_arrangements <= permutations
    if exact:
        null = np.empty(num_arrangements)
        for i, orders in enumerate(itertools.product(*(itertools.permutations(rows) for rows in block_rows))):
            permuted = np.empty_like(centred_target)
            for rows, order in zip(block_rows, orders):
                permuted[rows] = centred_target[list(order)]
            null[i] = permuted @ centred_predicted / scale
    else:
        rng = np.random.default_rng(seed)
        permuted = np.empty((permutations, len(centred_target)))
        for rows in block_rows:
            permuted[:, rows] = rng.permuted(np.broadcast_to(centred_target[rows], (permutations, len(rows))), axis=1)
        null = permuted @ centred_predicted / scale
    # Tolerance: the identity arrangement must count as "at least as extreme" despite rounding.
    at_least_observed = int(np.sum(null >= observed - 1e-12))
    p_value = at_least_observed / num_arrangements if exact else (1 + at_least_observed) / (1 + permutations)
    return PermutationTest(
        statistic=observed, p_value=float(p_value), num_permutations=int(len(null)), exact=bool(exact)
    )
