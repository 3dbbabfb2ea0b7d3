"""The corpus builder this project used before the streaming one: every window as Python
lists of ints and strings, one polars frame at the end. Kept only so bench/corpus.py can
measure the streaming builder against it (memory and time, same input, same output)."""

from __future__ import annotations

import math
import random
import warnings
from dataclasses import dataclass

import polars as pl

from neuron_assets.corpus import CorpusError, _prefix, _split_counts, chat_header, read_documents, tokenize_with_text
from neuron_assets.types import Split


@dataclass(frozen=True)
class TokenWindow:
    source: str
    doc_id: int
    token_ids: list[int]
    tokens: list[str]
    prefix_len: int


def legacy_build_sequences(config, tokenizer) -> pl.DataFrame:
    """The ``sequences`` table: seq_id, split, source, doc_id, token_ids, tokens, prefix_len, n_tokens."""
    if config.chat_prefix is not None:
        prefix_ids, prefix_tokens = chat_header(config.chat_prefix, tokenizer)
        shorten = "shorten corpus.chat_prefix (system, user) or set it to null"
    else:
        prefix_ids, prefix_tokens = _prefix(config.prefix, tokenizer)
        shorten = "shorten corpus.prefix"
    if len(prefix_ids) >= config.seq_len - 1:
        raise CorpusError(
            f"the prefix takes {len(prefix_ids)} tokens, leaving less than 2 of corpus.seq_len={config.seq_len} "
            f"for the text; raise seq_len or {shorten}"
        )
    total_weight = sum(source.weight for source in config.sources)
    if not config.sources:
        raise CorpusError("corpus.sources is empty; add at least one source (see configs/demo.yaml)")
    shares = {source.name: source.weight / total_weight for source in config.sources}
    if len(shares) != len(config.sources):
        raise CorpusError("corpus.sources names must be unique")

    per_split = config.sequences_per_split
    documents_by_source = {}
    for source in config.sources:
        # A margin beyond the exact need lets whole documents fill every split exactly.
        wanted = math.ceil(per_split * shares[source.name] * 1.2) * len(Split) + 3 * config.max_windows_per_document
        documents_by_source[source.name] = _windows_by_document(
            source, tokenizer, config, prefix_ids, prefix_tokens, wanted
        )
    # A source too small for its share shrinks every split alike, keeping shares and sizes equal.
    for name, documents in documents_by_source.items():
        available = sum(len(windows) for windows in documents)
        fits = int(available / (len(Split) * shares[name]))
        if fits < per_split:
            per_split = fits
    if per_split < 1:
        raise CorpusError("the corpus has no usable sequences; add documents or lower corpus.seq_len")
    if per_split < config.sequences_per_split:
        warnings.warn(
            f"the corpus holds only {per_split} sequences per split of the {config.sequences_per_split} asked "
            "(corpus.sequences_per_split); add documents to reach it",
            stacklevel=2,
        )

    rng = random.Random(config.seed)
    rows: list[tuple[str, TokenWindow]] = []
    counts = _split_counts(per_split, shares)
    for source in config.sources:
        assigned = _assign_documents(documents_by_source[source.name], counts[source.name], rng)
        # Whole documents may leave one split a few windows short: trim the others to match.
        fill = min(len(windows) for windows in assigned.values())
        if fill == 0:  # all of a document's windows go to one split, so one document cannot fill three
            raise CorpusError(
                f"source '{source.name}' has {len(documents_by_source[source.name])} usable document(s), and each split "
                "needs whole documents of its own; give it at least 3 documents (e.g. split the text into several "
                "files, or one JSONL row each)"
            )
        rows += [(split, window) for split, windows in assigned.items() for window in windows[:fill]]
        if fill < counts[source.name]:
            warnings.warn(f"source '{source.name}' fills only {fill} of its {counts[source.name]} sequences per split", stacklevel=2)
    ordered = []
    for split in Split:
        in_split = [window for s, window in rows if s == split.value]
        rng.shuffle(in_split)  # batches mix sources
        ordered += [(split.value, window) for window in in_split]
    return pl.DataFrame(
        {
            "seq_id": list(range(len(ordered))),
            "split": [split for split, _ in ordered],
            "source": [w.source for _, w in ordered],
            "doc_id": [w.doc_id for _, w in ordered],
            "token_ids": [w.token_ids for _, w in ordered],
            "tokens": [w.tokens for _, w in ordered],
            "prefix_len": [w.prefix_len for _, w in ordered],
            "n_tokens": [len(w.token_ids) for _, w in ordered],
        },
        schema={
            "seq_id": pl.Int64, "split": pl.String, "source": pl.String, "doc_id": pl.Int64,
            "token_ids": pl.List(pl.Int32), "tokens": pl.List(pl.String), "prefix_len": pl.Int16, "n_tokens": pl.Int32,
        },
    )


