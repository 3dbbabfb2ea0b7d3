"""Tiny random language models and tokenizers built on the fly for tests.

Nothing here downloads anything: the tokenizer is trained with the
``tokenizers`` library on :func:`sample_texts`, and the models are randomly
initialised ``transformers`` models saved with ``save_pretrained``
(safetensors, float32) next to their tokenizer, so a directory produced here
can be loaded by ``transformers`` (``AutoModelForCausalLM.from_pretrained``)
and served by vLLM (``--model DIR``).

Constraints honoured for vLLM's CPU backend: attention head_dim is 64 and
weights are float32 (serve with ``--dtype float32``).
"""

from __future__ import annotations

import random
from pathlib import Path

# Special tokens (Llama-3 style names).
BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"

SPECIAL_TOKENS = [
    BOS_TOKEN,
    EOS_TOKEN,
    PAD_TOKEN,
    UNK_TOKEN,
    START_HEADER,
    END_HEADER,
    EOT_TOKEN,
]

# Llama-3 style chat template. ``add_generation_prompt`` opens an assistant
# turn. Content that is a list of parts (OpenAI "content parts") is joined.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set content = message['content'] -%}"
    "{%- else -%}"
    "{%- set content = message['content'] | map(attribute='text') | join('') -%}"
    "{%- endif -%}"
    "{{- '" + START_HEADER + "' + message['role'] + '" + END_HEADER + "\\n\\n' -}}"
    "{{- content | trim -}}"
    "{{- '" + EOT_TOKEN + "' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '" + START_HEADER + "assistant" + END_HEADER + "\\n\\n' -}}"
    "{%- endif -%}"
)


# --------------------------------------------------------------------------
# Training text
# --------------------------------------------------------------------------

_SUBJECTS = [
    "the cat", "a dog", "the old man", "my sister", "the teacher", "a small bird",
    "the engineer", "our neighbour", "the children", "a young woman", "the doctor",
    "the farmer", "a tired student", "the river", "the machine", "the committee",
    "a musician", "the pilot", "the baker", "the king", "the robot", "a scientist",
]
_VERBS = [
    "sees", "likes", "finds", "builds", "carries", "paints", "follows", "reads",
    "writes", "opens", "closes", "watches", "remembers", "forgets", "cleans",
    "moves", "checks", "fixes", "sells", "buys", "counts", "describes",
]
_OBJECTS = [
    "a red ball", "the green door", "an old book", "the heavy box", "a letter",
    "the blue car", "a long song", "the wooden table", "a bright lamp",
    "the small garden", "a cold drink", "the broken clock", "a new idea",
    "the city map", "a warm coat", "the quiet room", "a simple question",
    "the first page", "a loud noise", "the last train",
]
_ADVERBS = [
    "slowly", "quickly", "carefully", "every morning", "at night", "again",
    "without a word", "with great care", "in the rain", "after lunch",
    "before dinner", "once more", "on Sunday", "near the station",
]
_CONNECTIVES = ["because", "although", "while", "when", "after", "before", "and", "but"]
_QUESTIONS = [
    "Why does {s} {v_base} {o}?",
    "Did {s} {v_base} {o} {a}?",
    "Where will {s} {v_base} {o}?",
    "Can {s} {v_base} {o}?",
]
_NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def _base(verb: str) -> str:
    if verb.endswith("ies"):
        return verb[:-3] + "y"
    if verb.endswith(("shes", "ches", "xes", "sses")):
        return verb[:-2]
    return verb[:-1]


def sample_texts(n: int = 400, seed: int = 0) -> list[str]:
    """Return ``n`` short English-ish sentences, deterministically generated."""
    rng = random.Random(seed)
    out: list[str] = []
    for i in range(n):
        s, v, o, a = (
            rng.choice(_SUBJECTS),
            rng.choice(_VERBS),
            rng.choice(_OBJECTS),
            rng.choice(_ADVERBS),
        )
        kind = i % 5
        if kind == 0:
            text = f"{s} {v} {o} {a}."
        elif kind == 1:
            s2, v2, o2 = rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)
            text = f"{s} {v} {o} {rng.choice(_CONNECTIVES)} {s2} {v2} {o2}."
        elif kind == 2:
            text = rng.choice(_QUESTIONS).format(s=s, v_base=_base(v), o=o, a=a)
        elif kind == 3:
            k = rng.randrange(10)
            text = f"{s} {v} {_NUMBERS[k]} times, then {rng.randrange(100)} more, {a}."
        else:
            text = f'"{o}," said {s}, "is {rng.choice(["good", "bad", "strange", "fine"])}."'
        out.append(text[0].upper() + text[1:])
    return out


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int = 512):
    """Train a byte-level BPE tokenizer and wrap it as a ``PreTrainedTokenizerFast``.

    - bos ``<|begin_of_text|>`` (prepended by the post-processor to every
      encoded sequence, like Llama-3), eos ``<|end_of_text|>``,
      pad ``<|pad|>``, unk ``<|unk|>``;
    - chat special tokens ``<|start_header_id|>``, ``<|end_header_id|>``,
      ``<|eot_id|>`` and a Llama-3 style ``chat_template``.

    Special tokens get ids 0..6 in the order of :data:`SPECIAL_TOKENS`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    bos_id = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[START_HEADER, END_HEADER, EOT_TOKEN],
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------


def _special_ids(tokenizer) -> dict:
    eot = tokenizer.convert_tokens_to_ids(EOT_TOKEN)
    eos = tokenizer.eos_token_id
    return {
        "bos_token_id": tokenizer.bos_token_id,
        # Generation stops at either end-of-text or end-of-turn.
        "eos_token_id": [eos, eot] if eot is not None and eot != eos else eos,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _save(model, tokenizer, out_dir: Path) -> Path:
    import torch

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(torch.float32).eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def make_tiny_llama(
    out_dir,
    tokenizer,
    num_layers: int = 2,
    hidden: int = 128,
    intermediate: int = 256,
    heads: int = 2,
    seed: int = 0,
    max_position_embeddings: int = 2048,
) -> Path:
    """Save a random ``LlamaForCausalLM`` (gated SiLU MLP) + tokenizer to ``out_dir``.

    head_dim = hidden // heads and must be 64 for vLLM's CPU attention.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    if hidden % heads:
        raise ValueError("hidden must be divisible by heads")
    ids = _special_ids(tokenizer)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        initializer_range=0.02,
        **ids,
    )
    config.dtype = torch.float32
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**ids)
    return _save(model, tokenizer, out_dir)


def make_tiny_gpt2(
    out_dir,
    tokenizer,
    num_layers: int = 2,
    hidden: int = 128,
    intermediate: int = 256,
    heads: int = 2,
    seed: int = 0,
    max_position_embeddings: int = 1024,
) -> Path:
    """Save a random ``GPT2LMHeadModel`` + tokenizer to ``out_dir`` (head_dim = hidden // heads)."""
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    if hidden % heads:
        raise ValueError("hidden must be divisible by heads")
    ids = _special_ids(tokenizer)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=max_position_embeddings,
        n_embd=hidden,
        n_layer=num_layers,
        n_head=heads,
        n_inner=intermediate,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **ids,
    )
    config.dtype = torch.float32
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.generation_config = GenerationConfig(**ids)
    return _save(model, tokenizer, out_dir)
