"""Transluce's fine-tuned simulator: a transformer with an 11-class head at every token.

The input is ``## Neuron Description: {description} ## Input: {tokens}`` (see
:mod:`neuron_assets.simulate.alignment`); the head gives, at each subject token, a
distribution over the activation values 0..10, and the prediction is its expected value.

Heads (``head`` in the checkpoint's spec):

- ``token_classification``: a new linear layer on the last hidden state (any encoder or
  decoder; the embedded default fine-tunes the MiniLM the package ships).
- ``lm_head_slots``: the first 11 rows of a causal LM's output layer, as Transluce does
  with Llama-3.1-8B-Instruct, so no new parameters are needed.

A checkpoint is a folder: the model (safetensors) and its config, the tokenizer (with the
control-token display forms as added tokens), and ``simulator.json`` (:class:`SimulatorSpec`).
:data:`CHECKPOINT_FORMATS` (``simulate.finetuned.input_format``) says how a folder is read:
``project`` (such a folder), or ``transluce`` (Transluce's released simulator, which has no
``simulator.json``: :func:`load_released_simulator`; its exact input is built in
:mod:`neuron_assets.simulate.transluce`).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from neuron_assets.excerpts import CHAT_TOKEN_STAND_INS
from neuron_assets.runtime import choose_device, choose_dtype, quiet_transformers
from neuron_assets.simulate.alignment import (
    DESCRIPTION_HEAD,
    INPUT_HEAD,
    NOT_READ,
    PAIR_ENCODERS,
    EncodedPair,
    PairEncoder,
)
from neuron_assets.simulate.base import NUM_CLASSES, SimulatedActivations
from neuron_assets.simulate.transluce import (
    DOWNLOAD_HINT,
    INPUT_TEMPLATE,
    PAD_TOKEN,
    TransluceEncoder,
    TransluceLayoutError,
    add_transluce_tokens,
    checkpoint_problem,
)
from neuron_assets.types import ActivationRecord

# Every way a simulator's input is built: the project's two alignments and Transluce's exact one.
ENCODERS: dict[str, type[PairEncoder]] = {**PAIR_ENCODERS, TransluceEncoder.name: TransluceEncoder}

SPEC_FILE = "simulator.json"
SPEC_VERSION = 1


class SimulatorLoadError(ValueError):
    """A simulator checkpoint or backbone that cannot be loaded; the message says why."""


@dataclass(frozen=True)
class SimulatorSpec:
    """What a checkpoint folder is, beside its weights: written to ``simulator.json``."""

    head: str
    alignment: str
    max_length: int
    backbone: str  # the model it was fine-tuned from
    added_tokens: tuple[str, ...] = ()
    num_classes: int = NUM_CLASSES
    template: str = DESCRIPTION_HEAD + "{description}" + INPUT_HEAD + "{tokens}"
    version: int = SPEC_VERSION
    extra: dict = field(default_factory=dict)  # training summary, for people

    def write(self, directory: Path) -> None:
        payload = asdict(self)
        payload["added_tokens"] = list(self.added_tokens)
        (Path(directory) / SPEC_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True))

    @classmethod
    def read(cls, directory: Path) -> SimulatorSpec:
        path = Path(directory) / SPEC_FILE
        if not path.is_file():
            raise SimulatorLoadError(f"{directory} is not a simulator checkpoint: it has no {SPEC_FILE}")
        payload = json.loads(path.read_text())
        if payload.get("version") != SPEC_VERSION:
            raise SimulatorLoadError(f"{path}: spec version {payload.get('version')} is not {SPEC_VERSION}")
        payload["added_tokens"] = tuple(payload.get("added_tokens", ()))
        return cls(**payload)


# -- heads --------------------------------------------------------------------------------


class ClassHead(Protocol):
    name: str

    def load(self, path: str, dtype: torch.dtype, overrides: dict, local_only: bool): ...

    def class_logits(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(batch, positions, 11) logits."""
        ...


