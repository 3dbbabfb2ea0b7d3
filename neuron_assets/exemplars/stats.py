"""Per-feature statistics of the exemplar pass: running sums over every counted train token,
a uniform sample of train tokens for approximate quantiles, and delphi's positional and
unigram filters."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import torch

from neuron_assets.config import ExemplarsConfig
from neuron_assets.exemplars.batches import CountedRanges
from neuron_assets.types import Polarity

STAT_QUANTILES = (0.5, 0.9, 0.99, 0.999)
POSITION_BINS = 10  # position bins of the positional filter


def quantile_column(q: float) -> str:
    """0.5 -> q50, 0.99 -> q99, 0.999 -> q999."""
    return "q" + f"{q * 100:g}".replace(".", "")


class TokenStats:
    """Running sums over every counted train token, and a uniform sample of train tokens (the
    same tokens for every feature, with their token ids and positions after the prefix) for
    approximate quantiles and the positional and unigram filters."""

    SUMS = ("sum", "sumsq", "n_pos", "n_neg", "n_tokens")

    def __init__(self, sums: dict, token_keys, token_values, token_ids, token_positions):
        self.sums, self.token_keys, self.token_values = sums, token_keys, token_values
        self.token_ids, self.token_positions = token_ids, token_positions  # -1: not known (an older checkpoint)

    @classmethod
    def fresh(cls, features, sample_size, device, dtype) -> TokenStats:
        sums = {name: torch.zeros(features, dtype=torch.float64, device=device) for name in cls.SUMS[:-1]}
        sums["n_tokens"] = torch.zeros((), dtype=torch.float64, device=device)
        return cls(sums, torch.full((sample_size,), -torch.inf, device=device),
                   torch.zeros((sample_size, features), dtype=dtype, device=device),
                   torch.full((sample_size,), -1, dtype=torch.long, device=device),
                   torch.full((sample_size,), -1, dtype=torch.long, device=device))

    def entering(self, counted, token_keys):
        """Which batch tokens replace which sample rows: (leaving rows, batch rows, positions,
        keys), or None. Only keys are compared, once per batch for every feature."""
        better = counted & (token_keys > self.token_keys.min())
        if not better.any():
            return None
        size = self.token_keys.shape[0]
        candidates = token_keys[better]
        chosen = torch.zeros(size + candidates.shape[0], dtype=torch.bool, device=candidates.device)
        chosen[torch.cat([self.token_keys, candidates]).topk(size).indices] = True
        leaving = (~chosen[:size]).nonzero().squeeze(1)
        entering = chosen[size:].nonzero().squeeze(1)
        rows, positions = better.nonzero(as_tuple=True)
        return leaving, rows[entering], positions[entering], candidates[entering]

    def update(self, cols: slice, acts, ranges: CountedRanges, entering) -> None:
        """Fold one (B, T, Fc) chunk of the features ``cols`` in, reading counted tokens only,
        sums accumulated in float64 (:func:`reduce_tokens`)."""
        for view in ranges.views(acts):
            values = view.float()
            self.sums["sum"][cols] += reduce_tokens(values)
            self.sums["sumsq"][cols] += reduce_tokens(values * values)
            self.sums["n_pos"][cols] += reduce_tokens(view > 0)
            self.sums["n_neg"][cols] += reduce_tokens(view < 0)
        if entering is not None:
            leaving, rows, positions, _ = entering
            self.token_values[leaving, cols] = acts[rows, positions].to(self.token_values.dtype)

    def commit(self, counted, entering, ids, prefix_len) -> None:
        """After every chunk of a batch: count its tokens, let the entering keys in (with the
        batch's ``ids`` (B, T) and ``prefix_len`` (B,) on the device)."""
        self.sums["n_tokens"] += counted.sum()
        if entering is not None:
            leaving, rows, positions, keys = entering
            self.token_keys[leaving] = keys
            self.token_ids[leaving] = ids[rows, positions]
            self.token_positions[leaving] = positions - prefix_len[rows]

    def tensors(self) -> list[torch.Tensor]:
        return [*self.sums.values(), self.token_keys, self.token_values, self.token_ids, self.token_positions]

    def state(self) -> dict:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "token_keys": self.token_keys.cpu(),
                "token_values": self.token_values.cpu(), "token_ids": self.token_ids.cpu(),
                "token_positions": self.token_positions.cpu()}

    @classmethod
    def restore(cls, saved: dict, device) -> TokenStats:
        unknown = torch.full(saved["token_keys"].shape, -1, dtype=torch.long)
        return cls({k: v.to(device) for k, v in saved["sums"].items()}, saved["token_keys"].to(device),
                   saved["token_values"].to(device), saved.get("token_ids", unknown).to(device),
                   saved.get("token_positions", unknown).to(device))

    def sample_tokens(self) -> SampleTokens:
        """The token sample's tokens, the same for every layer: made once when the tables are."""
        finite = torch.isfinite(self.token_keys)
        return SampleTokens.of(finite, self.token_positions[finite].cpu().numpy(), self.token_ids[finite].cpu().numpy())

    def frames(self, cols: slice, maxima: dict[Polarity, np.ndarray], tokens: SampleTokens,
               config: ExemplarsConfig) -> dict[Polarity, pl.DataFrame]:
        """The stats rows of the features ``cols`` for each polarity in ``maxima`` (polarity ->
        (F,) largest extreme of the train top-k, the table's max and scale): moments from the
        running sums, quantiles and delphi's filters from the token sample (``tokens``, from
        :meth:`sample_tokens`)."""
        n = max(float(self.sums["n_tokens"]), 1.0)
        mean = self.sums["sum"][cols] / n
        std = (self.sums["sumsq"][cols] / n - mean**2).clamp(min=0).sqrt().float().cpu().numpy()
        sampled = self._sample_columns(cols, maxima, tokens, config)
        frames = {}
        for polarity, top in maxima.items():
            active = self.sums["n_pos"] if polarity is Polarity.POS else self.sums["n_neg"]
            quantiles, mi, distinct = sampled[polarity]
            columns = {"max": top, "mean": (mean * polarity.sign).float().cpu().numpy(), "std": std,
                       "frac_active": (active[cols] / n).float().cpu().numpy()}
            columns.update({quantile_column(q): quantiles[i] for i, q in enumerate(STAT_QUANTILES)})
            columns.update(n_tokens=np.full(len(top), int(n), dtype=np.int64),
                           scale=top,  # the one activation normalizer (FeatureStats.scale): the train max
                           positional_mi=mi, is_positional=mi > config.positional_mi,
                           unigram_tokens=pl.Series(distinct).fill_nan(None).cast(pl.Int32),
                           is_unigram=np.where(np.isnan(distinct), False, distinct <= config.unigram_tokens))
            frames[polarity] = pl.DataFrame(columns)
        return frames

    def _sample_columns(self, cols: slice, maxima: dict[Polarity, np.ndarray], tokens: SampleTokens,
                        config: ExemplarsConfig) -> dict:
        """polarity -> (quantiles (len(STAT_QUANTILES), F), positional_mi (F,), unigram
        distinct counts (F,), NaN where not counted), from the token sample, STATS_BLOCK
        features at a time: a block's sample is transposed to (features, tokens) and sorted
        once for both polarities (the q-quantile of -x is minus x's value at the mirrored
        rank). Blocks a few MB wide keep the copies in cache and out of fresh pages, where a
        layer's (F, n) copies are tens of MB each. The filters read the sample's tokens whose
        position is known: all of them, unless the sample comes from an older checkpoint."""
        features = cols.stop - cols.start
        n = len(tokens.known)
        ranks = [round(q * (n - 1)) for q in STAT_QUANTILES]
        out = {polarity: (np.zeros((len(STAT_QUANTILES), features), dtype=np.float32),
                          np.zeros(features, dtype=np.float32), np.full(features, np.nan)) for polarity in maxima}
        if not n:
            return out
        for lo in range(0, features, STATS_BLOCK):
            hi = min(lo + STATS_BLOCK, features)
            strip = self.token_values[:, cols.start + lo : cols.start + hi]
            values = _transposed(strip if tokens.all_finite else strip[tokens.finite])  # (b, n) float32
            ordered = np.sort(values, axis=1)  # a SIMD sort: faster than a partition at 8 ranks
            known, known_ordered = values, ordered
            if not tokens.all_known:
                known = np.ascontiguousarray(values[:, tokens.known])
                known_ordered = np.sort(known, axis=1)
            for polarity, top in maxima.items():
                quantiles, mi, distinct = out[polarity]
                picked = ordered[:, ranks] if polarity is Polarity.POS else -ordered[:, [n - 1 - r for r in ranks]]
                quantiles[:, lo:hi] = picked.T
                mi[lo:hi], distinct[lo:hi] = _filters(known, known_ordered, polarity, top[lo:hi], tokens, config)
        return out


