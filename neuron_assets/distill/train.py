"""The distilled explainer's training: its data and the fine-tune.

- **Split** (:func:`split_features`): every described feature is held out or not by a
  stable hash of its id and the seed, so training and evaluation features are disjoint
  across runs and machines; both lists go into the checkpoint's ``distill.json``.
- **Data** (:func:`build_examples`): per training feature, ``prompts_per_feature`` prompts
  in the configured format without a few-shot example (each its own random 10-20 train top
  exemplars, fitted to ``max_length``, as the explain stage fits them); the answer is
  ``[DESCRIPTION]: <the feature's selected description>`` in the model's chat template
  (:func:`encode_example`). The loss is on the answer tokens only (end of turn included, so
  the model learns to stop).
- **Training** (:func:`distill_explainer`): the shared loop of :mod:`neuron_assets.finetune`
  (fp32 master weights for bf16, LoRA, accumulation, checkpointing, resumable states). The
  checkpoint is a plain model folder (safetensors weights, config, tokenizer, chat template
  and ``distill.json`` with the loss curve, the data size and the feature lists), renamed
  into place in one step: ``explain.model: <folder>`` loads it in the transformers and vllm
  backends. LoRA adapters are merged before saving, so no backend needs peft.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import polars as pl

from neuron_assets.config import Config, DistillConfig, ExplainConfig
from neuron_assets.explain.formats import ANSWER_TAG, ChatMessage, PromptBuilder, prompt_builder_for
from neuron_assets.simulate.folds import feature_key
from neuron_assets.store import atomic_path
from neuron_assets.types import FeatureExemplars, FeatureId, Polarity

DISTILL_INFO = "distill.json"
IGNORED = -100

Log = Callable[[str], object]


class DistillError(ValueError):
    """Distillation cannot run on this store or config; the message says what to change."""


# -- features and data -------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSplit:
    train: tuple[FeatureId, ...]
    heldout: tuple[FeatureId, ...]  # in hash order: a cap takes the first


def heldout_rank(feature: FeatureId, seed: int) -> float:
    """A feature's stable position in [0, 1): sha256 of the seed and its id."""
    digest = hashlib.sha256(f"distill:{seed}:{feature_key(feature)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_features(features: Sequence[FeatureId], heldout_fraction: float, seed: int = 0) -> FeatureSplit:
    """Held out: the features whose rank is below ``heldout_fraction``; disjoint by construction."""
    ranked = sorted(set(features), key=lambda f: (heldout_rank(f, seed), feature_key(f)))
    heldout = tuple(f for f in ranked if heldout_rank(f, seed) < heldout_fraction)
    train = tuple(sorted((f for f in ranked if heldout_rank(f, seed) >= heldout_fraction), key=feature_key))
    return FeatureSplit(train, heldout)


def best_descriptions(described: pl.DataFrame) -> dict[FeatureId, str]:
    """Feature -> its selected description, from ``neuron_descriptions`` rows."""
    if described.is_empty():
        return {}
    kinds = described["kind"] if "kind" in described.columns else pl.repeat("neuron", described.height, eager=True)
    out = {}
    for kind, layer, polarity, neuron, description in zip(kinds, described["layer"], described["polarity"],
                                                          described["neuron"], described["description"]):
        if description:
            out[FeatureId(int(layer), int(neuron), Polarity(polarity), kind)] = description
    return out


def distill_explain_config(config: Config, backend: str | None = None, model: str | None = None) -> ExplainConfig:
    """The explain settings the distilled explainer is trained and evaluated with: the run's,
    in distill.prompt_format, without few-shot example, reasoning or output tokens, prompts
    fitted to distill.max_length with distill.eval_max_tokens reserved for the answer."""
    distill = config.distill
    update = {
        "prompt_format": distill.prompt_format or config.explain.prompt_format, "few_shot": False, "cot": False,
        "output_tokens": False, "k": distill.eval_k, "max_tokens": distill.eval_max_tokens,
        "context_window": distill.max_length, "max_retries": distill.eval_max_retries,
        "seed": config.explain.seed,
    }
    if backend is not None:
        update["backend"] = backend
    if model is not None:
        update["model"] = model
    return ExplainConfig.model_validate({**config.explain.model_dump(), **update})


@dataclass(frozen=True)
class DistillExample:
    feature: FeatureId
    messages: tuple[ChatMessage, ...]  # the prompt: system and one user turn
    answer: str  # what the explainer should write

    def conversation(self) -> list[dict[str, str]]:
        return [m.as_dict() for m in self.messages] + [{"role": "assistant", "content": self.answer}]


def answer_for(description: str) -> str:
    return f"{ANSWER_TAG} {description}"


class _PromptCounter:
    """What plan_candidate needs of an explainer to fit a prompt: a token counter."""

    reads_prompts = True

    def __init__(self, count_tokens):
        self.count_tokens = count_tokens


def build_examples(features: Sequence[FeatureExemplars], targets: Mapping[FeatureId, str], explain: ExplainConfig,
                   prompts_per_feature: int, count_tokens, display, seed: int = 0) -> list[DistillExample]:
    """``prompts_per_feature`` prompts per feature (explain.exemplars_min..max random train
    top exemplars each, fitted to explain.context_window - explain.max_tokens), each answered
    with the feature's target description. Features without train top exemplars give none."""
    from neuron_assets.explain.best_of_k import plan_candidate

    explain = explain.model_copy(update={"seed": seed})
    builder: PromptBuilder = prompt_builder_for(explain)
    counter = _PromptCounter(count_tokens)
    examples = []
    for feature in features:
        for candidate in range(prompts_per_feature):
            planned = plan_candidate(feature, candidate, explain, builder, [], display, counter)
            prompt = getattr(planned, "prompt", None)
            if prompt is not None:
                examples.append(DistillExample(feature.feature, prompt.messages, answer_for(targets[feature.feature])))
    return examples


@dataclass(frozen=True)
class EncodedExample:
    input_ids: tuple[int, ...]
    prompt_tokens: int  # the first ones: not trained on


def encode_example(tokenizer, example: DistillExample) -> EncodedExample:
    """The prompt's ids exactly as the explainer backends send them (the chat template with
    the assistant turn opened), then the ids of the rest of the conversation as the template
    writes it (the answer and the end of the turn), tokenized on their own as the model
    generates them after the prompt."""
    from neuron_assets.llm.tokens import chat_token_ids

    messages = [m.as_dict() for m in example.messages]
    prompt = chat_token_ids(tokenizer, messages)
    prompt_text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(example.conversation(), tokenize=False)
    if not full_text.startswith(prompt_text) or len(full_text) == len(prompt_text):
        raise DistillError("the base model's chat template does not write a conversation as its prompt (assistant turn "
                           "opened) followed by the answer; use a base model whose template does, e.g. "
                           "builtin:SmolLM2-135M-Instruct or a Llama-3 instruct model")
    answer = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    return EncodedExample(tuple(prompt) + tuple(answer), len(prompt))


# -- training ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistilledExplainer:
    version: str
    path: Path  # the model folder: explain.model
    base_model: str
    method: str  # full or lora
    dtype: str
    examples: int
    answer_tokens: int  # trained-on tokens per epoch
    epochs: int
    steps: int
    loss_curve: list[float]
    seconds: float
    resumed: bool
    prompt_format: str
    train_features: tuple[str, ...]  # feature_key of each
    heldout_features: tuple[str, ...]
    peak_rss_mb: float | None = None
    first_example_loss: float | None = None  # of the trained weights in memory, on the first prompt
    extra: dict = field(default_factory=dict)

    def metadata(self) -> dict:
        payload = asdict(self)
        payload["path"] = str(self.path)
        return payload


def distill_version(encoded: Sequence[EncodedExample], settings: DistillConfig, heldout: Sequence[str]) -> str:
    """A short hash of everything the checkpoint depends on: the token ids, the settings that
    shape training, and the held-out list."""
    digest = hashlib.sha256()
    for example in encoded:
        digest.update(np.asarray(example.input_ids, dtype=np.int64).tobytes())
        digest.update(str(example.prompt_tokens).encode())
    shaping = settings.model_dump(mode="json", exclude={"eval_k", "eval_features", "eval_backend", "eval_max_tokens",
                                                        "eval_max_retries", "save_every_steps", "device"})
    digest.update(json.dumps([shaping, sorted(heldout)], sort_keys=True).encode())
    return digest.hexdigest()[:12]


def distill_explainer(
    examples: Sequence[DistillExample],
    settings: DistillConfig,
    out_root: Path,
    heldout: Sequence[FeatureId] = (),
    prompt_format: str = "",
    log: Log = print,
    on_step: Callable[[int, int, float], object] | None = None,
) -> DistilledExplainer:
    """Fine-tune settings.base_model on ``examples`` (or find it trained); the checkpoint lands
    in ``out_root/<version>/``. A run stopped part way resumes from its last training state."""
    import torch

    from neuron_assets import runtime
    from neuron_assets.finetune import TrainingSettings, add_lora, merge_lora, train_steps

    started = time.perf_counter()
    if not examples:
        raise DistillError("no training prompts: the training features have no train top exemplars")
    device = runtime.choose_device(settings.device)
    dtype = runtime.choose_dtype(settings.dtype, device)
    tokenizer = load_base_tokenizer(settings)
    encoded = [encode_example(tokenizer, e) for e in examples]
    too_long = [len(e.input_ids) for e in encoded if len(e.input_ids) > settings.max_length]
    if too_long:
        raise DistillError(f"{len(too_long)} training conversations exceed distill.max_length ({settings.max_length} "
                           f"tokens; the longest has {max(too_long)}): the answer does not fit beside one exemplar; "
                           "raise distill.max_length or lower distill.eval_max_tokens")
    heldout_keys = tuple(sorted(feature_key(f) for f in heldout))
    version = distill_version(encoded, settings, heldout_keys)
    final_dir = Path(out_root) / version
    if (final_dir / DISTILL_INFO).is_file():
        log(f"distilled explainer {version} is already trained: {final_dir}")
        return read_distilled(final_dir)
    work = Path(out_root) / f".{version}.partial"
    work.mkdir(parents=True, exist_ok=True)
    resume = work / ".resume.pt"
    resumed = resume.is_file()
    model = load_base_model(settings, dtype).to(device)
    total_weights = sum(p.numel() for p in model.parameters())
    method = settings.method if settings.method != "auto" else (
        "lora" if total_weights > settings.lora_above_parameters else "full")
    if method == "lora":
        model, trainable, total = add_lora(model, settings.lora_rank, settings.lora_alpha, settings.lora_dropout,
                                           settings.lora_target_modules, task_type="CAUSAL_LM")
        log(f"LoRA rank {settings.lora_rank}: {trainable:,} of {total:,} weights train ({trainable / total:.2%})")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def micro_batch_loss(chosen: np.ndarray) -> torch.Tensor:
        return answer_loss(model, [encoded[i] for i in chosen], pad, device)

    answer_tokens = sum(len(e.input_ids) - e.prompt_tokens for e in encoded)
    log(f"distilling {settings.base_model} ({method}, {dtype}): {len(encoded)} prompts from "
        f"{len({e.feature for e in examples})} features, {answer_tokens} answer tokens an epoch, {settings.epochs} epochs")
    steps = TrainingSettings(settings.epochs, settings.batch_size, settings.learning_rate, settings.weight_decay,
                             settings.warmup_share, settings.seed, settings.save_every_steps, settings.grad_accum_steps,
                             settings.gradient_checkpointing)
    losses = train_steps(model, len(encoded), micro_batch_loss, steps, resume, log, on_step, device)
    model = merge_lora(model)
    with torch.no_grad():  # recorded so a reload can be checked against the trained weights
        check_loss = float(answer_loss(model, encoded[:1], pad, device))
    model.save_pretrained(work, safe_serialization=True)
    tokenizer.save_pretrained(work)
    result = DistilledExplainer(
        version=version, path=final_dir, base_model=settings.base_model, method=method, dtype=str(dtype).removeprefix("torch."),
        examples=len(encoded), answer_tokens=answer_tokens, epochs=settings.epochs, steps=len(losses),
        loss_curve=losses, seconds=time.perf_counter() - started, resumed=resumed, prompt_format=prompt_format,
        train_features=tuple(sorted({feature_key(e.feature) for e in examples})), heldout_features=heldout_keys,
        peak_rss_mb=peak_rss_mb(), first_example_loss=check_loss,
    )
    resume.unlink(missing_ok=True)
    with atomic_path(work / DISTILL_INFO) as temp:
        Path(temp).write_text(json.dumps(result.metadata(), indent=2, sort_keys=True))
    if final_dir.exists():  # a concurrent run finished first; its result stands
        shutil.rmtree(work, ignore_errors=True)
        return read_distilled(final_dir)
    os.replace(work, final_dir)
    return result


def answer_loss(model, rows: Sequence[EncodedExample], pad: int, device):
    """Mean cross-entropy over the answer tokens of ``rows`` (right-padded into one batch)."""
    import torch

    width = max(len(r.input_ids) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORED, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, example in enumerate(rows):
        ids = torch.tensor(example.input_ids, dtype=torch.long)
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
        labels[row, example.prompt_tokens : len(ids)] = ids[example.prompt_tokens :]
    # Position p predicts token p + 1: only the positions from the last prompt token on need
    # logits (the vocabulary projection of a long prompt costs as much as several layers).
    keep = width - min(r.prompt_tokens for r in rows) + 1
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), logits_to_keep=keep).logits
    targets = labels[:, width - keep + 1 :]
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                             targets.to(device).reshape(-1), ignore_index=IGNORED)