class TokenClassificationHead:
    name = "token_classification"

    def load(self, path: str, dtype: torch.dtype, overrides: dict, local_only: bool):
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification.from_pretrained(
            path, num_labels=NUM_CLASSES, dtype=dtype, local_files_only=local_only, **overrides
        )

    def class_logits(self, model, input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits.float()


class LmHeadSlots:
    """The first 11 output rows of a causal LM: only they are computed, not the whole vocabulary."""

    name = "lm_head_slots"

    def load(self, path: str, dtype: torch.dtype, overrides: dict, local_only: bool):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local_only, **overrides)

    def class_logits(self, model, input_ids, attention_mask):
        model = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: adapters are in place
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        output = model.get_output_embeddings()
        bias = output.bias[:NUM_CLASSES] if getattr(output, "bias", None) is not None else None
        return torch.nn.functional.linear(hidden, output.weight[:NUM_CLASSES], bias).float()


CLASS_HEADS: dict[str, ClassHead] = {head.name: head for head in (TokenClassificationHead(), LmHeadSlots())}


# -- the simulator ------------------------------------------------------------------------


class FinetunedSimulator:
    """Simulator ``finetuned``.

    :meth:`simulate_many` scores the pairs of many features in one go: each description and
    each exemplar is encoded once (:meth:`PairEncoder.join` makes a pair from the two parts,
    and parts are cached across calls, so val, test and the controls reuse an exemplar's),
    the pairs of all features are sorted by length and cut into batches of at most
    ``batch_tokens`` padded tokens (default ``batch_size x max_length``, what ``batch_size``
    pairs of the longest input take), and every batch's predictions are gathered at the read
    positions on the device, into one buffer that is copied to the host once per round of
    jobs (:attr:`PAIRS_PER_ROUND`).
    :meth:`simulate_pairwise` is the direct path (each pair from its whole text, batches of
    ``batch_size`` in record-major order, one host copy per batch): the fast path gives its
    numbers."""

    name = "finetuned"
    PART_CACHE = 20_000  # descriptions and records whose encoded parts are kept
    PAIRS_PER_ROUND = 16_384  # pairs encoded and predicted together (one host copy each round)

    def __init__(self, model, tokenizer, spec: SimulatorSpec, device: torch.device, batch_size: int = 32,
                 batch_tokens: int | None = None):
        if spec.head not in CLASS_HEADS:
            raise SimulatorLoadError(f"unknown head '{spec.head}'; known: {', '.join(CLASS_HEADS)}")
        if spec.alignment not in ENCODERS:
            raise SimulatorLoadError(f"unknown alignment '{spec.alignment}'; known: {', '.join(ENCODERS)}")
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.device = device
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens
        self.head = CLASS_HEADS[spec.head]
        self.encoder: PairEncoder = ENCODERS[spec.alignment](tokenizer, spec.max_length)
        self.pad_id = _pad_id(tokenizer)
        self._descriptions: OrderedDict = OrderedDict()
        self._records: OrderedDict = OrderedDict()

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_backbone(
        cls,
        backbone: str,
        head: str = "token_classification",
        alignment: str = "char_offsets",
        max_length: int = 256,
        backbone_layers: int | None = None,
        added_tokens: Sequence[str] = (),
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 32,
        seed: int = 0,
        allow_download: bool = False,
    ) -> FinetunedSimulator:
        """An untrained simulator on a pretrained backbone (the start of training)."""
        from transformers import AddedToken, AutoTokenizer

        from neuron_assets.subject import resolve_model_path

        path = resolve_model_path(backbone)
        torch_device = choose_device(device)
        overrides = {"num_hidden_layers": backbone_layers} if backbone_layers else {}
        if head not in CLASS_HEADS:
            raise SimulatorLoadError(f"unknown head '{head}'; known: {', '.join(CLASS_HEADS)}")
        with quiet_transformers():
            try:
                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=not allow_download)
                torch.manual_seed(seed)  # the new head's initialization
                model = CLASS_HEADS[head].load(path, choose_dtype(dtype, torch_device), overrides, not allow_download)
            except OSError as err:
                from neuron_assets.builtin_models import missing_model_fix

                raise SimulatorLoadError(
                    f"cannot load the simulator backbone '{backbone}' ({err}); "
                    + missing_model_fix(backbone, "simulate.finetuned", allow_download).replace(
                        "simulate.finetuned.model", "simulate.finetuned.backbone")
                ) from None
            new = [AddedToken(t, normalized=False, special=False) for t in added_tokens if t not in tokenizer.get_vocab()]
            if new:
                tokenizer.add_tokens(new)
                model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
                _embed_added_tokens_by_name(model, tokenizer, [t.content for t in new])
        spec = SimulatorSpec(head, alignment, max_length, backbone, tuple(added_tokens))
        return cls(model.to(torch_device).eval(), tokenizer, spec, torch_device, batch_size)

    @classmethod
    def load(cls, directory: str | Path, device: str = "auto", dtype: str = "auto", batch_size: int = 32) -> FinetunedSimulator:
        """A trained simulator from a checkpoint folder."""
        from transformers import AutoTokenizer

        directory = Path(directory)
        spec = SimulatorSpec.read(directory)
        torch_device = choose_device(device)
        if spec.head not in CLASS_HEADS:
            raise SimulatorLoadError(f"{directory}: unknown head '{spec.head}'; known: {', '.join(CLASS_HEADS)}")
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
            model = CLASS_HEADS[spec.head].load(str(directory), choose_dtype(dtype, torch_device), {}, True)
        return cls(model.to(torch_device).eval(), tokenizer, spec, torch_device, batch_size)

    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with quiet_transformers():
            self.model.save_pretrained(directory)
            self.tokenizer.save_pretrained(directory)
        spec = self.spec if extra is None else SimulatorSpec(**{**asdict(self.spec), "extra": extra})
        spec.write(directory)
        return directory

    # -- LoRA (training) --------------------------------------------------------------------
    def add_lora(self, rank: int, alpha: float, dropout: float = 0.0,
                 target_modules: Sequence[str] | str = "all-linear") -> tuple[int, int]:
        """Wrap the model in fresh peft LoRA adapters: only they (and a new token
        classification head, trained whole) train. Returns (trainable, total) weights."""
        from neuron_assets.finetune import add_lora

        heads = [name for name, child in self.model.named_children() if isinstance(child, torch.nn.Linear)]
        if self.spec.head != TokenClassificationHead.name:
            heads = []  # lm_head_slots: the 11 output rows stay as pretrained
        self.model, trainable, total = add_lora(self.model, rank, alpha, dropout, target_modules, heads or None)
        return trainable, total

    def merge_adapters(self) -> None:
        """Fold LoRA adapters into the weights (a plain transformers model again); no-op without."""
        from neuron_assets.finetune import merge_lora

        self.model = merge_lora(self.model)

    # -- simulating -----------------------------------------------------------------------
    def simulate(self, descriptions: Sequence[str], records: Sequence[ActivationRecord]) -> SimulatedActivations:
        return self.simulate_many([(descriptions, records)])[0]

    def simulate_many(self, jobs: Sequence[tuple[Sequence[str], Sequence[ActivationRecord]]]) -> list[SimulatedActivations]:
        """:meth:`simulate` of every (descriptions, records) job, their pairs batched together
        in rounds of about :attr:`PAIRS_PER_ROUND` pairs (whole jobs), which bound the host
        memory the encoded pairs take."""
        results: list[SimulatedActivations] = []
        round_: list = []
        pairs = 0
        for job in jobs:
            round_.append(job)
            pairs += len(job[0]) * len(job[1])
            if pairs >= self.PAIRS_PER_ROUND:
                results += self._simulate_round(round_)
                round_, pairs = [], 0
        return results + (self._simulate_round(round_) if round_ else [])

    def _simulate_round(self, jobs) -> list[SimulatedActivations]:
        pairs: list[EncodedPair] = []
        for descriptions, records in jobs:
            described = [self._description_part(d) for d in descriptions]
            for record in records:
                recorded = self._record_part(record)
                pairs += [self.encoder.join(part, recorded, record) for part in described]
        flat = self._predict_read(pairs)
        results, position, p = [], 0, 0
        for descriptions, records in jobs:
            result: SimulatedActivations = [[None] * len(records) for _ in descriptions]  # type: ignore[list-item]
            for r, record in enumerate(records):
                for d in range(len(descriptions)):
                    read = pairs[p].read_at != NOT_READ
                    values = np.zeros(len(record.tokens), dtype=np.float32)
                    count = int(read.sum())
                    values[read] = flat[position : position + count]
                    result[d][r] = values
                    position += count
                    p += 1
            results.append(result)
        return results

    def _predict_read(self, pairs: Sequence[EncodedPair]) -> np.ndarray:
        """The expected activation at every read position of every pair, concatenated in
        pair order: length-bucketed batches, gathered on the device, one copy to the host."""
        if not pairs:
            return np.zeros(0, dtype=np.float32)
        counts = np.array([int((pair.read_at != NOT_READ).sum()) for pair in pairs], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        out = torch.zeros(int(counts.sum()), dtype=torch.float32, device=self.device)
        lengths = np.array([len(pair.input_ids) for pair in pairs], dtype=np.int64)
        order = np.argsort(-lengths, kind="stable")  # longest first: the largest batch comes first
        budget = self.batch_tokens or self.batch_size * self.spec.max_length
        self.model.eval()
        with torch.inference_mode():
            for chosen in _length_buckets(order, lengths, budget):
                batch = [pairs[i] for i in chosen]
                input_ids, attention_mask = self.collate(batch)
                probabilities = torch.softmax(self.head.class_logits(self.model, input_ids, attention_mask), dim=-1)
                expected = (probabilities * torch.arange(NUM_CLASSES, device=probabilities.device)).sum(-1)
                source, target = [], []
                for row, (i, pair) in enumerate(zip(chosen, batch)):
                    positions = pair.read_at[pair.read_at != NOT_READ]
                    source.append(row * expected.shape[1] + positions)
                    target.append(np.arange(starts[i], starts[i] + counts[i]))
                out[self._to_device(np.concatenate(target))] = expected.reshape(-1)[self._to_device(np.concatenate(source))]
        return out.cpu().numpy()

    def simulate_pairwise(self, descriptions: Sequence[str], records: Sequence[ActivationRecord]) -> SimulatedActivations:
        """The direct path (class doc): every pair encoded from its whole text, ``batch_size``
        pairs per forward in record-major order, each batch's predictions copied to the host."""
        encode = getattr(self.encoder, "encode_whole", self.encoder.encode)
        pairs = [(d, r) for r in range(len(records)) for d in range(len(descriptions))]
        result: SimulatedActivations = [[None] * len(records) for _ in descriptions]  # type: ignore[list-item]
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            batch = [encode(descriptions[d], records[r]) for d, r in chunk]
            for (d, r), values in zip(chunk, self.predict(batch)):
                result[d][r] = values
        return result

    def predict(self, batch: Sequence[EncodedPair]) -> list[np.ndarray]:
        """Expected activation at every subject token of each encoded pair (0 where not read)."""
        self.model.eval()
        input_ids, attention_mask = self.collate(batch)
        with torch.inference_mode():
            probabilities = torch.softmax(self.head.class_logits(self.model, input_ids, attention_mask), dim=-1)
            expected = (probabilities * torch.arange(NUM_CLASSES, device=probabilities.device)).sum(-1).cpu().numpy()
        out = []
        for row, pair in zip(expected, batch):
            values = np.zeros(len(pair.read_at), dtype=np.float32)
            read = pair.read_at != NOT_READ
            values[read] = row[pair.read_at[read]]
            out.append(values)
        return out

    def _description_part(self, description: str):
        return _cached(self._descriptions, description, lambda: self.encoder.description_part(description),
                       self.PART_CACHE)

    def _record_part(self, record: ActivationRecord):
        key = (record.seq_id, record.prefix_len, tuple(record.tokens), tuple(record.token_ids))
        return _cached(self._records, key, lambda: self.encoder.record_part(record), self.PART_CACHE)

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(array)
        if self.device.type == "cuda":  # pinned, so the copy does not wait for the kernels queued before it
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor.to(self.device)

    def class_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head.class_logits(self.model, input_ids, attention_mask)

    def collate(self, batch: Sequence[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded input ids and attention mask on the simulator's device."""
        width = max(len(pair.input_ids) for pair in batch)
        input_ids = np.full((len(batch), width), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(batch), width), dtype=np.int64)
        for i, pair in enumerate(batch):
            input_ids[i, : len(pair.input_ids)] = pair.input_ids
            attention_mask[i, : len(pair.input_ids)] = 1
        return self._to_device(input_ids), self._to_device(attention_mask)


def load_checkpoint(directory: str | Path, input_format: str = "project", device: str = "auto", dtype: str = "auto",
                    batch_size: int = 32, max_length: int = 512) -> FinetunedSimulator:
    """A trained simulator folder, read as ``input_format`` (simulate.finetuned.input_format)."""
    try:
        load = CHECKPOINT_FORMATS[input_format]
    except KeyError:
        raise SimulatorLoadError(f"unknown simulate.finetuned.input_format '{input_format}'; "
                                 f"known: {', '.join(CHECKPOINT_FORMATS)}") from None
    return load(directory, device, dtype, batch_size, max_length)


def _load_project_checkpoint(directory, device, dtype, batch_size, max_length) -> FinetunedSimulator:
    """A folder this project trained: its simulator.json says the head, the input and its length."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise SimulatorLoadError(f"simulate.finetuned.checkpoint {directory} is not a folder; give a trained "
                                 "simulator folder, or unset it to train one (neuron-assets run)")
    return FinetunedSimulator.load(directory, device, dtype, batch_size)


def load_released_simulator(directory: str | Path, device: str = "auto", dtype: str = "auto", batch_size: int = 32,
                            max_length: int = 512):
    """The released simulator from a local folder (nothing is downloaded), ready to score."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory).expanduser()
    problem = checkpoint_problem(directory)
    if problem:
        raise SimulatorLoadError(f"simulate.finetuned.checkpoint {directory} {problem}; {DOWNLOAD_HINT}")
    torch_device = choose_device(device)
    with quiet_transformers():
        try:
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
            remap = add_transluce_tokens(tokenizer)
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=choose_dtype(dtype, torch_device),
                                                         local_files_only=True)
        except (OSError, TransluceLayoutError) as err:
            raise SimulatorLoadError(f"{directory} is not Transluce's released simulator ({err}); {DOWNLOAD_HINT}") from None
    rows = model.get_input_embeddings().weight.shape[0]
    if rows < len(tokenizer):
        raise SimulatorLoadError(
            f"{directory}: the model has {rows} token embeddings but the input needs {len(tokenizer)} (the "
            f"vocabulary, {PAD_TOKEN} and the four chat stand-ins): this is not the released simulator; {DOWNLOAD_HINT}")
    spec = SimulatorSpec(head="lm_head_slots", alignment=TransluceEncoder.name, max_length=max_length,
                         backbone=str(directory), added_tokens=(PAD_TOKEN, *(s for _, s in CHAT_TOKEN_STAND_INS)),
                         template=INPUT_TEMPLATE + "{token_ids}",
                         extra={"source": "Transluce/llama_8b_simulator", "remap": {str(k): v for k, v in remap.items()}})
    return FinetunedSimulator(model.to(torch_device).eval(), tokenizer, spec, torch_device, batch_size)



CHECKPOINT_FORMATS = {
    "project": _load_project_checkpoint,  # ours: ## Neuron Description: ... ## Input: ..., see alignment.py
    "transluce": load_released_simulator,  # Transluce/llama_8b_simulator with its exact input, see transluce.py
}


def _length_buckets(order: np.ndarray, lengths: np.ndarray, budget: int):
    """Runs of ``order`` (longest first) whose padded size, count x the first one's length,
    stays within ``budget`` tokens (one pair alone may exceed it)."""
    batch: list[int] = []
    for i in order.tolist():
        if batch and (len(batch) + 1) * lengths[batch[0]] > budget:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _cached(cache: OrderedDict, key, make, size: int):
    value = cache.get(key)
    if value is None:
        value = cache[key] = make()
        while len(cache) > size:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


def freeze_token_embeddings(model) -> bool:
    """Fix the input token embeddings, unless they are tied to the output rows a head trains."""
    embeddings = model.get_input_embeddings()
    output = model.get_output_embeddings()
    if output is not None and output.weight is embeddings.weight:
        return False
    embeddings.weight.requires_grad_(False)
    return True


def _embed_added_tokens_by_name(model, tokenizer, added: Sequence[str]) -> None:
    """An added control token (``⟨eot_id⟩``) starts as the mean embedding of its name's tokens
    (``eot id``), so it means something even where embeddings are not trained."""
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        for token in added:
            name = token.strip("⟨⟩/").replace("_", " ").replace("|", " ").strip() or token
            ids = tokenizer(name, add_special_tokens=False)["input_ids"]
            if ids:
                weight[tokenizer.convert_tokens_to_ids(token)] = weight[ids].mean(0)


def _pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
