"""Transluce's released simulator (Hugging Face ``Transluce/llama_8b_simulator``): its input.

``simulate.finetuned.input_format: transluce`` loads that checkpoint from a local folder
(``simulate.finetuned.checkpoint``; the loader is
:func:`neuron_assets.simulate.finetuned.load_released_simulator`, beside the project's own
checkpoint format) and feeds it exactly the input built here, the one it was trained on, as
TransluceAI/observatory builds it (``FinetunedSimulator.simulate`` in
``lib/explanations/explanations/simulation_utils.py``; the tokenizer in
``lib/explanations/explanations/llama_model.py``):

- the text ``## Neuron Description: {description}\\n\\n ## Input: `` tokenized as one string
  by the checkpoint's tokenizer, which puts its BOS first;
- then the subject's token ids of the whole sequence, its chat prefix included (the released
  simulator shares Llama-3.1's tokenizer with the subject and saw the prefix in training);
- every id of Llama's four chat special tokens, the BOS in front included, replaced by one of
  four tokens added to the tokenizer after a ``<PAD>`` token (so the chat template's tokens
  in the input never look like the simulator's own turn markers);
- the 11 classes are the first 11 logits of the vocabulary, read at each input token's own
  position, and the prediction is their softmax's expected value.

The published code left-pads a batch with ``<PAD>`` and counts positions from the first real
token; here a batch is right-padded with ``<PAD>``, which gives every real token the same
position and the same causal context, so the logits are the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from neuron_assets.excerpts import CHAT_TOKEN_STAND_INS, transluce_text
from neuron_assets.simulate.alignment import NOT_READ, EncodedPair
from neuron_assets.types import ActivationRecord

# The exact input text (observatory, lib/explanations/explanations/simulation_utils.py,
# FinetunedSimulator.simulate: f"## Neuron Description: {exp}\n\n ## Input: ").
INPUT_TEMPLATE = "## Neuron Description: {description}\n\n ## Input: "

# observatory, lib/explanations/explanations/llama_model.py: the pad token added first (it
# takes the first id after Llama's 128,256), then the four tokens that stand in for the chat
# special tokens (ids 128,257-128,260), in this order (CHAT_TOKEN_STAND_INS, kept in
# neuron_assets.excerpts because the distilled explainer's prompt format writes them too).
PAD_TOKEN = "<PAD>"
# The same mapping as the published ids (llama_model.py, UPD_MAPPING), for Llama-3.1's
# tokenizer: a tokenizer with Llama's vocabulary must give exactly these.
LLAMA31_REMAP = {128000: 128257, 128006: 128258, 128007: 128259, 128009: 128260}
LLAMA31_VOCAB = 128256

NUM_CLASS_LOGITS = 11  # the first 11 vocabulary rows are the classes 0..10
DOWNLOAD_HINT = ("download it once with `hf download Transluce/llama_8b_simulator --local-dir DIR` "
                 "and set simulate.finetuned.checkpoint: DIR")


class TransluceLayoutError(ValueError):
    """A tokenizer or checkpoint that does not have the released simulator's layout."""


def add_transluce_tokens(tokenizer) -> dict[int, int]:
    """Give ``tokenizer`` the released layout (``<PAD>`` as pad token, then the four
    stand-ins) where it lacks it, as the published loader does, and return the id remapping
    {chat token id: stand-in id}. A tokenizer without Llama's chat tokens cannot take it."""
    missing = [name for name, _ in CHAT_TOKEN_STAND_INS if name not in tokenizer.get_vocab()]
    if missing:
        raise TransluceLayoutError(
            f"the tokenizer has no {', '.join(missing)}: Transluce's simulator input needs Llama-3.1's "
            "tokenizer (the released checkpoint's own)")
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.add_tokens([stand_in for _, stand_in in CHAT_TOKEN_STAND_INS])
    vocab = tokenizer.get_vocab()
    remap = {vocab[name]: vocab[stand_in] for name, stand_in in CHAT_TOKEN_STAND_INS}
    if vocab.get("<|begin_of_text|>") == 128000 and len(tokenizer) == LLAMA31_VOCAB + 5 and remap != LLAMA31_REMAP:
        raise TransluceLayoutError(f"the added tokens got ids {remap}, not the published {LLAMA31_REMAP}: the "
                                   "tokenizer folder holds other added tokens; use the checkpoint's own tokenizer")
    return remap


