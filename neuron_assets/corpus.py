"""Corpus: text sources -> fixed-length token sequences -> equal train / val / test splits.

Each text window comes from a single document and is preceded by a fixed prefix: by
default the model's chat header (a system turn and an open user turn, rendered with the
tokenizer's chat template), as Transluce prepends one to its web text; else the tokenizer's
BOS or CLS token and the configured prefix text. A chat (a ``messages`` field) is rendered
with the tokenizer's chat template and cut to ``seq_len``. Each split gets the same number of sequences and the same share of
every source, and a document's windows all land in one split. Everything is seeded.

Built to scale (millions of windows): documents are tokenized in batches by the fast
tokenizer (optionally in worker processes, ``corpus.tokenize_workers``); windows are held in
flat numpy buffers (int32 token ids, each window's text as UTF-8 bytes with its tokens' ends),
never as Python objects per token; the table is made and written in Parquet row groups
(:meth:`Corpus.batches`, ``Store.write_batches``), never as one frame.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import json
import math
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl
import pyarrow as pa

from neuron_assets.config import ChatPrefixConfig, CorpusConfig, SourceConfig
from neuron_assets.tokenize_pool import PoolEncoder, encode
from neuron_assets.types import Split


class CorpusError(ValueError):
    """A corpus that cannot be built; the message names the source and the fix."""


SEQUENCES_SCHEMA = pa.schema([
    ("seq_id", pa.int64()), ("split", pa.string()), ("source", pa.string()), ("doc_id", pa.int64()),
    ("token_ids", pa.list_(pa.int32())), ("tokens", pa.list_(pa.string())), ("prefix_len", pa.int16()),
    ("n_tokens", pa.int32()),
])
ROW_GROUP_ROWS = 16_384  # rows per Parquet row group (about 1.5M tokens at seq_len 95)


def build_sequences(config: CorpusConfig, tokenizer) -> pl.DataFrame:
    """The ``sequences`` table as one frame: seq_id, split, source, doc_id, token_ids, tokens,
    prefix_len, n_tokens. For a corpus of any size, write it with :meth:`Corpus.batches`
    instead (``stages.make_corpus`` does), which never holds the table as one frame."""
    corpus = plan_corpus(config, tokenizer)
    return pl.from_arrow(pa.Table.from_batches(list(corpus.batches()), schema=corpus.schema()))


def plan_corpus(config: CorpusConfig, tokenizer) -> Corpus:
    """Read and tokenize every source, cut windows, and choose each split's sequences and
    their order; the rows themselves are made in row groups by :meth:`Corpus.batches`."""
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
    encoder = make_encoder(tokenizer, tokenize_workers(config))
    by_source: dict[str, _SourceWindows] = {}
    for source in config.sources:
        # A margin beyond the exact need lets whole documents fill every split exactly.
        wanted = math.ceil(per_split * shares[source.name] * 1.2) * len(Split) + 3 * config.max_windows_per_document
        by_source[source.name] = _source_windows(source, tokenizer, config, len(prefix_ids), wanted, encoder)
    # A source too small for its share shrinks every split alike, keeping shares and sizes equal.
    for name, found in by_source.items():
        fits = int(found.n_windows / (len(Split) * shares[name]))
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
    counts = _split_counts(per_split, shares)
    in_split: dict[str, list[np.ndarray]] = {split.value: [] for split in Split}
    first_window = 0  # of the source, among all sources' windows
    for source in config.sources:
        found = by_source[source.name]
        assigned = _assign_documents(found.doc_windows, counts[source.name], rng)
        # Whole documents may leave one split a few windows short: trim the others to match.
        fill = min(len(windows) for windows in assigned.values())
        if fill == 0:  # all of a document's windows go to one split, so one document cannot fill three
            raise CorpusError(
                f"source '{source.name}' has {len(found.doc_windows)} usable document(s), and each split "
                "needs whole documents of its own; give it at least 3 documents (e.g. split the text into several "
                "files, or one JSONL row each)"
            )
        for split, windows in assigned.items():
            in_split[split].append(first_window + windows[:fill])
        if fill < counts[source.name]:
            warnings.warn(f"source '{source.name}' fills only {fill} of its {counts[source.name]} sequences per split", stacklevel=2)
        first_window += found.n_windows
    order, split_of_row = [], []
    for split_no, split in enumerate(Split):
        windows = np.concatenate(in_split[split.value])
        shuffled = list(range(len(windows)))
        rng.shuffle(shuffled)  # batches mix sources
        order.append(windows[np.asarray(shuffled, dtype=np.int64)])
        split_of_row.append(np.full(len(windows), split_no, dtype=np.int8))
    windows = _Windows.concatenate([by_source[source.name].windows for source in config.sources])
    return Corpus(windows, np.concatenate(order), np.concatenate(split_of_row),
                  [source.name for source in config.sources], prefix_ids, prefix_tokens)


class Corpus:
    """The chosen sequences, held as flat numpy buffers (int32 token ids; each window's text
    as UTF-8 bytes with its tokens' ends), in table order; :meth:`batches` makes the rows."""

    def __init__(self, windows: _Windows, order: np.ndarray, split_of_row: np.ndarray, sources: list[str],
                 prefix_ids: list[int], prefix_tokens: list[str]):
        self.windows, self.order, self.split_of_row = windows, order, split_of_row
        self.sources = np.asarray(sources, dtype=object)
        self.prefix_ids = np.asarray(prefix_ids, dtype=np.int32)
        pieces = [token.encode("utf-8") for token in prefix_tokens]
        self.prefix_text = np.frombuffer(b"".join(pieces), dtype=np.uint8)
        self.prefix_ends = np.cumsum([len(piece) for piece in pieces], dtype=np.int64)

    @property
    def rows(self) -> int:
        return len(self.order)

    def schema(self, lineage: dict[str, str] | None = None) -> pa.Schema:
        schema = SEQUENCES_SCHEMA
        for name in lineage or {}:
            schema = schema.append(pa.field(name, pa.string()))
        return schema

    def batches(self, rows_per_batch: int = ROW_GROUP_ROWS, lineage: dict[str, str] | None = None) -> Iterator[pa.RecordBatch]:
        """The table's rows in order, ``rows_per_batch`` at a time; ``lineage`` adds a
        constant string column per entry (model, config_hash, run_id)."""
        for start in range(0, self.rows, rows_per_batch):
            yield self._batch(start, min(start + rows_per_batch, self.rows), lineage or {})

    def _batch(self, start: int, stop: int, lineage: dict[str, str]) -> pa.RecordBatch:
        w, rows = self.windows, self.order[start:stop]
        n_rows = len(rows)
        prefixed = w.prefixed[rows]
        n_prefix, prefix_bytes = len(self.prefix_ids), len(self.prefix_text)
        body_len = w.id_offsets[rows + 1] - w.id_offsets[rows]
        list_offsets = _offsets(body_len + prefixed * n_prefix)
        body_start = list_offsets[:-1] + prefixed * n_prefix
        body_at = _segments(body_start, body_len)
        body_from = _segments(w.id_offsets[rows], body_len)
        prefix_at = _segments(list_offsets[:-1][prefixed], np.full(int(prefixed.sum()), n_prefix))
        ids = np.empty(int(list_offsets[-1]), dtype=np.int32)
        ids[body_at] = w.ids[body_from]
        ids[prefix_at] = np.tile(self.prefix_ids, int(prefixed.sum()))
        # Token strings: one UTF-8 buffer per batch, each string from its token's start to its end.
        text_len = w.text_offsets[rows + 1] - w.text_offsets[rows]
        text_offsets = _offsets(text_len + prefixed * prefix_bytes)
        text_start = text_offsets[:-1] + prefixed * prefix_bytes
        text = np.empty(int(text_offsets[-1]), dtype=np.uint8)
        text[_segments(text_start, text_len)] = w.text[_segments(w.text_offsets[rows], text_len)]
        text[_segments(text_offsets[:-1][prefixed], np.full(int(prefixed.sum()), prefix_bytes))] = \
            np.tile(self.prefix_text, int(prefixed.sum()))
        ends = np.empty(len(ids), dtype=np.int64)
        ends[body_at] = w.ends[body_from] + np.repeat(text_start, body_len)
        ends[prefix_at] = np.tile(self.prefix_ends, int(prefixed.sum())) + np.repeat(text_offsets[:-1][prefixed], n_prefix)
        string_offsets = np.concatenate([[0], ends]).astype(np.int32)
        strings = pa.StringArray.from_buffers(len(ids), pa.py_buffer(string_offsets), pa.py_buffer(text))
        offsets = pa.array(list_offsets.astype(np.int32))
        columns = [
            pa.array(np.arange(start, stop, dtype=np.int64)),
            pa.array(SPLIT_NAMES[self.split_of_row[start:stop]], pa.string()),
            pa.array(self.sources[w.source[rows]], pa.string()),
            pa.array(w.doc_id[rows]),
            pa.ListArray.from_arrays(offsets, pa.array(ids)),
            pa.ListArray.from_arrays(offsets, strings),
            pa.array(w.prefix_len[rows]),
            pa.array((list_offsets[1:] - list_offsets[:-1]).astype(np.int32)),
        ]
        columns += [pa.array(np.full(n_rows, value, dtype=object), pa.string()) for value in lineage.values()]
        return pa.RecordBatch.from_arrays(columns, schema=self.schema(lineage))


SPLIT_NAMES = np.asarray([split.value for split in Split], dtype=object)


def _offsets(lengths: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)


def _segments(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The positions start, start+1, ..., start+length-1 of every segment, back to back."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    step = np.ones(total, dtype=np.int64)
    nonempty = lengths > 0
    starts = np.asarray(starts, dtype=np.int64)[nonempty]
    ends_before = (starts[:-1] + lengths[nonempty][:-1])  # where each nonempty segment ends
    step[0] = starts[0]
    step[np.cumsum(lengths[nonempty])[:-1]] = starts[1:] - ends_before + 1
    return np.cumsum(step)

def read_documents(source: SourceConfig) -> Iterator[str | list[dict]]:
    """The documents of one source, in file order: text, or a chat (list of messages)."""
    if source.kind == "builtin":
        yield from _builtin_documents(source.path)
        return
    path = Path(source.path).expanduser()
    if not path.exists():
        raise CorpusError(f"source '{source.name}': {path} does not exist; fix corpus.sources[].path")
    if source.kind == "text":
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in {".txt", ".md", ".rst"}) if path.is_dir() else [path]
        for file in files:
            if _binary_file(file, source, alone=not path.is_dir()):
                continue
            yield file.read_text(errors="replace")
        return
    field = source.messages_field or source.text_field
    if source.kind == "jsonl":
        with path.open("rb") as handle:  # decoded line by line, so a bad byte names its line
            for line_no, raw in enumerate(handle, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise CorpusError(
                        f"source '{source.name}': {path}:{line_no} is not UTF-8 (byte {err.start + 1} of the line); "
                        "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                    ) from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CorpusError(f"source '{source.name}': {path}:{line_no} is not JSON ({err.msg}); "
                                      "write one JSON object per line") from None
                if not isinstance(row, dict):
                    raise CorpusError(
                        f"source '{source.name}': {path}:{line_no} is a JSON {type(row).__name__}, not an object; "
                        f"write one object per line, e.g. {{\"{field}\": ...}}"
                    )
                yield _field(row, field, source, f"{path}:{line_no}")
        return
    try:
        frame = pl.read_parquet(path, columns=None)
    except (pl.exceptions.PolarsError, OSError) as err:
        raise CorpusError(f"source '{source.name}': {path} is not a readable Parquet file "
                          f"({str(err).splitlines()[0]}); point corpus.sources[].path at a Parquet file") from None
    if field not in frame.columns:
        raise CorpusError(f"source '{source.name}': {path} has no column '{field}' (columns: {', '.join(frame.columns)}); "
                          "set text_field or messages_field")
    for row_no, value in enumerate(frame.get_column(field).to_list()):
        yield _document(value, field, source, f"{path} row {row_no}")


def _binary_file(file: Path, source: SourceConfig, alone: bool) -> bool:
    """Whether a text source's file is binary (a NUL byte, or mostly bytes that are not UTF-8, in
    its first 8 KB): skipped with a warning in a folder, refused when it is the source's one file.
    Text that is merely not UTF-8 (latin-1, say) is read as before, undecodable bytes replaced."""
    with file.open("rb") as handle:
        head = handle.read(8192)
    undecodable = head.decode("utf-8", errors="replace").count("\ufffd") / max(len(head), 1)
    nul = b"\x00" in head
    if not nul and undecodable <= 0.3:
        return False
    why = (f"{file} is a binary file, not text ({'a NUL byte' if nul else 'mostly bytes that are not UTF-8'} "
           "in its first 8 KB; UTF-16 text must be re-encoded as UTF-8)")
    if alone:
        raise CorpusError(f"source '{source.name}': {why}; point corpus.sources[].path at text files (.txt, .md, .rst), "
                          "or use kind: jsonl or parquet for other formats")
    warnings.warn(f"source '{source.name}': skipped {why}; move it out of {source.path} to silence this", stacklevel=2)
    return True


# -- tokenizing into windows ------------------------------------------------------------

DOCUMENTS_PER_BATCH = 256  # documents tokenized per call, at most
FIRST_BATCH_DOCUMENTS = 8
CHARACTERS_PER_BATCH = 2_000_000  # ... and at most about this much text


@dataclass
class _Windows:
    """Windows in flat buffers. A window's token strings are its UTF-8 text cut at ``ends``
    (each token's end in bytes within the window's text), so they concatenate to the text
    and each carries its leading whitespace; the configured prefix is not stored here but
    put before every window marked ``prefixed`` when the rows are made."""

    ids: np.ndarray  # int32, every window's token ids back to back
    id_offsets: np.ndarray  # int64, windows + 1
    text: np.ndarray  # uint8, every window's text back to back
    text_offsets: np.ndarray  # int64, windows + 1
    ends: np.ndarray  # int32, beside ids
    doc_id: np.ndarray  # int64
    prefix_len: np.ndarray  # int16
    prefixed: np.ndarray  # bool: a text window (the prefix goes first), not a chat (its own header is in it)
    source: np.ndarray  # int16, the source's place in corpus.sources

    @staticmethod
    def concatenate(parts: list[_Windows]) -> _Windows:
        """One buffer of the parts' windows, in order. The parts are consumed: each field is
        emptied once copied, so the peak is the windows plus one field, not twice the windows."""
        if len(parts) == 1:
            return parts[0]

        def offsets(name: str, sizes: str) -> np.ndarray:
            shift = np.cumsum([0] + [len(getattr(p, sizes)) for p in parts[:-1]])
            return np.concatenate([getattr(p, name)[:-1] + s for p, s in zip(parts, shift)]
                                  + [[sum(len(getattr(p, sizes)) for p in parts)]]).astype(np.int64)

        fields = {"id_offsets": offsets("id_offsets", "ids"), "text_offsets": offsets("text_offsets", "text")}
        for name in ("ids", "text", "ends", "doc_id", "prefix_len", "prefixed", "source"):
            fields[name] = np.concatenate([getattr(p, name) for p in parts])
            for part in parts:
                setattr(part, name, getattr(part, name)[:0])
        return _Windows(**fields)


@dataclass
class _SourceWindows:
    windows: _Windows
    doc_windows: list[int]  # windows per usable document, in document order

    @property
    def n_windows(self) -> int:
        return len(self.windows.doc_id)


def _source_windows(source, tokenizer, config, n_prefix: int, wanted: int, encoder) -> _SourceWindows:
    """The windows of one source's documents, read in batches until ``wanted`` windows are found."""
    window_len = config.seq_len - n_prefix
    rng = random.Random(f"{config.seed}:{source.name}")
    special = np.asarray(sorted(tokenizer.all_special_ids), dtype=np.int64)
    source_no = [s.name for s in config.sources].index(source.name)
    read = _Count()
    chunks: list[_Windows] = []
    doc_windows: list[int] = []
    n_windows = longest = 0
    for batch, (ids, ends, offsets) in encoder.map(_document_batches(source, tokenizer, read)):
        starts, lengths, docs, prefix_lens = [], [], [], []
        for k, (doc_id, is_chat) in enumerate(zip(batch.doc_ids, batch.is_chat)):
            first, n = int(offsets[k]), int(offsets[k + 1] - offsets[k])
            if is_chat:
                own = ~np.isin(ids[first:first + n], special)
                # The template's leading special tokens (BOS, a header start) are the chat's fixed
                # prefix: attention-sink outliers there must not win a top-k.
                prefix_len = int(own.argmax()) if own.any() else n
                if n - prefix_len < 2:
                    continue
                longest = max(longest, min(n, config.seq_len))
                cut = [(first, min(n, config.seq_len), min(prefix_len, config.seq_len - 1))]
            else:
                longest = max(longest, n)
                at = list(range(0, n - window_len + 1, window_len))
                if len(at) > config.max_windows_per_document:
                    at = sorted(rng.sample(at, config.max_windows_per_document))
                cut = [(first + s, window_len, n_prefix) for s in at]
            if not cut:
                continue
            for start, length, prefix_len in cut:
                starts.append(start)
                lengths.append(length)
                docs.append((k, doc_id))
                prefix_lens.append(prefix_len)
            doc_windows.append(len(cut))
            n_windows += len(cut)
            if n_windows >= wanted:
                break
        if starts:
            chunks.append(_cut_windows(batch, ids, ends, offsets, starts, lengths, docs, prefix_lens, source_no))
        if n_windows >= wanted:
            break
    if read.documents == 0:
        raise CorpusError(f"source '{source.name}' ({source.kind} {source.path}) has no documents; point it at non-empty files")
    if not chunks:
        raise CorpusError(
            f"no document of source '{source.name}' is long enough: a window needs {window_len} tokens "
            f"(corpus.seq_len={config.seq_len} minus a {n_prefix}-token prefix) and the longest document "
            f"has {longest}; lower corpus.seq_len or add longer documents"
        )
    return _SourceWindows(_Windows.concatenate(chunks), doc_windows)


def _cut_windows(batch, ids, ends, offsets, starts, lengths, docs, prefix_lens, source_no) -> _Windows:
    """The windows of one tokenized batch as flat buffers, with no loop over tokens.

    The batch's texts are read as one text: a token's string is the text from the previous
    token's end (the document's start for its first token) to its own end."""
    starts, lengths = np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)
    doc_k = np.asarray([k for k, _ in docs], dtype=np.int64)
    tokens_per_doc = offsets[1:] - offsets[:-1]
    char_start = _offsets([len(text) for text in batch.texts])
    joined = "".join(batch.texts)
    # End of every token's string in the joined text; an end before the previous one (byte-level
    # pieces of one character) gives an empty string.
    bound = np.maximum.accumulate(ends + np.repeat(char_start[:-1], tokens_per_doc)) if len(ends) else ends
    byte_of = _byte_positions(joined)
    if byte_of is not None:
        bound, char_start = byte_of[bound], byte_of[char_start]
    token_at = _segments(starts, lengths)
    first_of_doc = starts == offsets[doc_k]
    text_start = np.where(first_of_doc, char_start[doc_k], bound[np.maximum(starts - 1, 0)])
    text_end = bound[starts + lengths - 1]
    data = np.frombuffer(joined.encode("utf-8"), dtype=np.uint8)
    return _Windows(
        ids=ids[token_at].astype(np.int32),
        id_offsets=_offsets(lengths),
        text=data[_segments(text_start, text_end - text_start)],
        text_offsets=_offsets(text_end - text_start),
        ends=(bound[token_at] - np.repeat(text_start, lengths)).astype(np.int32),
        doc_id=np.asarray([doc_id for _, doc_id in docs], dtype=np.int64),
        prefix_len=np.asarray(prefix_lens, dtype=np.int16),
        prefixed=~np.asarray(batch.is_chat, dtype=bool)[doc_k],
        source=np.full(len(starts), source_no, dtype=np.int16),
    )


def _byte_positions(text: str) -> np.ndarray | None:
    """For every character position of ``text`` (and its end), the position in its UTF-8
    bytes; None when the two are the same (ASCII)."""
    if text.isascii():
        return None
    code_points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    width = 1 + (code_points >= 0x80) + (code_points >= 0x800) + (code_points >= 0x10000)
    return _offsets(width)


@dataclass
class _Batch:
    doc_ids: list[int]
    is_chat: list[bool]
    texts: list[str]


class _Count:
    documents = 0


def _document_batches(source, tokenizer, read: _Count) -> Iterator[_Batch]:
    """The source's usable documents as text (a chat rendered with the chat template), in
    batches; ``read`` counts every document read, usable or not."""
    batch, size, limit = _Batch([], [], []), 0, FIRST_BATCH_DOCUMENTS
    for doc_id, document in enumerate(read_documents(source)):
        read.documents += 1
        if isinstance(document, list):
            text, is_chat = _chat_text(document, source, doc_id, tokenizer), True
        elif isinstance(document, str) and document.strip():
            text, is_chat = document, False
        else:
            continue
        batch.doc_ids.append(doc_id)
        batch.is_chat.append(is_chat)
        batch.texts.append(_encodable(text))
        size += len(text)
        if len(batch.texts) >= limit or size >= CHARACTERS_PER_BATCH:
            yield batch
            # Batches grow from a few documents: a small corpus reads little beyond what it needs.
            batch, size, limit = _Batch([], [], []), 0, min(2 * limit, DOCUMENTS_PER_BATCH)
    if batch.texts:
        yield batch


def _encodable(text: str) -> str:
    """The text with any lone surrogate (from a JSON escape) replaced by '?', one character
    each, so the tokenizer and UTF-8 accept it."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="replace").decode("utf-8")


def _chat_text(messages, source, doc_id, tokenizer) -> str:
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
    return tokenizer.apply_chat_template(messages, tokenize=False)


# -- tokenizers: in this process or in a pool of workers -----------------------------------


AUTO_WORKERS_FROM = 30_000  # sequences in all: below, starting workers costs more than it saves


def tokenize_workers(config: CorpusConfig) -> int:
    """The worker processes corpus.tokenize_workers asks for (see its docs for auto)."""
    if config.tokenize_workers != "auto":
        return int(config.tokenize_workers)
    if config.sequences_per_split * len(Split) < AUTO_WORKERS_FROM:
        return 0
    return min(os.cpu_count() or 1, 8)


def make_encoder(tokenizer, workers: int = 0):
    """Tokenizes batches of texts into flat arrays (ids, character ends, per-text offsets).

    A fast tokenizer is run through its Rust backend (``encode_batch``, which already uses
    every core for a batch); with ``workers`` > 0, batches go to that many processes, each
    holding a copy of the backend, so the per-token conversion to arrays runs in parallel too.
    Any other tokenizer is called in batches through its own ``__call__``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return _CallEncoder(tokenizer)
    split_special = bool(getattr(tokenizer, "split_special_tokens", False))
    if workers > 0:
        return PoolEncoder((backend.to_str(), split_special), workers)
    return _LocalEncoder(backend, split_special)


class _LocalEncoder:
    """The tokenizer's own backend, set as transformers sets it for an untruncated, unpadded
    call, and given back as it was."""

    def __init__(self, backend, split_special: bool):
        self.backend, self.split_special = backend, split_special

    def map(self, batches: Iterator[_Batch]):
        backend = self.backend
        truncation, padding, special = backend.truncation, backend.padding, backend.encode_special_tokens
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = self.split_special
        try:
            for batch in batches:
                yield batch, encode(backend, batch.texts)
        finally:
            if truncation:
                backend.enable_truncation(**truncation)
            if padding:
                backend.enable_padding(**padding)
            backend.encode_special_tokens = special


class _CallEncoder:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def map(self, batches: Iterator[_Batch]):
        for batch in batches:
            encoded = self.tokenizer(batch.texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
            lengths = [len(ids) for ids in encoded["input_ids"]]
            ids = np.fromiter(itertools.chain.from_iterable(encoded["input_ids"]), np.int32, sum(lengths))
            ends = np.fromiter((end for spans in encoded["offset_mapping"] for _, end in spans), np.int64, sum(lengths))
            yield batch, (ids, ends, _offsets(lengths))


def tokenize_with_text(text: str, tokenizer) -> tuple[list[int], list[str]]:
    """Token ids and, for each, the text from the end of the previous token to its own end.

    The strings concatenate to the text, each carrying its leading whitespace, which is how
    explainers and simulators show them.
    """
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids = list(encoded["input_ids"])
    tokens, previous_end = [], 0
    for start, end in encoded["offset_mapping"]:
        piece = text[previous_end:end] if end > previous_end else ""
        tokens.append(piece)
        previous_end = max(previous_end, end)
    return ids, tokens


WINDOW_MARK = "\u2063NEURON_ASSETS_WINDOW\u2063"  # stands in for the window while the header is rendered


def chat_header(chat: ChatPrefixConfig, tokenizer) -> tuple[list[int], list[str]]:
    """Token ids and strings of the chat header before every window: the chat template
    rendered for a system turn and a user turn whose content is ``chat.user`` followed by
    the window, cut where the window would begin. A template that starts with its own BOS
    keeps it; otherwise the tokenizer's BOS comes first, as with a plain prefix."""
    if not getattr(tokenizer, "chat_template", None):
        raise CorpusError(
            f"corpus.chat_prefix needs a chat template, and the tokenizer of {getattr(tokenizer, 'name_or_path', 'the subject')!r} "
            "has none (a base model's, say); set corpus.chat_prefix: null (and corpus.prefix, if you want a fixed text before each window)"
        )
    messages = [{"role": "user", "content": chat.user + WINDOW_MARK}]
    if chat.system is not None:
        messages.insert(0, {"role": "system", "content": chat.system})
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as err:  # a template that rejects a system turn, say
        raise CorpusError(f"the tokenizer's chat template cannot render corpus.chat_prefix: {err}; change or null corpus.chat_prefix") from None
    if WINDOW_MARK not in rendered:
        raise CorpusError("the tokenizer's chat template drops the user turn's content; set corpus.chat_prefix: null")
    header = rendered[: rendered.index(WINDOW_MARK)]
    ids, tokens = tokenize_with_text(header, tokenizer)
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids, tokens = [int(bos)] + ids, [tokenizer.convert_ids_to_tokens(int(bos))] + tokens
    return ids, tokens


def _prefix(prefix_text: str, tokenizer) -> tuple[list[int], list[str]]:
    ids, tokens = [], []
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
    if start_id is not None:
        ids.append(int(start_id))
        tokens.append(tokenizer.convert_ids_to_tokens(int(start_id)))
    if prefix_text:
        more_ids, more_tokens = tokenize_with_text(prefix_text, tokenizer)
        ids += more_ids
        tokens += more_tokens
    return ids, tokens


# -- splitting --------------------------------------------------------------------------


def _split_counts(per_split: int, shares: dict[str, float]) -> dict[str, int]:
    """Sequences per split for each source, summing exactly to per_split (largest remainder)."""
    raw = {name: per_split * share for name, share in shares.items()}
    counts = {name: int(value) for name, value in raw.items()}
    leftover = per_split - sum(counts.values())
    for name in sorted(raw, key=lambda n: raw[n] - counts[n], reverse=True)[:leftover]:
        counts[name] += 1
    return counts


def _assign_documents(doc_windows: list[int], per_split: int, rng: random.Random) -> dict[str, np.ndarray]:
    """Whole documents go to the emptiest split until every split holds per_split windows;
    returns each split's windows (their places in the source, in the order assigned)."""
    first = np.concatenate([[0], np.cumsum(doc_windows, dtype=np.int64)])
    order = list(range(len(doc_windows)))
    rng.shuffle(order)
    taken: dict[str, list[tuple[int, int]]] = {split.value: [] for split in Split}
    filled = {split.value: 0 for split in Split}
    for index in order:
        open_splits = [s for s, n in filled.items() if n < per_split]
        if not open_splits:
            break
        emptiest = min(open_splits, key=lambda s: filled[s])
        take = min(per_split - filled[emptiest], doc_windows[index])
        taken[emptiest].append((int(first[index]), take))
        filled[emptiest] += take
    return {split: _segments(np.asarray([s for s, _ in ranges], dtype=np.int64), np.asarray([n for _, n in ranges], dtype=np.int64))
            for split, ranges in taken.items()}


# -- the built-in offline source ----------------------------------------------------------

STDLIB_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "configparser", "contextlib", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "functools", "glob",
    "gzip", "hashlib", "heapq", "html.parser", "http.client", "inspect", "io", "ipaddress", "itertools", "json",
    "logging", "math", "mimetypes", "operator", "os", "pathlib", "pickle", "pprint", "queue", "random", "re",
    "sched", "secrets", "shlex", "shutil", "socket", "sqlite3", "statistics", "string", "struct", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "tokenize", "traceback", "typing",
    "unittest", "urllib.parse", "uuid", "warnings", "weakref", "xml.etree.ElementTree", "zipfile",
)


def _builtin_documents(name: str) -> Iterator[str]:
    if name == "pydoc_topics":
        from pydoc_data.topics import topics

        for key in sorted(topics):
            yield topics[key]
    elif name == "stdlib_docstrings":
        for module_name in STDLIB_MODULES:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            yield from _docstrings(module)
    else:
        raise CorpusError(f"unknown builtin source '{name}'; the builtin sources are pydoc_topics and stdlib_docstrings")


def _docstrings(module) -> Iterator[str]:
    seen = set()
    objects = [module] + [obj for _, obj in sorted(vars(module).items()) if inspect.isclass(obj) or inspect.isfunction(obj)]
    for obj in objects:
        if getattr(obj, "__module__", module.__name__) != module.__name__ and obj is not module:
            continue
        doc = inspect.getdoc(obj)
        if doc and len(doc) >= 200 and doc not in seen:
            seen.add(doc)
            yield doc


def _field(row: dict, field: str, source: SourceConfig, where: str):
    if field not in row:
        raise CorpusError(f"source '{source.name}': {where} has no field '{field}' (fields: {', '.join(row)}); set text_field or messages_field")
    return _document(row[field], field, source, where)


def _document(value, field: str, source: SourceConfig, where: str):
    """A row's document, of the kind the source says it holds: a chat (a list) for
    messages_field, text otherwise; never one read as the other."""
    if source.messages_field is not None and not isinstance(value, list):
        raise CorpusError(
            f"source '{source.name}': {where}: field '{field}' holds {type(value).__name__ if value is not None else 'null'}, "
            "not a chat (a list of {role, content}); for plain text set text_field instead of messages_field"
        )
    if source.messages_field is None and isinstance(value, list):
        raise CorpusError(
            f"source '{source.name}': {where}: field '{field}' holds a list, not text; "
            f"if it is a chat, set messages_field: {field}"
        )
    return value