STATS_BLOCK = 256
"""Features per block of the token sample's statistics: (256, 8,192) float32 is 8 MB."""


def _transposed(strip: torch.Tensor, rows: int = 64) -> np.ndarray:
    """(n, b) -> (b, n) float32 on the host, ``rows`` of n at a time: a slab of 64 rows stays
    in cache while it is scattered into columns (torch's one-call transpose of the strided
    strip took 2-3x as long on CPU, for 256 to 1,536 columns of 8,192 rows)."""
    out = torch.empty((strip.shape[1], strip.shape[0]), dtype=torch.float32)
    for lo in range(0, strip.shape[0], rows):
        out[:, lo : lo + rows].copy_(strip[lo : lo + rows].T)
    return out.numpy()


def _filters(values: np.ndarray, ordered: np.ndarray, polarity: Polarity, maxima: np.ndarray, tokens: SampleTokens,
             config: ExemplarsConfig) -> tuple[np.ndarray, np.ndarray]:
    """delphi's feature filters over a block of features' token sample (``values`` (F, n),
    ``ordered`` the same sorted per feature): ``positional_mi`` (bits) between whether a token
    activates (beyond exemplars.activating_fraction of the train max) and its position after
    the prefix, in POSITION_BINS equal bins; and the number of distinct token ids among the
    strongest 80% of the activating sample tokens (NaN with fewer than 2 x
    exemplars.unigram_tokens of them), from which the stats table flags ``is_positional`` (MI
    above exemplars.positional_mi) and ``is_unigram`` (at most exemplars.unigram_tokens: a
    candidate, which :mod:`neuron_assets.features.unigram` then confirms or clears)."""
    features, n = values.shape
    mi, distinct = np.zeros(features, dtype=np.float32), np.full(features, np.nan)
    if not n:
        return mi, distinct
    signed = values if polarity is Polarity.POS else -values
    active = signed > (config.activating_fraction * np.maximum(maxima, 0.0))[:, None]
    mi = positional_information(active.T, tokens.bins, POSITION_BINS)
    firing = active.sum(1)
    eligible = np.nonzero(firing >= 2 * config.unigram_tokens)[0]
    take = np.ceil(0.8 * firing[eligible]).astype(np.int64)
    if np.isnan(ordered[:, -1]).any():  # NaN sorts last: find the cut among the active tokens alone
        cut = -np.sort(np.where(active[eligible], -signed[eligible], np.float32(np.inf)), axis=1)[
            np.arange(len(eligible)), take - 1]
    else:  # the active tokens are the largest, so the take-th largest of all is the cut
        cut = ordered[eligible, n - take] if polarity is Polarity.POS else -ordered[eligible, take - 1]
    takes, cuts = np.zeros(features, dtype=np.int64), np.full(features, np.inf, dtype=np.float32)
    takes[eligible], cuts[eligible] = take, cut
    distinct[eligible] = _distinct_strongest(signed, active, tokens, takes, cuts)[eligible]
    return mi, distinct


