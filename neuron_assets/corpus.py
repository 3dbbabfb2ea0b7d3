"""Corpus: text sources -> fixed-length token sequences -> equal train / val / test splits.

Each text window comes from a single document and is preceded by a fixed prefix: by
default the model's chat header (a system turn and an open user turn, rendered with the
tokenizer's chat template), as Transluce prepends one to its web text; else the tokenizer's
BOS or CLS token and the configured prefix text. A chat (a ``messages`` field) is rendered
with the tokenizer's chat template and cut to ``seq_len``. Each split gets the same number of sequences and the same share of
every source, and a document's windows all land in one split. Everything is seeded.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import polars as pl

from neuron_assets.config import ChatPrefixConfig, CorpusConfig, SourceConfig
from neuron_assets.types import Split


class CorpusError(ValueError):
    """A corpus that cannot be built; the message names the source and the fix."""


@dataclass(frozen=True)
class TokenWindow:
    source: str
    doc_id: int
    token_ids: list[int]
    tokens: list[str]
    prefix_len: int


def build_sequences(config: CorpusConfig, tokenizer) -> pl.DataFrame:
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


# -- tokenizing into windows ------------------------------------------------------------


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
