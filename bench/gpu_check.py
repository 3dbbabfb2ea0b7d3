"""GPU check: the full-scale path on a Llama-3.1-8B-shaped model with random weights, in minutes.

Builds the model from configs/llama31_8b_instruct.shape.json (all 32 layers, or --layers N)
with random bf16 weights and feeds it synthetic token ids, so nothing is downloaded. Then:

  1. the bare forward pass, tokens/s;
  2. the exemplar pass for every neuron of every layer and both polarities (the project's
     collector, planned by the project's planner), tokens/s, and its peak device memory
     against the plan's prediction, and a layer's tables in host memory against the plan's;
     then the same pass with the prefix cache (every synthetic sequence starts with the same
     30-token header, as the Llama preset's chat header: run once, each batch's other tokens
     against its key/value cache), tokens/s of both counting every token, and on one batch
     the largest difference between the cached and the full pass's activations (bf16);
  3. one simulator training step (Transluce's head: the first 11 rows of the LM head) with
     LoRA through peft on all layers, and a full fine-tune (fp32 master weights, AdamW,
     bf16 autocast, gradient checkpointing) on as many layers as fit;
  4. fine-tuned simulator inference, (description, exemplar) pairs/s, through the scoring
     path itself (FinetunedSimulator.simulate_many on the LoRA model, adapters merged, the
     Llama config's head and alignment: pairs encoded from parts, length-bucketed batches,
     one host copy per round), on synthetic exemplars and a tokenizer trained on the spot.

Ends well inside 8 minutes on one H100/H200. ``--tiny`` runs the same code on CPU with a
small model of the same architecture in under a minute.
Usage: python bench/gpu_check.py [--tiny] [--layers 32] [--sequences-per-split 256]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import torch

from neuron_assets.config import REPO_ROOT, load_config
from neuron_assets.exemplars import collect_exemplars, plan_exemplar_pass
from neuron_assets.exemplars.batches import Corpus
from neuron_assets.features.prefix_cache import PrefixCache
from neuron_assets.plan import ModelShape
from neuron_assets.subject import SubjectModel, find_sites
from neuron_assets.types import Polarity, Split

LLAMA = REPO_ROOT / "configs" / "llama31_8b_instruct"
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                  vocab_size=512, max_position_embeddings=512, head_dim=32, model_type="llama", tie_word_embeddings=False)
DESCRIPTION_TOKENS = 40
HEADER_TOKENS = 30  # the Llama preset's chat header (BOS, the knowledge-date system turn, an open user turn)
TINY_HEADER_TOKENS = 8
CLASSES = 11
GB = 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a small model of the same architecture, on CPU")
    parser.add_argument("--layers", type=int, help="layers of the model (default: all of the shape)")
    parser.add_argument("--sequences-per-split", type=int, help="synthetic sequences per split (default 256; tiny 24)")
    parser.add_argument("--batch-size", type=int, help="sequences per forward pass (default: the Llama config's; tiny 8)")
    parser.add_argument("--skip-training", action="store_true", help="only the forward and exemplar passes")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cpu" and not args.tiny:
        sys.exit("no GPU here: run with --tiny to exercise the same code on CPU")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    llama = load_config(LLAMA.with_suffix(".yaml"))
    raw = TINY_SHAPE if args.tiny else json.loads(LLAMA.with_suffix(".shape.json").read_text())
    raw = dict(raw, num_hidden_layers=args.layers or raw["num_hidden_layers"])
    seq_len = 32 if args.tiny else llama.corpus.seq_len
    batch = args.batch_size or (8 if args.tiny else llama.subject.batch_size)
    per_split = args.sequences_per_split or (24 if args.tiny else 256)
    results = Results(device, args.json)
    results.add("device", torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (--tiny)")
    results.add("model", f"{raw['num_hidden_layers']} layers x {raw['intermediate_size']} neurons, hidden {raw['hidden_size']}, "
                         f"random weights in {str(dtype).removeprefix('torch.')}")

    started = time.perf_counter()
    model = build_model(raw, device, dtype, causal_lm=False)
    results.add("build the model (s)", f"{time.perf_counter() - started:.1f}")
    sequences = synthetic_sequences(per_split, seq_len, raw["vocab_size"], TINY_HEADER_TOKENS if args.tiny else HEADER_TOKENS)
    tokens = int(sequences["n_tokens"].sum())
    subject = SubjectModel(name="random-llama-3.1-8b-shape", model=model,
                           tokenizer=SimpleNamespace(pad_token_id=0), sites=find_sites(model), device=device, dtype=dtype)
    results.add("corpus", f"{sequences.height} synthetic sequences x {seq_len} tokens behind one "
                          f"{int(sequences['prefix_len'][0])}-token header, batch {batch}")

    bare = bare_forward_tokens_per_s(subject, sequences, batch)
    results.add("bare forward (tokens/s)", f"{bare:,.0f}")

    check_exemplar_pass(results, subject, sequences, llama, raw, batch, tokens, bare)
    del subject, model
    release(device)
    if not args.skip_training:
        check_simulator(results, raw, device, dtype, seq_len, llama.simulate.training.batch_size)
    results.add("total (s)", f"{time.perf_counter() - started:.1f}")
    results.print()


def check_exemplar_pass(results, subject, sequences, llama, raw, batch, tokens, bare) -> None:
    neurons = {layer: list(range(raw["intermediate_size"])) for layer in range(raw["num_hidden_layers"])}
    polarities = [Polarity.POS, Polarity.NEG]
    config = llama.exemplars.model_copy(update={"prefix_cache": False})
    seq_len = int(sequences["n_tokens"].max())
    plan = plan_exemplar_pass(neurons, polarities, config, seq_len, batch, subject.device, subject.dtype)
    shape = ModelShape.from_config_json_dict(raw)
    weights = sum(p.nbytes for p in subject.model.parameters())
    act_bytes = torch.empty((), dtype=subject.dtype).element_size()
    predicted = weights + shape.forward_workspace_bytes(batch, seq_len, act_bytes) + plan.peak_device_bytes
    print(plan.describe(), flush=True)
    stamps: list[float] = []
    measured: dict = {}
    rows = [0]

    def count(layer, polarity, exemplars, stats):
        rows[0] += exemplars.height

    reset_peak(subject.device)
    started = time.perf_counter()
    collect_exemplars(subject, sequences, neurons, polarities, config, batch, progress=False, plan=plan,
                      on_batch=lambda done: stamps.append(synchronized(subject.device)), on_tables=count, measured=measured)
    finished = time.perf_counter()
    first = stamps[0] - started  # the first batch allocates the split's state: timed apart
    steady = steady_tokens_per_s(stamps, tokens)
    results.add("features collected", f"{plan.features:,} x 2 polarities in {plan.passes} pass(es)")
    results.add("exemplar pass (tokens/s)", f"{steady:,.0f} = {steady / bare:.2f}x the bare forward (header run in every sequence)")
    results.add("  first batch, tables (s)", f"{first:.2f}, {finished - stamps[-1]:.1f} ({rows[0]:,} exemplar rows)")
    peak = peak_memory(subject.device)
    if subject.device.type == "cuda":
        results.add("exemplar pass peak (GB)", f"{peak / GB:.1f} measured, {predicted / GB:.1f} planned "
                                               f"({peak / predicted:.2f}x)")
    results.add("collector state (GB)", f"{measured['peak_device_state_bytes'] / GB:.2f} on the device, "
                                        f"{measured['peak_state_bytes'] / GB:.2f} in all; planned "
                                        f"{plan.resident_bytes * plan.features / GB:.2f} resident")
    widest = max(len(v) for v in neurons.values())
    tables = max(measured["layer_table_bytes"].values())
    results.add("a layer's tables on the host (GB)", f"{tables / GB:.3f} measured, {widest * plan.table_bytes / GB:.3f} "
                                                     "planned (both polarities)")

    cached_stamps: list[float] = []
    cached_measured: dict = {}
    collect_exemplars(subject, sequences, neurons, polarities, config.model_copy(update={"prefix_cache": True}), batch,
                      progress=False, plan=plan, on_batch=lambda done: cached_stamps.append(synchronized(subject.device)),
                      on_tables=lambda *tables: None, measured=cached_measured)
    cached = steady_tokens_per_s(cached_stamps, tokens)
    results.add("exemplar pass, prefix cache", f"{cached:,.0f} tokens/s = {cached / steady:.2f}x the full pass "
                                               f"({cached_measured['prefix_cache']})")
    worst, scale = prefix_cache_difference(subject, sequences, batch, [0, raw["num_hidden_layers"] // 2,
                                                                      raw["num_hidden_layers"] - 1])
    results.add("prefix cache vs full pass", f"largest absolute difference {worst:.3g} on counted tokens of one batch, "
                                             f"largest absolute activation {scale:.3g} ({worst / scale:.2g} of it)")


def steady_tokens_per_s(stamps: list[float], tokens: int) -> float:
    """Tokens/s after the first batch (which allocates the split's state), every token counted."""
    return tokens * (len(stamps) - 1) / len(stamps) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else float("nan")


def prefix_cache_difference(subject, sequences, batch: int, layers: list[int]) -> tuple[float, float]:
    """On the first batch, the largest |cached - full| activation over counted tokens at
    ``layers``, and the largest |full| activation there."""
    corpus = Corpus(sequences, subject.tokenizer)
    rows = corpus.batch(np.arange(min(batch, len(corpus.lengths))))
    wanted = {layer: None for layer in sorted(set(layers))}
    full = subject.activations(rows.ids, rows.mask, wanted)
    cached = PrefixCache(subject).activations(rows.ids, rows.mask, rows.prefix_len, wanted)
    counted = rows.counted.to(subject.device)
    worst = max(float((cached[layer] - full[layer])[counted].float().abs().max()) for layer in wanted)
    scale = max(float(full[layer][counted].float().abs().max()) for layer in wanted)
    return worst, scale


def check_simulator(results, raw, device, dtype, seq_len, batch) -> None:
    length = DESCRIPTION_TOKENS + seq_len
    shape = ModelShape.from_config_json_dict(raw)

    # LoRA on every layer: frozen bf16 weights, fp32 adapters, gradient checkpointing.
    from peft import LoraConfig, get_peft_model

    model = build_model(raw, device, dtype, causal_lm=True)
    model.gradient_checkpointing_enable()
    model.enable_input_require_grads()
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    step_seconds, peak, moved = training_step(lora, raw, device, batch, length, autocast=False)
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    results.add("LoRA step (s, peak GB)", f"{step_seconds:.2f}, {peak / GB:.1f}; {trainable / 1e6:.1f}M trainable, "
                                          f"adapters moved: {moved}")
    rate, pairs, longest = simulator_pairs_per_s(lora, raw, device, seq_len)
    results.add("simulator pairs/s", f"{rate:,.0f} (simulate_many, LoRA merged, {pairs:,} pairs of up to {longest} tokens)")
    del lora, model
    release(device)

    # Full fine-tune: fp32 master weights + AdamW states (16 bytes a parameter) on the layers that fit.
    layers = raw["num_hidden_layers"]
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] * 0.8
        fixed = 2 * raw["vocab_size"] * raw["hidden_size"] * 16
        layers = max(1, min(layers, int((free - fixed) // (shape.layer_params * 16 * 1.15))))
    model = build_model(dict(raw, num_hidden_layers=layers), device, torch.float32, causal_lm=True)
    model.gradient_checkpointing_enable()
    step_seconds, peak, moved = training_step(model, raw, device, batch, length, autocast=device.type == "cuda")
    results.add("full step (s, peak GB)", f"{step_seconds:.2f}, {peak / GB:.1f} on {layers} of {raw['num_hidden_layers']} "
                                          f"layers; weights moved: {moved}")
    del model
    release(device)


def training_step(model, raw, device, batch, length, autocast: bool) -> tuple[float, int, bool]:
    """One AdamW step at lr 1e-5 on random (pair, 11-class labels); returns seconds, peak
    memory and whether the trained weights changed."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, raw["vocab_size"], (batch, length), generator=generator).to(device)
    labels = torch.randint(0, CLASSES, (batch, length), generator=generator).to(device)
    trained = [p for p in model.parameters() if p.requires_grad]
    before = trained[-1].detach().clone()
    optimizer = torch.optim.AdamW(trained, lr=1e-5)
    reset_peak(device)
    started = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = torch.nn.functional.cross_entropy(class_logits(model, ids).float().flatten(0, 1), labels.flatten())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = synchronized(device) - started
    return seconds, peak_memory(device), bool((trained[-1].detach() != before).any())


def class_logits(model, ids):
    """Transluce's simulator head: the LM head's first 11 rows score the classes 0..10."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(input_ids=ids).last_hidden_state
    return hidden @ base.lm_head.weight[:CLASSES].T


def simulator_pairs_per_s(model, raw, device, seq_len: int) -> tuple[float, int, int]:
    """Pairs/s of FinetunedSimulator.simulate_many, the path scoring takes, on the trained
    model (adapters merged, as after training): jobs of (descriptions, exemplars) as the
    correlation scorer sends them, every description and exemplar new to the simulator, so
    encoding is timed too. A small call first warms up kernels and caches."""
    from neuron_assets.simulate.finetuned import FinetunedSimulator, SimulatorSpec

    tokenizer = words_tokenizer(raw["vocab_size"])
    small = device.type == "cpu"
    features, descriptions, records = (8, 2, 4) if small else (64, 2, 16)
    length = DESCRIPTION_TOKENS + seq_len
    spec = SimulatorSpec("lm_head_slots", "subject_ids", max_length=length + 16, backbone="random")
    simulator = FinetunedSimulator(model, tokenizer, spec, device, batch_size=8 if small else 64)
    simulator.merge_adapters()
    simulator.simulate_many(synthetic_jobs(2, descriptions, 2, seq_len, raw["vocab_size"], seed=1))
    jobs = synthetic_jobs(features, descriptions, records, seq_len, raw["vocab_size"], seed=2)
    started = synchronized(device)
    simulator.simulate_many(jobs)
    seconds = synchronized(device) - started
    pairs = features * descriptions * records
    longest = max(len(simulator.encoder.encode(d, r).input_ids) for ds, rs in jobs for d in ds for r in rs)
    return pairs / seconds, pairs, longest


WORDS = ("the of and to in is that for on with as was at by from it an be this are or have which not but "
         "verbs nouns numbers dates names places colors plural past tense quotes code brackets commas end").split()


def words_tokenizer(vocab_size: int):
    """A small word-level tokenizer built here (nothing is downloaded), its ids below the model's vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(WORDS) | set("#:.,\"")))}
    assert len(vocab) < vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def synthetic_jobs(features: int, descriptions: int, records: int, seq_len: int, vocab: int, seed: int):
    """(descriptions, exemplar records) per feature: descriptions of 4-20 words, records of
    seq_len random token ids after a one-token prefix, with activations (not read by simulation)."""
    from neuron_assets.types import ActivationRecord

    rng = np.random.default_rng(seed)
    jobs = []
    for f in range(features):
        described = [" ".join(rng.choice(WORDS, size=int(rng.integers(4, 21)))) for _ in range(descriptions)]
        exemplars = []
        for r in range(records):
            ids = rng.integers(1, vocab, size=seq_len)
            exemplars.append(ActivationRecord(seed * 10**6 + f * 1000 + r, tuple(f"t{i}" for i in ids),
                                              tuple(int(i) for i in ids), rng.random(seq_len, dtype=np.float32), 1))
        jobs.append((described, exemplars))
    return jobs


# -- helpers ------------------------------------------------------------------------------


def build_model(raw: dict, device, dtype, causal_lm: bool):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    config = LlamaConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "torch_dtype", "model_type")})
    torch.manual_seed(0)
    with default_dtype(dtype), torch.device(device):
        model = (LlamaForCausalLM if causal_lm else LlamaModel)(config)
    return model.eval() if not causal_lm else model.train()


@contextmanager
def default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def synthetic_sequences(per_split: int, seq_len: int, vocab: int, header: int) -> pl.DataFrame:
    """Random token ids behind one shared ``header`` of random ids, which never counts."""
    rng = np.random.default_rng(0)
    n = 3 * per_split
    ids = rng.integers(1, vocab, size=(n, seq_len), dtype=np.int32)
    ids[:, :header] = ids[0, :header]
    return pl.DataFrame({
        "seq_id": np.arange(n, dtype=np.int64),
        "split": np.repeat([s.value for s in Split], per_split),
        "token_ids": list(ids),
        "prefix_len": np.full(n, header, dtype=np.int16),
        "n_tokens": np.full(n, seq_len, dtype=np.int32),
    }, schema_overrides={"token_ids": pl.List(pl.Int32)})


def bare_forward_tokens_per_s(subject, sequences, batch: int) -> float:
    from neuron_assets.exemplars.batches import Corpus, plan_batches

    corpus = Corpus(sequences, subject.tokenizer)
    batches = [corpus.batch(rows) for _, rows in plan_batches(corpus.splits, batch, seed=0)]
    with torch.inference_mode():
        subject.model(input_ids=batches[0].ids.to(subject.device), attention_mask=batches[0].mask.to(subject.device))
        started = synchronized(subject.device)
        for b in batches:
            subject.model(input_ids=b.ids.to(subject.device), attention_mask=b.mask.to(subject.device))
        seconds = synchronized(subject.device) - started
    return sum(int(b.mask.sum()) for b in batches) / seconds


def synchronized(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak, on CPU


def release(device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Results:
    def __init__(self, device, path: str | None):
        self.rows: list[tuple[str, str]] = []
        self.path = Path(path) if path else None

    def add(self, name: str, value: str) -> None:
        self.rows.append((name, value))
        print(f"{name:<28} {value}", flush=True)
        if self.path:
            self.path.write_text(json.dumps(dict(self.rows), indent=1))

    def print(self) -> None:
        print("\n| check | result |\n|---|---|")
        for name, value in self.rows:
            print(f"| {name.strip()} | {value} |")


if __name__ == "__main__":
    main()
