"""The sections of what describes and judges: the explainer, the simulators and their
training, the scorers, search, and the distilled explainer."""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import Field, field_validator, model_validator

from neuron_assets.builtin_models import BUILTIN_MINILM, BUILTIN_SMOLLM2  # noqa: F401 (re-exported)

from neuron_assets.config.base import LLMEndpointConfig, Section


class PromptFormat(str, Enum):
    """How exemplars are shown to an LLM explainer (neuron_assets.explain.formats)."""

    HIGHLIGHT = "highlight"  # Transluce: excerpts with activating tokens in {{ }}
    TOKEN_ACTIVATION = "token_activation"  # Bills et al.: token<TAB>activation 0-10
    CONTRASTIVE = "contrastive"  # positives beside hard and random negatives
    TRANSLUCE_DISTILLED = "transluce_distilled"  # the prompt Transluce/llama_8b_explainer was trained on


class ExplainConfig(LLMEndpointConfig):
    """The explainer (and the detection and fuzzing judges, which use its model). ``model`` is
    required by every backend but statistical; the endpoint fields are LLMEndpointConfig's."""

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
    backoff_s: float = Field(1.0, ge=0)
    """Delay before the first retry; it doubles each retry (with jitter, at most 60 s)."""
    extra_body: dict[str, object] = Field(default_factory=dict)
    """Extra fields sent with every request (openai backend), e.g. vLLM's
    {structured_outputs: {regex: ...}} or {chat_template_kwargs: {enable_thinking: false}}."""
    usd_per_million_prompt_tokens: float = Field(0.0, ge=0)
    """Price of prompt tokens, for the cost shown with the candidates (0: not shown)."""
    usd_per_million_completion_tokens: float = Field(0.0, ge=0)
    """Price of completion tokens, for the cost shown with the candidates."""
    allow_download: bool = False
    """Let the vllm backend download explain.model from the Hugging Face hub. Off: the model
    must be a local folder or already in the local Hugging Face cache."""
    engine_kwargs: dict[str, str | int | float | bool] = Field(default_factory=dict)
    """Extra keyword arguments for vLLM's LLM(...) (e.g. tensor_parallel_size,
    gpu_memory_utilization) or transformers' from_pretrained."""
    seed: int = 0
    """Seed of exemplar subsets, their order, puzzle choice and sampling."""
    answer_cache: bool = True
    """Keep every LLM answer (the explainer's and the judges') in <root>/llm_cache/answers.sqlite
    and reuse it for the same prompt, model, seed and sampling settings, so a resumed or repeated
    run never pays for an answer twice (--force reuses them too: change explain.seed, or delete
    llm_cache/, for fresh samples). false: ask every time."""

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
    selection_checks: bool = True
    """Before a fine-tuned simulator selects descriptions (simulate.backend: finetuned), check that
    each fold trained on at least the pairs its backbone's size needs (10,000 pairs per fold from
    100M weights, 50,000 from 1B: Transluce's 8B simulator saw about 96,000 in stage 1) and that
    its held-out correlation beats its shuffled control; a failed check stops the run with the
    numbers. A simulator that is only compared gets a warning instead. Turn off for tiny test
    configs only."""


class PromptedSimulatorConfig(LLMEndpointConfig):
    """The prompted simulator's model (required when simulate.backend is prompted; base models
    suit its prompt best, as Bills et al. used one) and how it is reached."""

    backend: Literal["transformers", "openai_completions", "vllm"] = "transformers"
    """Where the logprobs come from: transformers (a local forward pass), openai_completions
    (an OpenAI-compatible completions endpoint with echo + logprobs, e.g. vLLM's server) or
    vllm (vLLM's offline engine with prompt_logprobs, GPU)."""
    placeholder: str = "unknown"
    """The activation written at every token of the simulated sequence; the model's
    distribution over 0..10 at its position is read."""
    top_logprobs: int = Field(20, ge=11)
    """Alternatives asked per position (openai_completions); 0..10 absent from them count as 0."""
    concurrency: int = Field(8, ge=1)
    """Requests in flight at once (openai_completions)."""
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


SimulatorName = Literal["lexical", "semantic", "hybrid", "finetuned", "prompted"]  # neuron_assets.simulate.SIMULATORS (a test checks)
ScorerName = Literal["correlation", "detection", "fuzzing", "embedding"]  # neuron_assets.score.SCORERS


