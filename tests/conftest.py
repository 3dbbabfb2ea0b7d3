"""Session fixtures: tiny models and corpora built on the fly (nothing is downloaded).

The suite runs in worker processes (pytest-xdist, whole files per worker; `-n 0` runs it in
one process). Each worker's torch gets one thread: two workers whose OpenMP threads spin for
the same two cores ran some tests ten times slower than alone.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MAX_WORKERS = 2  # what CI's two cores take; more would hold more models in memory at once

if os.environ.get("PYTEST_XDIST_WORKER") and int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, here and in subprocesses

import pytest
import yaml

from neuron_assets.cli import main
from tests.support.tiny_models import make_tiny_gpt2, make_tiny_llama, sample_texts, train_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer(sample_texts(600), vocab_size=400)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tokenizer) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tiny_tokenizer, num_layers=3, hidden=64, intermediate=96, heads=1)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory, tiny_tokenizer) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"), tiny_tokenizer, num_layers=2, hidden=64, intermediate=96, heads=1)


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> Path:
    """A folder of 60 documents, eight sentences each."""
    folder = tmp_path_factory.mktemp("texts")
    sentences = sample_texts(480, seed=1)
    for i in range(60):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(sentences[i * 8 : (i + 1) * 8]))
    return folder


@pytest.fixture(scope="session")
def chat_corpus(tmp_path_factory) -> Path:
    """A JSONL file of short chats, shorter than the sequence length, so batches hold padding."""
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    sentences = sample_texts(200, seed=2)
    with path.open("w") as handle:
        for i in range(100):
            messages = [{"role": "user", "content": sentences[2 * i]}, {"role": "assistant", "content": sentences[2 * i + 1]}]
            handle.write(json.dumps({"messages": messages}) + "\n")
    return path


@pytest.fixture
def tiny_config(tmp_path, tiny_llama, text_corpus):
    """Write a small config for the tiny Llama and return (path, dict); tests may edit and rewrite it."""

    def write(**overrides) -> Path:
        raw = {
            "name": "tiny",
            "storage": {"root": str(tmp_path / "home")},
            "subject": {"model": str(tiny_llama), "batch_size": 8},
            "corpus": {
                "sources": [{"name": "texts", "kind": "text", "path": str(text_corpus)}],
                "seq_len": 16,
                "chat_prefix": None,  # 16 tokens leave no room for a chat header; tests that want one set it
                "sequences_per_split": 24,
            },
            "features": {"layers": "all", "neurons": {"sample": 6, "seed": 0}}, "sae": {"layers": []},
            "exemplars": {"top_k": 3, "random_per_split": 2, "per_quantile": 1, "quantile_bins": 4, "quiet_per_split": 3,
                          "quantile_reservoir": 8, "stats_token_sample": 64},
        }
        for dotted, value in overrides.items():
            node = raw
            *parents, leaf = dotted.split("__")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return write


STAGES = ("corpus,exemplars,candidate_descriptions,simulator_training_data,simulator_checkpoint,description_scores,"
          "neuron_descriptions,neuron_report")  # all but scorer_validity, which the report does not read


@pytest.fixture(scope="session")
def described_run(tmp_path_factory, tiny_llama, text_corpus) -> Path:
    """A tiny run finished through the report (its config's path): what the report and the
    browser tests read."""
    folder = tmp_path_factory.mktemp("report")
    raw = {
        "name": "report",
        "storage": {"root": str(folder / "home")},
        "subject": {"model": str(tiny_llama), "batch_size": 8},
        "corpus": {"sources": [{"name": "texts", "kind": "text", "path": str(text_corpus)}], "seq_len": 16,
                   "chat_prefix": None, "sequences_per_split": 24},
        "features": {"layers": [0, 1], "neurons": {"sample": 4, "seed": 0}}, "sae": {"layers": []},
        "exemplars": {"top_k": 3, "random_per_split": 2, "per_quantile": 1, "quantile_bins": 4, "quiet_per_split": 3,
                      "quantile_reservoir": 8, "stats_token_sample": 64},
        "explain": {"k": 3},
        "simulate": {"backend": "lexical", "compare_with": []},
        "score": {"scorers": ["correlation"]},  # the embedding scorer's MiniLM would triple the run's time
    }
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(path), "run", "--select", STAGES]) == 0
    return path


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (the default in pyproject.toml): one worker per core, at most MAX_WORKERS."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))
