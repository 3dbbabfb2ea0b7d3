"""A shared prefix computed once: the chat header before every corpus window.

Every text window of the corpus starts with the same header (the chat template's system turn
and open user turn, or BOS and ``corpus.prefix``), and its tokens never count (``prefix_len``).
A causal model's activations after the header do not depend on how the header's keys and
values were computed, so the header runs once (per distinct header and deepest layer) with a
key/value cache kept; each batch then runs only its remaining tokens against that cache
(expanded to the batch's rows), at the positions after the header, with the attention mask
covering header and tokens. The activations of the tokens run are the full pass's (to float
rounding); the header's are never computed, and read as 0 (nothing reads them: every reader of
the pass multiplies by, or slices to, the counted tokens).

Rows of a batch are grouped by their prefix (``token_ids[:prefix_len]``): the text windows share
the header, a chat transcript's prefix is only its template's leading special tokens (its own
system and user turns are counted tokens, so they differ from chat to chat and are run), so
chats form a second group against their own short cached prefix. Each group is one forward
pass of its rows.

Needs a causal model whose forward takes a key/value cache (Llama and the gated family,
GPT-2, GPT-NeoX, OPT, ...); an encoder (BERT, MiniLM) attends both ways, so its header
depends on the tokens after it and it runs the full pass (:func:`prefix_cache_support` says
why).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import torch

from neuron_assets.runtime import cache_argument
from neuron_assets.subject import SubjectModel

HEADERS_KEPT = 8
"""Distinct (prefix, deepest layer) caches kept at once (a corpus has one header, chats one more)."""

Readers = dict[int, Callable[[torch.Tensor], torch.Tensor]]


def prefix_cache_support(subject: SubjectModel) -> str | None:
    """None when the subject can run a shared prefix once, else why not (for the plan's note
    and the log)."""
    model = subject.model
    name = type(model).__name__
    if cache_argument(model) is None:
        return f"{name}'s forward takes no key/value cache; the exemplar pass runs the header in every sequence"
    flags = [module.is_causal for module in model.modules() if isinstance(getattr(module, "is_causal", None), bool)]
    if not flags or not all(flags):
        return (f"{name} attends both ways (an encoder), so its header's keys depend on the tokens after it; "
                "the exemplar pass runs the header in every sequence")
    try:
        from transformers import DynamicCache  # noqa: F401
    except ImportError:
        return "this transformers has no DynamicCache; the exemplar pass runs the header in every sequence"
    return None


class PrefixCache:
    """Runs batches of a subject with each group of rows' shared prefix computed once.

    ``enabled`` False (exemplars.prefix_cache off) or an unsupported subject runs every batch
    as one full pass; :attr:`reason` then says why. :attr:`tokens_run` and
    :attr:`tokens_skipped` count the batch tokens run and left to the cache (padding included)."""

    def __init__(self, subject: SubjectModel, enabled: bool = True):
        self.subject = subject
        self.reason = "exemplars.prefix_cache is off" if not enabled else prefix_cache_support(subject)
        self.headers: OrderedDict[tuple, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self.tokens_run = self.tokens_skipped = self.header_tokens_run = 0

    @property
    def enabled(self) -> bool:
        return self.reason is None

    def activations(self, ids: torch.Tensor, mask: torch.Tensor, prefix_len: np.ndarray,
                    neurons: dict[int, torch.Tensor | None],
                    readers_for: Callable[[torch.Tensor | slice, int], Readers] | None = None) -> dict[int, torch.Tensor]:
        """layer -> (batch, tokens, features) activations, as :meth:`SubjectModel.activations`
        gives for the whole batch, but with the prefix positions of rows run against a cached
        prefix read as 0. ``prefix_len`` (batch,) gives each row's uncounted leading tokens.
        ``readers_for(rows, start)``, where given, makes the readers for the batch rows ``rows``
        (a slice or an index tensor) reading from token ``start`` on; a reader maps the site's
        (rows, tokens from start, width) input to (rows, tokens from start, features)."""
        rows_all = slice(0, ids.shape[0])
        if not self.enabled:
            return self._run(ids, mask, rows_all, 0, neurons, readers_for)
        groups = _prefix_groups(ids, prefix_len)
        if len(groups) == 1:
            (start, rows), = groups.items()
            if start == 0:
                return self._run(ids, mask, rows_all, 0, neurons, readers_for)
            parts = [(rows_all, start, self._run(ids, mask, rows_all, start, neurons, readers_for))]
        else:
            parts = []
            for start, rows in groups.items():
                index = torch.as_tensor(rows, dtype=torch.long)
                parts.append((index, start, self._run(ids[index], mask[index], index, start, neurons, readers_for)))
        return _full_length(parts, ids.shape[0], ids.shape[1])

    def _run(self, ids, mask, rows, start: int, neurons, readers_for) -> dict[int, torch.Tensor]:
        """One forward pass of some rows from token ``start`` on (0: the full pass)."""
        readers = readers_for(rows, start) if readers_for is not None else None
        self.tokens_run += ids.shape[0] * (ids.shape[1] - start)
        if start == 0:
            return (self.subject.activations(ids, mask, neurons, readers) if readers
                    else self.subject.activations(ids, mask, neurons))
        self.tokens_skipped += ids.shape[0] * start
        past = self._past(ids[0, :start], max(neurons), ids.shape[0])
        positions = torch.arange(start, ids.shape[1]).unsqueeze(0).expand(ids.shape[0], -1)
        tail = ids[:, start:]
        if readers:
            return self.subject.activations(tail, mask, neurons, readers, past=past, position_ids=positions)
        return self.subject.activations(tail, mask, neurons, past=past, position_ids=positions)

    def _past(self, header: torch.Tensor, deepest: int, rows: int):
        """A fresh key/value cache of ``header`` through layer ``deepest`` for ``rows`` rows: the
        header's keys and values are computed once and expanded (a view; the cache copies them
        as it grows)."""
        from transformers import DynamicCache

        key = (tuple(header.tolist()), deepest)
        layers = self.headers.get(key)
        if layers is None:
            computed = DynamicCache()
            self.subject.activations(header.unsqueeze(0), torch.ones((1, len(header)), dtype=torch.long),
                                     {deepest: torch.empty(0, dtype=torch.long)}, past=computed)
            self.header_tokens_run += len(header)
            layers = [(layer.keys, layer.values) for layer in computed.layers[: deepest + 1]]
            self.headers[key] = layers
            while len(self.headers) > HEADERS_KEPT:
                self.headers.popitem(last=False)
        self.headers.move_to_end(key)
        expanded = [(keys.expand(rows, *keys.shape[1:]), values.expand(rows, *values.shape[1:]))
                    for keys, values in layers]
        return DynamicCache(ddp_cache_data=expanded, config=self.subject.model.config)

    def summary(self) -> str:
        """A line for the log: what the cache saved, or why it was off."""
        if not self.enabled:
            return f"prefix cache off: {self.reason}"
        total = self.tokens_run + self.tokens_skipped
        share = self.tokens_skipped / total if total else 0.0
        return (f"prefix cache: {self.tokens_skipped:,} of {total:,} batch tokens ({share:.0%}) came from "
                f"{len(self.headers)} cached prefix(es), {self.header_tokens_run:,} prefix tokens run once")


def _prefix_groups(ids: torch.Tensor, prefix_len: np.ndarray) -> dict[int, list[int]]:
    """Prefix length -> the rows run against one cached prefix of that length (rows with the
    same prefix tokens); rows with a prefix of their own, or none, go to 0 (the full pass).
    The largest group of each prefix length is cached."""
    by_prefix: dict[tuple, list[int]] = {}
    lengths = [int(n) for n in prefix_len]
    for row, n in enumerate(lengths):
        by_prefix.setdefault((n, tuple(ids[row, :n].tolist())), []).append(row)
    groups: dict[int, list[int]] = {}
    for (n, _), rows in sorted(by_prefix.items(), key=lambda item: -len(item[1])):
        start = n if n > 0 and n not in groups else 0
        groups.setdefault(start, []).extend(rows)
    return {start: sorted(rows) for start, rows in groups.items()}


def _full_length(parts, batch: int, seq_len: int) -> dict[int, torch.Tensor]:
    """The parts' activations side by side as (batch, seq_len, features), 0 before each part's
    start. A layer's parts are let go as its full tensor is made, so the copy holds one more
    layer at a time, not a second batch of captured activations."""
    out = {}
    for layer in list(parts[0][2]):
        pieces = [(rows, start, captured.pop(layer)) for rows, start, captured in parts]
        first = pieces[0][2]
        if len(pieces) == 1:
            zeros = first.new_zeros((batch, pieces[0][1], first.shape[-1]))
            out[layer] = torch.cat([zeros, first], dim=1)
        else:
            full = first.new_zeros((batch, seq_len, first.shape[-1]))
            for rows, start, piece in pieces:
                full[rows.to(full.device), start:] = piece
            out[layer] = full
        del pieces, first
    return out