def reduce_tokens(values: torch.Tensor) -> torch.Tensor:
    """(B, T, F) -> (F,): the sum over tokens, then over sequences, accumulated in float64
    (int32 counts for bool). Two single-axis reductions: on CPU, torch reduces both axes of a
    strided view in one call several times slower (bench/reductions.py). float64 also keeps a
    feature's statistics from depending on how many features share the tensor: a float32 sum
    over one axis changes in its last bits with the tensor's width, and the pass must give the
    same tables however its groups and chunks cut the layers (test_foundation's budget test)."""
    if values.dtype == torch.bool:
        return values.sum(dim=1, dtype=torch.int32).sum(dim=0)
    return values.sum(dim=1, dtype=torch.float64).sum(dim=0)


@dataclass
class SampleTokens:
    """The token sample's tokens (shared by every feature of a pass): which sample rows are
    filled, which of those have a known position, and of those, the position bins and the
    token ids renumbered to the few the sample holds."""

    finite: torch.Tensor  # (sample size,) bool: filled rows, the n tokens below
    all_finite: bool
    known: np.ndarray  # (n,) bool
    all_known: bool
    bins: np.ndarray  # (n_known,)
    compact: np.ndarray  # (n_known,) index into the distinct ids
    n_ids: int

    @classmethod
    def of(cls, finite: torch.Tensor, positions: np.ndarray, ids: np.ndarray) -> SampleTokens:
        known = positions >= 0
        positions, ids = positions[known], ids[known]
        bins = (np.minimum(positions * POSITION_BINS // max(int(positions.max()) + 1, 1), POSITION_BINS - 1)
                if positions.size else positions)
        distinct, compact = np.unique(ids, return_inverse=True)
        return cls(finite, bool(finite.all()), known, bool(known.all()), bins, compact, len(distinct))


def _distinct_strongest(values: np.ndarray, active: np.ndarray, tokens: SampleTokens, take: np.ndarray,
                        cut: np.ndarray, block: int = 256) -> np.ndarray:
    """Per row of ``values`` and ``active`` ((F, n)): the number of distinct token ids among its
    ``take`` strongest active tokens (ties in token order), whose weakest value is ``cut``; 0
    for a row whose ``take`` is 0 (give it a ``cut`` of inf). A block of rows at a time with
    no loop over features: the tokens above the cut are in, and of those equal to it the first
    ones fill the rest. Blocks are views of the rows (a gather of the wanted rows would copy
    them), and the chosen tokens are found through the flat index (numpy's 2-D nonzero took
    about 4x as long). The ids come renumbered to the few the sample holds
    (``tokens.compact``), so a block marks them in a small (rows, distinct ids) table instead
    of hashing (row, id) pairs."""
    out = np.zeros(len(values), dtype=np.float64)
    if not tokens.compact.size:
        return out
    n = values.shape[1]
    for lo in range(0, len(values), block):
        act, vals, edge = active[lo : lo + block], values[lo : lo + block], cut[lo : lo + block, None]
        chosen = act & (vals >= edge)
        ties = act & (vals == edge)
        tie_count = np.count_nonzero(ties, axis=1)
        need = take[lo : lo + block] - (np.count_nonzero(chosen, axis=1) - tie_count)
        over = np.nonzero(tie_count > need)[0]  # rows where not every tie fits: the first ones fill
        if over.size:
            chosen[over] &= ~ties[over] | (np.cumsum(ties[over], axis=1) <= need[over, None])
        row, token = np.divmod(np.flatnonzero(chosen), n)
        marks = np.zeros((len(act), tokens.n_ids), dtype=bool)
        marks[row, tokens.compact[token]] = True
        out[lo : lo + len(act)] = np.count_nonzero(marks, axis=1)
    return out


def positional_information(active: np.ndarray, bins: np.ndarray, n_bins: int) -> np.ndarray:
    """(F,) mutual information in bits between each column of ``active`` (n, F) bool and the
    position bin (n,) of the same tokens."""
    n = active.shape[0]
    exact = np.float32 if n < 2**24 else np.float64
    onehot = np.zeros((n_bins, n), dtype=exact)
    onehot[bins, np.arange(n)] = 1.0
    p_bin = np.bincount(bins, minlength=n_bins).astype(np.float64) / n  # (B,)
    # Counts of 0/1 terms below 2**24 are exact in float32, so this is the float64 count. The
    # product goes through torch, not numpy: OpenBLAS's threads spin for a while after every
    # call, and one call per block of features kept the other core busy for nothing, where
    # the tables' second build thread (TABLE_WORKERS) runs (the build took 1.4x as long).
    counts = torch.mm(torch.from_numpy(onehot), torch.from_numpy(active.astype(exact)))
    joint_on = counts.numpy().astype(np.float64) / n  # (B, F): p(active, bin)
    joint_off = p_bin[:, None] - joint_on
    p_on = joint_on.sum(0)  # (F,)
    mi = np.zeros(active.shape[1])
    for joint, marginal in ((joint_on, p_on), (joint_off, 1.0 - p_on)):
        expected = p_bin[:, None] * marginal[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(joint > 0, joint * np.log2(joint / expected), 0.0)
        mi += terms.sum(0)
    return np.maximum(mi, 0.0).astype(np.float32)