class SimulateConfig(Section):
    backend: SimulatorName = "hybrid"
    """The simulator whose correlation selects each feature's best candidate: lexical
    (offline rule: the tokens and words a description names), semantic (offline, reads
    language: MiniLM similarity of the description to the text, calibrated, plus the quoted
    tokens), hybrid (offline: the lexical rule for a description that names quoted tokens and
    nothing else, semantic for any other), finetuned (Transluce's 11-class per-token model,
    trained by the simulator_checkpoint asset), prompted (Bills et al.'s all-at-once logprob
    simulator). Production: finetuned. `neuron-assets validate-scorers` measures how often
    each one ranks a true description above false ones on held-out puzzles; the demo selects
    by hybrid: its explainer writes literal token descriptions, which hybrid scores exactly
    and semantic underrates, and on held-out concept puzzles it does as well as semantic."""
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



class ClustersConfig(Section):
    """Families of descriptions (asset `description_clusters`, `neuron-assets clusters`):
    average-linkage agglomerative clustering of the selected descriptions' search vectors on
    cosine distance, cut at ``distance`` (docs/clusters.md)."""

    in_run: bool = True
    """Also materialize description_clusters in every `neuron-assets run` (about a second on
    the demo). Off: on demand only (`run --select description_clusters`, or the UI)."""
    distance: float = Field(0.55, gt=0, lt=2)
    """Where the tree is cut: two groups join while the mean cosine distance between their
    members is at most this (so every cluster's members are, on average, at least 1 - distance
    similar). Cosine distance runs from 0 (same direction) to 2; with MiniLM, paraphrases are
    about 0.2-0.3 apart, descriptions of one topic 0.4-0.5, unrelated ones 0.8-1.0."""
    min_size: int = Field(2, ge=1)
    """Fewest members a cluster needs to be stored; descriptions in smaller ones are left out
    (1 keeps every description, singletons too)."""
    scope: Literal["all", "layer_polarity"] = "all"
    """all: one clustering over every layer and polarity (families across layers);
    layer_polarity: each layer x polarity on its own (a cluster then never spans partitions)."""
    max_points: int = Field(16384, ge=2)
    """Most descriptions one linkage takes (its distance matrix holds max_points^2 / 2 float64s,
    1.1 GB at 16384, and SciPy copies it once). A larger group clusters a seeded sample of this
    size; every other description then joins the cluster it is nearest on average (1 - its dot
    product with the cluster's mean vector: the average-linkage distance) when that is within
    `distance`, else it stays alone."""
    labels: Literal["auto", "centroid", "llm"] = "auto"
    """Each cluster's label: centroid (the member description nearest the cluster's mean
    direction), llm (a short name written by the explain section's LLM from the members; falls
    back to the centroid member where no usable answer comes), auto (llm when explain.backend
    is an LLM backend, else centroid)."""
    label_members: int = Field(12, ge=1)
    """Members (nearest the centroid first) shown to the LLM that names a cluster."""
    seed: int = 0
    """Seed of the sample taken when a group has more than max_points descriptions."""


class EffectsConfig(Section):
    """What each selected description's feature does when it is changed (asset
    `description_effects`, docs/steering.md#effects-of-a-description): the loss change when it is
    ablated on its top test exemplars, and whether steering it up moves neutral continuations
    toward its description (against the control description)."""

    in_run: bool = True
    """Also materialize description_effects in every `neuron-assets run`. The demo's sizes below
    (1 exemplar, 2 prompts x 6 tokens) cost about a second per feature on 2 CPU cores; the
    production presets measure 5 exemplars and 4 prompts x 16 tokens (`plan` shows the cost)."""
    exemplars: int = Field(1, ge=1)
    """Top test exemplars per feature the ablation effect is measured on (one batch)."""
    prompts: list[str] = ["Tell me about your day.", "Write one sentence about anything you like."]
    """Neutral prompts the feature is steered on (through the chat template when the subject has
    one). The production presets add "What should I do this weekend?" and "Describe a place you
    know well."."""
    n_tokens: int = Field(6, ge=1)
    """Tokens generated (greedy) per prompt, for the baseline and for each steered feature."""
    strength: float = Field(1.0, gt=0)
    """The steered value is the feature's q99 activation times this."""
    batch_size: int = Field(16, ge=1)
    """Features steered side by side in one generation (one a row of the batch)."""
    output_tokens: int = Field(10, ge=1)
    """Promoted tokens (table output_tokens) compared with the description."""


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
