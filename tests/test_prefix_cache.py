"""The shared prefix computed once (exemplars.prefix_cache): the exemplar pass and the unigram
probes give the tables of the full pass, on tiny Llama and GPT-2 models and on SmolLM2, at
several batch sizes, resumed mid-pass too; an encoder runs the full pass and says why."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from neuron_assets.builtin_models import BUILTIN_MINILM, BUILTIN_SMOLLM2
from neuron_assets.config import ChatPrefixConfig, Config, CorpusConfig, ExemplarsConfig, SubjectConfig
from neuron_assets.corpus import build_sequences
from neuron_assets.exemplars import Interrupted, collect_exemplars
from neuron_assets.features.prefix_cache import PrefixCache, prefix_cache_support
from neuron_assets.features.unigram import UnigramCandidate, confirm_unigrams
from neuron_assets.subject import load_subject
from neuron_assets.types import Polarity

POLARITIES = [Polarity.POS, Polarity.NEG]
EXEMPLARS = ExemplarsConfig(top_k=3, random_per_split=2, per_quantile=1, quantile_bins=4, quiet_per_split=3,
                            quantile_reservoir=8, stats_token_sample=64, checkpoint_every=2)
# float32 on CPU: the tokens after the header see the header's keys and values computed in a
# pass of their own, so activations may differ from the full pass's by float rounding (measured:
# at most 1.5e-7 on the tiny models, none on SmolLM2); the tables store activations in float16.
ACTIVATION_TOLERANCE = {"rtol": 1e-3, "atol": 1e-4}


def _corpus(text_corpus, chat_corpus=None, seq_len=40, per_split=12) -> CorpusConfig:
    sources = [{"name": "texts", "kind": "text", "path": str(text_corpus)}]
    if chat_corpus is not None:
        sources.append({"name": "chats", "kind": "jsonl", "path": str(chat_corpus), "messages_field": "messages"})
    return CorpusConfig(sources=sources, seq_len=seq_len, sequences_per_split=per_split,
                        chat_prefix=ChatPrefixConfig(system="You read text.", user="Read this:"))


def _collect(subject, sequences, neurons, cache: bool, batch_size: int, **kwargs):
    measured = {}
    tables = collect_exemplars(subject, sequences, neurons, POLARITIES, EXEMPLARS.model_copy(update={"prefix_cache": cache}),
                               batch_size, progress=False, measured=measured, **kwargs)
    return tables, measured["prefix_cache"]


def assert_same_tables(got: dict, expected: dict) -> None:
    """The same rows (sequences, ranks, samples, token ids) and the same numbers to float rounding."""
    assert got.keys() == expected.keys()
    for key in expected:
        for frame, truth in zip(got[key], expected[key]):
            assert frame.columns == truth.columns and frame.height == truth.height, key
            for column in truth.columns:
                left, right = frame[column], truth[column]
                if column == "activations":
                    for a, b in zip(left.to_list(), right.to_list()):
                        np.testing.assert_allclose(np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32),
                                                   **ACTIVATION_TOLERANCE)
                elif left.dtype.is_float():
                    np.testing.assert_allclose(left.to_numpy(), right.to_numpy(), **ACTIVATION_TOLERANCE, err_msg=column)
                else:
                    assert left.equals(right), (key, column)


@pytest.fixture(scope="module")
def llama_corpus(tiny_llama, text_corpus, chat_corpus):
    subject = load_subject(SubjectConfig(model=str(tiny_llama)))
    sequences = build_sequences(_corpus(text_corpus, chat_corpus), subject.tokenizer)
    return subject, sequences


@pytest.mark.parametrize("batch_size", [1, 5, 16])
def test_tiny_llama_tables_match_the_full_pass_with_text_and_chats(llama_corpus, batch_size):
    subject, sequences = llama_corpus
    prefixes = sequences["prefix_len"].unique().sort().to_list()
    assert len(prefixes) > 1 and max(prefixes) >= 10, "text windows behind the chat header, and chats with their own"
    neurons = {0: list(range(0, 96, 7)), 2: list(range(96))}
    plain, off = _collect(subject, sequences, neurons, False, batch_size)
    cached, summary = _collect(subject, sequences, neurons, True, batch_size)
    assert off == "prefix cache off: exemplars.prefix_cache is off"
    assert "came from" in summary and not summary.startswith("prefix cache: 0 "), summary
    assert_same_tables(cached, plain)


@pytest.mark.parametrize("batch_size", [3, 8])
def test_tiny_gpt2_tables_match_the_full_pass(tiny_gpt2, text_corpus, batch_size):
    subject = load_subject(SubjectConfig(model=str(tiny_gpt2)))
    sequences = build_sequences(_corpus(text_corpus), subject.tokenizer)
    neurons = {0: list(range(96)), 1: list(range(0, 96, 5))}
    plain, _ = _collect(subject, sequences, neurons, False, batch_size)
    cached, summary = _collect(subject, sequences, neurons, True, batch_size)
    assert_same_tables(cached, plain)
    header = int(sequences["prefix_len"][0])
    assert f"{header * sequences.height:,} of" in summary, "every window's header came from the cache"


def test_activations_of_mixed_prefixes_match_row_by_row(llama_corpus):
    """Rows behind the header, chats behind their own short prefix and one row with none, in
    one batch: each group runs against its own cached prefix, the last one runs whole."""
    subject, sequences = llama_corpus
    rows = pl.concat([sequences.filter(pl.col("prefix_len") == pl.col("prefix_len").max()).head(3),
                      sequences.filter(pl.col("prefix_len") < 5).head(3)])
    seq_len = int(rows["n_tokens"].max())
    ids = torch.zeros((rows.height + 1, seq_len), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, tokens in enumerate(rows["token_ids"].to_list()):
        ids[i, :len(tokens)], mask[i, :len(tokens)] = torch.tensor(tokens), 1
    ids[-1], mask[-1] = ids[0], mask[0]
    prefix_len = np.array(rows["prefix_len"].to_list() + [0])
    neurons = {1: None, 2: torch.tensor([3, 50])}
    plain = subject.activations(ids, mask, neurons)
    cache = PrefixCache(subject)
    cached = cache.activations(ids, mask, prefix_len, neurons)
    counted = mask.bool() & (torch.arange(seq_len)[None, :] >= torch.from_numpy(prefix_len)[:, None])
    for layer in neurons:
        assert cached[layer].shape == plain[layer].shape
        torch.testing.assert_close(cached[layer][counted], plain[layer][counted], rtol=1e-5, atol=1e-6)
        assert (cached[layer][~counted & mask.bool()][: int(prefix_len[0])] == 0).all(), "the header reads 0"
    assert len(cache.headers) == 2 and cache.tokens_skipped == int(prefix_len[:-1].sum())


def test_a_run_resumed_mid_pass_with_the_cache_gives_the_full_pass_tables(llama_corpus, tmp_path):
    subject, sequences = llama_corpus
    neurons = {0: [0, 5, 9], 2: [1, 4, 60]}
    plain, _ = _collect(subject, sequences, neurons, False, 4)
    checkpoint = tmp_path / "ckpt"

    def die_after_five(done):
        if done == 5:
            raise Interrupted("killed")

    with pytest.raises(Interrupted):
        _collect(subject, sequences, neurons, True, 4, checkpoint=checkpoint, on_batch=die_after_five)
    assert checkpoint.exists()
    seen = []
    resumed, _ = _collect(subject, sequences, neurons, True, 4, checkpoint=checkpoint, on_batch=seen.append)
    assert seen[0] == 5 and not checkpoint.exists()
    assert_same_tables(resumed, plain)
    uninterrupted, _ = _collect(subject, sequences, neurons, True, 4)
    for key in uninterrupted:
        for got, expected in zip(resumed[key], uninterrupted[key]):
            assert got.equals(expected), key


def test_unigram_probes_read_the_same_with_the_cache(llama_corpus):
    subject, sequences = llama_corpus
    tokens = sequences["token_ids"][0].to_list()[20:23]
    candidates = [UnigramCandidate(layer, Polarity.POS, "neuron", index, tuple(tokens), (0.1, 0.1, 0.1), (1.0, 1.0, 1.0))
                  for layer, index in [(0, 3), (2, 7), (2, 40)]]

    def confirm(cache):
        return confirm_unigrams(subject, sequences, candidates, {}, EXEMPLARS.model_copy(update={"prefix_cache": cache}),
                                5, seed=0)

    plain, cached = confirm(False), confirm(True)
    assert plain.drop("unigram_survival").equals(cached.drop("unigram_survival"))
    np.testing.assert_allclose(cached["unigram_survival"].to_numpy(), plain["unigram_survival"].to_numpy(), rtol=1e-5)


def test_smollm2_tables_match_the_full_pass():
    config = Config()
    subject = load_subject(config.subject)
    assert prefix_cache_support(subject) is None
    corpus = config.corpus.model_copy(update={"sequences_per_split": 6})
    sequences = build_sequences(corpus, subject.tokenizer)
    assert int(sequences["prefix_len"].min()) >= 20, "the demo's windows sit behind SmolLM2's chat header"
    neurons = {0: list(range(0, 1536, 11)), 1: list(range(0, 1536, 13))}
    for batch_size in (4, 7):  # the samples' random keys are drawn per batch: compare at one batch size
        plain, _ = _collect(subject, sequences, neurons, False, batch_size)
        cached, summary = _collect(subject, sequences, neurons, True, batch_size)
        assert "1 cached prefix" in summary, summary
        assert_same_tables(cached, plain)


def test_an_encoder_runs_the_full_pass_and_says_why():
    minilm = load_subject(SubjectConfig(model=BUILTIN_MINILM))
    reason = prefix_cache_support(minilm)
    assert reason is not None and "attends both ways" in reason
    cache = PrefixCache(minilm)
    assert not cache.enabled and cache.summary() == f"prefix cache off: {reason}"
    assert BUILTIN_SMOLLM2 != BUILTIN_MINILM


def test_plan_counts_the_header_once_for_text_windows_and_in_full_for_chats(tiny_llama, text_corpus, chat_corpus):
    from neuron_assets.plan import ModelShape, header_tokens, plan_run

    shape = ModelShape.from_config_json(tiny_llama)
    corpus = _corpus(text_corpus, chat_corpus, seq_len=40, per_split=100)
    config = Config(subject=SubjectConfig(model=str(tiny_llama)), corpus=corpus, features={"layers": "all"},
                    sae={"layers": []})
    header, source = header_tokens(config)
    assert source == "counted with the subject's tokenizer"
    sequences = build_sequences(corpus.model_copy(update={"sequences_per_split": 4}), load_subject(config.subject).tokenizer)
    assert header == sequences["prefix_len"].max() > 5, "the text windows' header, as the corpus builds it"

    def exemplar_hours(cache: bool, sources=corpus.sources):
        changed = config.model_copy(update={"exemplars": config.exemplars.model_copy(update={"prefix_cache": cache}),
                                            "corpus": corpus.model_copy(update={"sources": sources})})
        stage = next(s for s in plan_run(changed, shape, device="h100").stages if s.stage == "exemplars")
        return stage.device_hours, stage.note

    (plain, plain_note), (cached, note) = exemplar_hours(False), exemplar_hours(True)
    assert "prefix_cache off" in plain_note and f"the {header}-token header" in note and "50% of sequences" in note
    assert cached < plain
    text_only, _ = exemplar_hours(True, corpus.sources[:1])
    assert text_only < cached, "text windows only: every sequence's header is run once"


# -- the LLM tiers' fixed prompt prefix ------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 3])
def test_transformers_logprobs_reuse_the_prompt_prefix_across_calls(tiny_llama, batch_size):
    from neuron_assets.llm import ChoiceRequest, LLMSettings, LogprobRequest
    from neuron_assets.llm.transformers_local import TransformersLLM
    from neuron_assets.simulate.prompted import VALUE_STRINGS, all_at_once_prompt

    llm = TransformersLLM(LLMSettings(backend="transformers", model=str(tiny_llama), batch_size=batch_size))
    llm.prefixes.kept.clear()
    descriptions = ["the word cat", "verbs of motion", "closing quotes"]
    tokens = [(" the", " cat", " sees", " a", " dog"), (" my", " sister", " reads")]
    prompts = [all_at_once_prompt(d, t) for d in descriptions for t in tokens]
    simulated = [LogprobRequest(p.text, p.placeholder_offsets, VALUE_STRINGS) for p in prompts]
    system = {"role": "system", "content": "Answer 1 if the example shows the feature, else 0. " * 3}
    judged = [ChoiceRequest((system, {"role": "user", "content": f"Feature: cats. Example: {t}"}), ("0", "1"))
              for t in ("the cat sat", "a dog ran", "my sister reads a letter")]

    def read():
        return ([r.logprobs for r in llm.continuation_logprobs(simulated[:2])]  # two calls: the prefix is kept between
                + [r.logprobs for r in llm.continuation_logprobs(simulated[2:])]
                + [r.logprobs for r in llm.choice_logprobs(judged)])

    llm.prefix_cache = False
    plain = read()
    assert llm.prefixes.tokens_reused == 0
    llm.prefix_cache = True
    cached = read()
    assert llm.prefixes.tokens_reused > 0 and 1 <= len(llm.prefixes.kept) <= 4
    for got, expected in zip(cached, plain):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    run_once = llm.prefixes.prefix_tokens_run
    read()
    assert llm.prefixes.prefix_tokens_run == run_once, "a prefix seen before is not run again"


def test_the_vllm_offline_engine_turns_prefix_caching_on(monkeypatch):
    import sys
    import types

    from neuron_assets import runtime
    from neuron_assets.llm import LLMSettings
    from neuron_assets.llm import vllm_offline

    built = {}

    class FakeLLM:
        def __init__(self, model, **options):
            built.update(options, model=model)

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM))
    monkeypatch.setattr(vllm_offline, "local_model_path", lambda model, *rest: model)
    monkeypatch.setattr(runtime, "shared", lambda key, build: build())
    vllm_offline.shared_engine(LLMSettings(backend="vllm", model="/models/m", engine_kwargs={"gpu_memory_utilization": 0.5}))
    assert built["enable_prefix_caching"] is True and built["gpu_memory_utilization"] == 0.5


def test_the_prefix_cache_setting_changes_no_stage_version():
    """It changes how fast the exemplar pass runs, not its tables: turning it off (or a store
    written before it existed) leaves finished exemplars up to date."""
    from neuron_assets.config import Config
    from neuron_assets.stages.graph import STAGES, stage_version

    on = Config()
    raw = on.model_dump(mode="json")
    off = Config.model_validate({**raw, "exemplars": {**raw["exemplars"], "prefix_cache": False}})
    assert on.exemplars.prefix_cache and not off.exemplars.prefix_cache
    assert all(stage_version(on, name) == stage_version(off, name) for name in STAGES)