class TransluceEncoder:
    """Pair encoder ``transluce``: the released simulator's exact input ids (module doc)."""

    name = "transluce"

    def __init__(self, tokenizer, max_length: int):
        vocab = tokenizer.get_vocab()
        absent = [stand_in for _, stand_in in CHAT_TOKEN_STAND_INS if stand_in not in vocab]
        if absent or PAD_TOKEN not in vocab:
            raise TransluceLayoutError("the tokenizer lacks Transluce's added tokens; call add_transluce_tokens first")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.remap = {vocab[name]: vocab[stand_in] for name, stand_in in CHAT_TOKEN_STAND_INS}
        self.first_added = vocab[PAD_TOKEN]  # subject ids at or above it come from another tokenizer

    def encode(self, description: str, record: ActivationRecord) -> EncodedPair:
        return self.join(self.description_part(description), self.record_part(record), record)

    def description_part(self, description: str) -> dict:
        """The description's head ids by the room left to them (filled as pairs need them)."""
        return {"description": description}

    def record_part(self, record: ActivationRecord) -> tuple[list[int], np.ndarray]:
        return self.body_ids(record)

    def join(self, described: dict, recorded: tuple[list[int], np.ndarray], record: ActivationRecord) -> EncodedPair:
        body, last = recorded
        room = self.max_length - len(body)
        head = described.get(room)
        if head is None:
            head = described[room] = self.head_ids(described["description"], room=room)
        ids = [self.remap.get(i, i) for i in head + body]
        read_at = np.full(len(record.tokens), NOT_READ, dtype=np.int64)
        own = last[record.prefix_len :]
        read_at[record.prefix_len :] = np.where(own >= 0, own + len(head), NOT_READ)
        return EncodedPair(tuple(ids), read_at)

    def body_ids(self, record: ActivationRecord) -> tuple[list[int], np.ndarray]:
        """The subject's ids, and the position of each subject token among them. A record with
        no ids (a puzzle written as text) has each token tokenized alone and read at its last
        piece, the fallback observatory's code leaves open for a subject of another tokenizer."""
        ids = [int(i) for i in record.token_ids]
        if len(ids) == len(record.tokens) and all(i >= 0 for i in ids):
            foreign = [i for i in ids if i >= self.first_added]
            if foreign:
                raise ValueError(f"sequence {record.seq_id} holds token id {foreign[0]}, outside the simulator's "
                                 f"vocabulary of {self.first_added}: the subject must use Llama-3.1's tokenizer")
            return ids, np.arange(len(ids), dtype=np.int64)
        ids, last = [], np.full(len(record.tokens), NOT_READ, dtype=np.int64)
        for i, token in enumerate(record.tokens):
            ids += self.tokenizer(transluce_text(token), add_special_tokens=False)["input_ids"]
            if ids:
                last[i] = len(ids) - 1
        return ids, last

    def head_ids(self, description: str, room: int) -> list[int]:
        """The tokenized text before the subject's ids; a description too long for ``room``
        tokens is cut at its end (the published code never cuts: its inputs were short)."""
        text = transluce_text(description)
        while True:
            ids = list(self.tokenizer(INPUT_TEMPLATE.format(description=text), add_special_tokens=True)["input_ids"])
            if len(ids) <= room or not text:
                if len(ids) > room:
                    raise ValueError(f"simulate.finetuned.max_length ({self.max_length}) leaves no room for the "
                                     "input's header; raise it")
                return ids
            text = text[: max(0, min(len(text) - 1, len(text) * room // len(ids)))].rstrip()


def checkpoint_problem(directory: Path) -> str | None:
    """What a folder lacks to be loaded as the released simulator, or None."""
    if not directory.exists():
        return "does not exist"
    if not directory.is_dir():
        return "is not a folder"
    if not (directory / "config.json").is_file():
        return "has no config.json"
    weights = _files(directory, ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json"))
    if not weights:
        return "has no model weights (*.safetensors or pytorch_model*.bin)"
    if not _files(directory, ("tokenizer.json", "tokenizer_config.json")):
        return "has no tokenizer (tokenizer.json / tokenizer_config.json)"
    return None


def _files(directory: Path, patterns: Sequence[str]) -> list[Path]:
    return [path for pattern in patterns for path in directory.glob(pattern)]
