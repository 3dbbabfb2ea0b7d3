"""Showing a sequence with a feature's activating tokens marked, for people (terminal, UI)."""

from __future__ import annotations

import numpy as np

from neuron_assets.markdown import markdown_table  # noqa: F401 (re-exported: neuron_assets.defs imports it here)
from neuron_assets.types import ActivationRecord, Polarity

BOLD, DIM, RESET = "\033[1m\033[33m", "\033[2m", "\033[0m"


def marked_tokens(record: ActivationRecord, polarity: Polarity, threshold_share: float = 0.5, reference: float | None = None):
    """(token, value, marked) per token; marked = at least ``threshold_share`` of the
    reference (default: this sequence's own extreme). The fixed prefix is never marked."""
    values = record.polarity_activations(polarity)
    counted = values[record.prefix_len :]
    top = reference if reference is not None else (float(counted.max()) if counted.size else 0.0)
    threshold = threshold_share * top if top > 0 else np.inf
    return [
        (token, float(value), position >= record.prefix_len and value >= threshold and value > 0)
        for position, (token, value) in enumerate(zip(record.tokens, values))
    ]


def highlight_markdown(record: ActivationRecord, polarity: Polarity, reference: float | None = None) -> str:
    parts = []
    for token, _, marked in marked_tokens(record, polarity, reference=reference):
        text = token.replace("\n", " ").replace("|", "\\|").replace("*", "\\*")
        stripped = text.lstrip()
        parts.append(text[: len(text) - len(stripped)] + f"**{stripped}**" if marked and stripped else text)
    return "".join(parts)


def highlight_terminal(record: ActivationRecord, polarity: Polarity, color: bool, reference: float | None = None) -> str:
    """Marked tokens in bold yellow (or wrapped in {{ }} without color); the prefix dimmed."""
    parts = []
    for position, (token, _, marked) in enumerate(marked_tokens(record, polarity, reference=reference)):
        text = token.replace("\n", "⏎")
        if position < record.prefix_len:
            parts.append(f"{DIM}{text}{RESET}" if color else text)
        elif marked:
            stripped = text.lstrip()
            lead = text[: len(text) - len(stripped)]
            parts.append(lead + (f"{BOLD}{stripped}{RESET}" if color else "{{" + stripped + "}}"))
        else:
            parts.append(text)
    return "".join(parts)
