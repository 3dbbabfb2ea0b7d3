"""The ``statistical`` backend: descriptions from exemplar statistics (offline default)."""

from __future__ import annotations

import time
from typing import Sequence

from neuron_assets.config import ExplainConfig
from neuron_assets.excerpts import excerpt_of, highlight_threshold
from neuron_assets.explain.backends.base import CorpusSample, ExplainRequest, ExplainResult, Progress
from neuron_assets.explain.statistical import NothingActive, describe_by_lift

# Candidate c uses rule c % 4: the prompt formats' highlight threshold, then shares of the
# subset's peak, so the k candidates differ in threshold as well as in exemplar subset.
PEAK_SHARES = (None, 0.5, 0.25, 0.75)


class StatisticalExplainer:
    backend = "statistical"
    model = "word-lift-v1"
    reads_prompts = False
    needs_gpu = False

    def __init__(self, config: ExplainConfig):
        self.config = config

    def count_tokens(self, messages) -> int:
        return 0

    def explain(self, requests: Sequence[ExplainRequest], corpus: CorpusSample, done: Progress) -> list[ExplainResult]:
        results = []
        for request in requests:
            started = time.perf_counter()
            polarity = request.feature.polarity
            try:
                threshold = self._threshold(request)
                background = corpus.word_counts.without(r for r in request.records if r.seq_id in corpus.seq_ids)
                description, failure = describe_by_lift(request.records, polarity, background, threshold), None
            except NothingActive as err:
                description, failure = None, str(err)
            results.append(ExplainResult(description, failure, latency_s=time.perf_counter() - started))
            done(1)
        return results

    def _threshold(self, request: ExplainRequest) -> float:
        excerpts = [excerpt_of(r, request.feature.polarity) for r in request.records]
        share = PEAK_SHARES[request.candidate % len(PEAK_SHARES)]
        if share is None:
            return highlight_threshold(excerpts, request.ladder)
        peak = max((e.peak for e in excerpts), default=0.0)
        return share * peak if peak > 0 else float("inf")