def _windows_by_document(source, tokenizer, config, prefix_ids, prefix_tokens, wanted) -> list[list[TokenWindow]]:
    """Windows grouped by document, read until ``wanted`` windows are found."""
    window_len = config.seq_len - len(prefix_ids)
    rng = random.Random(f"{config.seed}:{source.name}")
    grouped: list[list[TokenWindow]] = []
    n_documents = n_windows = longest = 0
    for doc_id, document in enumerate(read_documents(source)):
        n_documents += 1
        if isinstance(document, list):
            windows = _chat_window(document, source, doc_id, tokenizer, config.seq_len)
            longest = max(longest, len(windows[0].token_ids) if windows else 0)
        else:
            if not isinstance(document, str) or not document.strip():
                continue
            ids, tokens = tokenize_with_text(document, tokenizer)
            longest = max(longest, len(ids))
            starts = list(range(0, len(ids) - window_len + 1, window_len))
            if len(starts) > config.max_windows_per_document:
                starts = sorted(rng.sample(starts, config.max_windows_per_document))
            windows = [
                TokenWindow(source.name, doc_id, prefix_ids + ids[s : s + window_len],
                            prefix_tokens + tokens[s : s + window_len], len(prefix_ids))
                for s in starts
            ]
        if windows:
            grouped.append(windows)
            n_windows += len(windows)
            if n_windows >= wanted:
                break
    if n_documents == 0:
        raise CorpusError(f"source '{source.name}' ({source.kind} {source.path}) has no documents; point it at non-empty files")
    if not grouped:
        raise CorpusError(
            f"no document of source '{source.name}' is long enough: a window needs {window_len} tokens "
            f"(corpus.seq_len={config.seq_len} minus a {len(prefix_ids)}-token prefix) and the longest document "
            f"has {longest}; lower corpus.seq_len or add longer documents"
        )
    return grouped


def _chat_window(messages, source, doc_id, tokenizer, seq_len) -> list[TokenWindow]:
    if not getattr(tokenizer, "chat_template", None):
        raise CorpusError(
            f"source '{source.name}' holds chats but the tokenizer has no chat template; "
            "use an instruct model's tokenizer or read a plain text_field instead of messages_field"
        )
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
        raise CorpusError(
            f"source '{source.name}', document {doc_id}: each message must be an object with role and content, "
            f"e.g. {{\"role\": \"user\", \"content\": \"...\"}}; fix that row of {source.path}"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    ids, tokens = tokenize_with_text(text, tokenizer)
    # The template's leading special tokens (BOS, a header start) are the chat's fixed
    # prefix: attention-sink outliers there must not win a top-k.
    special = set(tokenizer.all_special_ids)
    prefix_len = next((i for i, token_id in enumerate(ids) if token_id not in special), len(ids))
    if len(ids) - prefix_len < 2:
        return []
    return [TokenWindow(source.name, doc_id, ids[:seq_len], tokens[:seq_len], min(prefix_len, seq_len - 1))]


def _assign_documents(documents: list[list[TokenWindow]], per_split: int, rng: random.Random) -> dict[str, list[TokenWindow]]:
    """Whole documents go to the emptiest split until every split holds per_split windows."""
    order = list(range(len(documents)))
    rng.shuffle(order)
    assigned: dict[str, list[TokenWindow]] = {split.value: [] for split in Split}
    for index in order:
        open_splits = [s for s, windows in assigned.items() if len(windows) < per_split]
        if not open_splits:
            break
        emptiest = min(open_splits, key=lambda s: len(assigned[s]))
        room = per_split - len(assigned[emptiest])
        assigned[emptiest] += documents[index][:room]
    return assigned