def read_distilled(directory: Path) -> DistilledExplainer:
    payload = json.loads((Path(directory) / DISTILL_INFO).read_text())
    payload["path"] = Path(directory)
    for name in ("train_features", "heldout_features"):
        payload[name] = tuple(payload[name])
    return DistilledExplainer(**payload)


def load_base_tokenizer(settings: DistillConfig):
    from transformers import AutoTokenizer

    path = _base_path(settings)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=not settings.allow_download)
    except (OSError, ValueError) as err:
        raise DistillError(_missing_base(settings, err)) from None
    if not getattr(tokenizer, "chat_template", None):
        raise DistillError(f"distill.base_model '{settings.base_model}' has no chat template: the explainer prompt is a "
                           "chat; use an instruct model")
    return tokenizer


def load_base_model(settings: DistillConfig, dtype):
    from transformers import AutoModelForCausalLM

    from neuron_assets.runtime import quiet_transformers

    try:
        with quiet_transformers():
            return AutoModelForCausalLM.from_pretrained(_base_path(settings), local_files_only=not settings.allow_download,
                                                        dtype=dtype)
    except (OSError, ValueError) as err:
        raise DistillError(_missing_base(settings, err)) from None


def _base_path(settings: DistillConfig) -> str:
    from neuron_assets.builtin_models import BuiltinModelError, resolve_builtin

    try:
        return resolve_builtin(settings.base_model)
    except BuiltinModelError as err:
        raise DistillError(f"distill.base_model: {err}") from None


def _missing_base(settings: DistillConfig, err: Exception) -> str:
    from neuron_assets.builtin_models import missing_model_fix

    where = "the Hugging Face hub" if settings.allow_download else "a local folder or the Hugging Face cache"
    return (f"cannot load distill.base_model '{settings.base_model}' from {where} ({type(err).__name__}: "
            f"{str(err)[:160]}); " + missing_model_fix(settings.base_model, "distill", settings.allow_download).replace(
                "distill.model", "distill.base_model"))


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far (Linux and macOS)."""
    try:
        import resource
        import sys
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
