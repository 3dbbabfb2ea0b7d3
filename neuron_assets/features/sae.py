"""Sparse autoencoders over a neuron site: the model, its training, SAEs trained elsewhere,
and the measures of how good one is.

An SAE maps a site's activation x (d_in) to sparse latents z = rule(W_enc^T (s x - b_dec) + b_enc)
(d_latent = expansion x d_in) and back, x_hat = (W_dec^T z + b_dec) / s, where s scales the
site so that a token's mean squared norm is d_in (the L1 coefficient then means the same at
every site). The sparsity rule is a backend behind :class:`SparsityRule`: ``topk`` keeps the k
largest pre-activations (Gao et al., 2024), ``l1`` is a ReLU with an L1 penalty (Bricken et
al., 2023). Decoder rows are kept at unit norm; latents that stop firing are resampled
towards the inputs the SAE reconstructs worst.

Training reads batches from an :class:`ActivationStream` whose batch for step n is a function
of n alone, so a run killed after a checkpoint resumes to the same SAE an uninterrupted run
gives (seeded, bit-identical on CPU). Checkpoints are ``state.safetensors`` (weights, Adam
moments, the dead-latent tracker) plus ``state.json`` (step, settings, losses), each written
atomically.

Formats: this project's own folder (``sae.safetensors`` + ``sae.json``), sparsify's
(``cfg.json`` + ``sae.safetensors`` per hookpoint folder) and SAELens's (``cfg.json`` +
``sae_weights.safetensors``).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from neuron_assets.store import atomic_path, set_aside

SAE_WEIGHTS = "sae.safetensors"
SAE_INFO = "sae.json"
STATE_WEIGHTS = "state.safetensors"
STATE_INFO = "state.json"


class SaeError(ValueError):
    """An SAE that cannot be trained, loaded or spliced; the message says how to fix it."""


# -- sparsity rules (the backends) -----------------------------------------------------------


class SparsityRule(Protocol):
    """How pre-activations become sparse latents, and the penalty training adds for it."""

    name: str

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """(tokens, d_latent) pre-activations -> latents, zero where a latent is off."""

    def penalty(self, latents: torch.Tensor) -> torch.Tensor:
        """A scalar added to the reconstruction loss (zero for rules sparse by construction)."""

    def describe(self) -> dict:
        """The rule's settings, as stored beside the weights."""


@dataclass(frozen=True)
class TopK:
    k: int
    name: str = "topk"

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        values, index = pre.topk(min(self.k, pre.shape[-1]), dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, index, values.relu())

    def penalty(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.new_zeros(())

    def describe(self) -> dict:
        return {"kind": self.name, "k": self.k}


@dataclass(frozen=True)
class L1:
    coefficient: float
    name: str = "l1"

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return pre.relu()

    def penalty(self, latents: torch.Tensor) -> torch.Tensor:
        # decoder rows have unit norm, so |z| alone is Bricken et al.'s |z| * ||W_dec row||
        return self.coefficient * latents.abs().sum(-1).mean()

    def describe(self) -> dict:
        return {"kind": self.name, "l1_coefficient": self.coefficient}


class JumpReLU:
    """SAELens / Gemma Scope's thresholded ReLU; loaded, not trained here."""

    name = "jumprelu"

    def __init__(self, threshold: torch.Tensor):
        self.threshold = threshold

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold.to(pre.device))

    def penalty(self, latents: torch.Tensor) -> torch.Tensor:
        raise SaeError("JumpReLU SAEs are loaded, not trained; set sae.kind to topk or l1 to train one")

    def describe(self) -> dict:
        return {"kind": self.name}


# kind -> the rule built from the sae config's settings (k, l1_coefficient)
SPARSITY_RULES: dict[str, Callable[..., SparsityRule]] = {
    "topk": lambda k, l1_coefficient: TopK(k),
    "l1": lambda k, l1_coefficient: L1(l1_coefficient),
}


def make_rule(kind: str, k: int = 32, l1_coefficient: float = 5.0) -> SparsityRule:
    try:
        return SPARSITY_RULES[kind](k=k, l1_coefficient=l1_coefficient)
    except KeyError:
        raise SaeError(f"unknown SAE kind '{kind}'; use one of {sorted(SPARSITY_RULES)}") from None


# -- the model --------------------------------------------------------------------------------


class SparseAutoencoder(nn.Module):
    """Weights in float32 whatever the subject's dtype; inputs are cast on the way in."""

    def __init__(self, d_in: int, d_latent: int, rule: SparsityRule, input_scale: float = 1.0,
                 subtract_decoder_bias: bool = True):
        super().__init__()
        self.rule = rule
        self.subtract_decoder_bias = subtract_decoder_bias
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_latent))
        self.b_enc = nn.Parameter(torch.zeros(d_latent))
        self.W_dec = nn.Parameter(torch.zeros(d_latent, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("input_scale", torch.tensor(float(input_scale)))

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_latent(self) -> int:
        return self.W_enc.shape[1]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.rule.activate(self._pre_activations(x.float() * self.input_scale))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents @ self.W_dec + self.b_dec) / self.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction of x, in x's units and float32."""
        return self.decode(self.encode(x))

    def _pre_activations(self, scaled: torch.Tensor) -> torch.Tensor:
        if self.subtract_decoder_bias:
            scaled = scaled - self.b_dec
        return scaled @ self.W_enc + self.b_enc

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    def info(self) -> dict:
        return {"d_in": self.d_in, "d_latent": self.d_latent, **self.rule.describe(),
                "input_scale": float(self.input_scale), "subtract_decoder_bias": self.subtract_decoder_bias}


def init_sae(d_in: int, d_latent: int, rule: SparsityRule, first_batch: torch.Tensor, seed: int) -> SparseAutoencoder:
    """Unit-norm random decoder rows, the encoder their transpose (Gao et al.), b_dec the mean
    of the first batch, and the input scale that gives it a mean squared norm of d_in."""
    generator = torch.Generator().manual_seed(seed)
    first = first_batch.float().cpu()
    scale = math.sqrt(d_in / first.pow(2).sum(-1).mean().clamp_min(1e-12).item())
    sae = SparseAutoencoder(d_in, d_latent, rule, input_scale=scale)
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(d_latent, d_in, generator=generator))
        sae.normalize_decoder()
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_((first * scale).mean(0))
    return sae


# -- activation streams -----------------------------------------------------------------------


class ActivationStream(Protocol):
    """Training batches of a site's activations: the batch of step n depends on n alone."""

    d_in: int

    def batches(self, start_step: int = 0) -> Iterator[torch.Tensor]:
        """(batch_tokens, d_in) float32 tensors from ``start_step`` on, without end."""


class TensorStream:
    """Batches drawn from activations already in memory (synthetic data, tests): epoch e is
    a permutation seeded by (seed, e)."""

    def __init__(self, data: torch.Tensor, batch_tokens: int, seed: int = 0):
        if data.shape[0] < batch_tokens:
            raise SaeError(f"{data.shape[0]} activations are fewer than one batch of {batch_tokens}")
        self.data, self.batch_tokens, self.seed = data.float(), batch_tokens, seed
        self.d_in = data.shape[1]
        self.per_epoch = data.shape[0] // batch_tokens

    def batches(self, start_step: int = 0) -> Iterator[torch.Tensor]:
        step = start_step
        while True:
            epoch, offset = divmod(step, self.per_epoch)
            order = torch.randperm(self.data.shape[0], generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
            yield self.data[order[offset * self.batch_tokens:(offset + 1) * self.batch_tokens]]
            step += 1


# -- training ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainSettings:
    """What shapes a trained SAE; its hash names the checkpoint a resumed run may continue."""

    kind: str = "topk"
    expansion: int = 8
    k: int = 32
    l1_coefficient: float = 5.0
    steps: int = 2000
    learning_rate: float = 1e-3
    checkpoint_every: int = 200
    resample_dead_after: int = 500
    seed: int = 0

    @property
    def hash(self) -> str:
        payload = {k: v for k, v in asdict(self).items() if k != "checkpoint_every"}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class TrainedSae:
    sae: SparseAutoencoder
    losses: list[float]  # reconstruction loss (scaled units, summed over d_in) per step
    dead_fraction: float  # latents that fired in none of the last resample_dead_after steps
    resampled: int  # latents resampled over the run
    resumed_from: int  # the step a checkpoint resumed from (0: a fresh start)


def train_sae(stream: ActivationStream, settings: TrainSettings, checkpoint: Path | None = None,
              device: torch.device | str = "cpu", log: Callable[[str], None] = print,
              stop_after: int | None = None, on_step: Callable[[int], None] | None = None) -> TrainedSae:
    """Train an SAE on ``stream`` for ``settings.steps`` steps, resuming from ``checkpoint``
    (a folder) when it holds a state of the same settings. ``stop_after`` ends the run after
    that step (as a kill would, but cleanly: it is how tests interrupt one)."""
    device = torch.device(device)
    rule = make_rule(settings.kind, settings.k, settings.l1_coefficient)
    d_in = stream.d_in
    d_latent = settings.expansion * d_in
    if settings.kind == "topk" and settings.k > d_latent:
        raise SaeError(f"sae.k = {settings.k} exceeds the SAE's {d_latent} latents; lower sae.k or raise sae.expansion")
    state = _load_state(checkpoint, settings, d_in, d_latent, rule, device, log) if checkpoint else None
    batches = stream.batches(state.step if state else 0)
    if state is None:
        first = next(batches)
        sae = init_sae(d_in, d_latent, rule, first, settings.seed).to(device)
        state = _TrainingState(0, sae, _adam(sae, settings), torch.zeros(d_latent, dtype=torch.long, device=device), [], 0)
        batches = _prepend(first, batches)
    else:
        log(f"sae: resuming from step {state.step} of {settings.steps} ({checkpoint})")
    resumed_from = state.step
    sae, optimizer = state.sae, state.optimizer
    while state.step < settings.steps and (stop_after is None or state.step < stop_after):
        x = next(batches).to(device, torch.float32) * sae.input_scale
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(settings, state.step)
        latents = sae.rule.activate(sae._pre_activations(x))
        reconstruction = latents @ sae.W_dec + sae.b_dec
        error = (reconstruction - x).pow(2).sum(-1)
        loss = error.mean() + sae.rule.penalty(latents)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _remove_parallel_gradient(sae)
        optimizer.step()
        sae.normalize_decoder()
        fired = (latents > 0).any(0)
        state.since_fired = torch.where(fired, 0, state.since_fired + 1)
        state.losses.append(float(error.detach().mean()))
        state.step += 1
        if settings.resample_dead_after and state.step % settings.resample_dead_after == 0 \
                and state.step <= 0.8 * settings.steps:  # resampling late leaves no time to learn
            state.resampled += _resample_dead(state, x.detach(), reconstruction.detach(), settings)
        if checkpoint and (state.step % settings.checkpoint_every == 0 or state.step == settings.steps):
            _save_state(checkpoint, state, settings)
        if on_step:
            on_step(state.step)
    window = settings.resample_dead_after or settings.steps
    dead = float((state.since_fired >= min(window, max(state.step, 1))).float().mean())
    return TrainedSae(sae.eval(), state.losses, dead, state.resampled, resumed_from)


@dataclass
class _TrainingState:
    step: int
    sae: SparseAutoencoder
    optimizer: torch.optim.Adam
    since_fired: torch.Tensor  # steps since each latent last fired
    losses: list[float]
    resampled: int


def _adam(sae: SparseAutoencoder, settings: TrainSettings) -> torch.optim.Adam:
    # foreach=False: one kernel per tensor, the same arithmetic on every run (bit-identical resume)
    return torch.optim.Adam(sae.parameters(), lr=settings.learning_rate, betas=(0.9, 0.999), foreach=False)


def _learning_rate(settings: TrainSettings, step: int) -> float:
    """Constant, then linear decay to zero over the last 20% of the steps."""
    decay_from = 0.8 * settings.steps
    if step < decay_from:
        return settings.learning_rate
    return settings.learning_rate * max(0.0, (settings.steps - step) / (settings.steps - decay_from))


def _remove_parallel_gradient(sae: SparseAutoencoder) -> None:
    """Drop the part of each decoder row's gradient along the row: the norm is fixed at 1,
    so that part would only be undone by the renormalisation."""
    grad = sae.W_dec.grad
    if grad is not None:
        grad -= (grad * sae.W_dec).sum(1, keepdim=True) * sae.W_dec


@torch.no_grad()
def _resample_dead(state: _TrainingState, x: torch.Tensor, reconstruction: torch.Tensor, settings: TrainSettings) -> int:
    """Point dead latents at inputs the SAE reconstructs worst (Bricken et al.): drawn with
    probability proportional to the squared loss, decoder row = the normalised residual,
    encoder column = it, scaled to a fifth of the live columns' mean norm; Adam moments reset."""
    dead = torch.nonzero(state.since_fired >= settings.resample_dead_after).flatten()
    if dead.numel() == 0:
        return 0
    sae = state.sae
    residual = x - reconstruction
    weights = residual.pow(2).sum(-1).pow(2)
    if float(weights.sum()) <= 0:
        return 0
    generator = torch.Generator(device=x.device).manual_seed(settings.seed * 1_000_003 + state.step)
    picks = torch.multinomial(weights, dead.numel(), replacement=dead.numel() > weights.numel(), generator=generator)
    directions = residual[picks]
    directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    alive = state.since_fired < settings.resample_dead_after
    encoder_norm = sae.W_enc[:, alive].norm(dim=0).mean() if bool(alive.any()) else torch.tensor(1.0, device=x.device)
    sae.W_dec[dead] = directions
    sae.W_enc[:, dead] = directions.T * 0.2 * encoder_norm
    sae.b_enc[dead] = 0.0
    for parameter, index in ((sae.W_dec, (dead,)), (sae.W_enc, (slice(None), dead)), (sae.b_enc, (dead,))):
        moments = state.optimizer.state.get(parameter, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in moments:
                moments[name][index] = 0.0
    state.since_fired[dead] = 0
    return int(dead.numel())


def _prepend(first: torch.Tensor, rest: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    yield first
    yield from rest


_PARAMETERS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _save_state(folder: Path, state: _TrainingState, settings: TrainSettings) -> None:
    from safetensors.torch import save_file

    tensors = {name: getattr(state.sae, name).detach().cpu().contiguous() for name in _PARAMETERS}
    tensors["input_scale"] = state.sae.input_scale.detach().cpu().reshape(1)
    tensors["since_fired"] = state.since_fired.cpu()
    for name in _PARAMETERS:
        moments = state.optimizer.state.get(getattr(state.sae, name), {})
        for moment in ("exp_avg", "exp_avg_sq"):
            tensors[f"adam.{name}.{moment}"] = moments[moment].detach().cpu().contiguous()
        tensors[f"adam.{name}.step"] = moments["step"].detach().cpu().reshape(1).float()
    folder.mkdir(parents=True, exist_ok=True)
    stamp = {"step": str(state.step), "settings": settings.hash}
    with atomic_path(folder / STATE_WEIGHTS) as tmp:
        save_file(tensors, str(tmp), metadata=stamp)
    info = {"step": state.step, "settings": asdict(settings), "settings_hash": settings.hash,
            "resampled": state.resampled, "losses": state.losses}
    with atomic_path(folder / STATE_INFO) as tmp:
        tmp.write_text(json.dumps(info))


def _load_state(folder: Path, settings: TrainSettings, d_in: int, d_latent: int, rule: SparsityRule,
                device: torch.device, log: Callable[[str], None]) -> _TrainingState | None:
    """The checkpoint's state, or None for a fresh start: no checkpoint, other settings, or a
    damaged one (set aside as ``<name>.damaged`` with a warning)."""
    from safetensors import safe_open

    weights, info_path = folder / STATE_WEIGHTS, folder / STATE_INFO
    if not weights.exists() or not info_path.exists():
        return None
    try:
        info = json.loads(info_path.read_text())
        with safe_open(str(weights), framework="pt") as handle:
            stamp = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open is no dict
        if stamp.get("step") != str(info["step"]):
            raise ValueError(f"state.json is at step {info['step']} but the weights at step {stamp.get('step')}")
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint means a fresh start
        for path in (weights, info_path):
            if path.exists():
                set_aside(path)
        log(f"sae: warning: the checkpoint in {folder} is damaged ({err}); set aside as *.damaged, starting again")
        return None
    if info.get("settings_hash") != settings.hash or tuple(tensors["W_enc"].shape) != (d_in, d_latent):
        log(f"sae: the checkpoint in {folder} was made with other settings; starting again")
        return None
    sae = SparseAutoencoder(d_in, d_latent, rule, input_scale=float(tensors["input_scale"][0]))
    with torch.no_grad():
        for name in _PARAMETERS:
            getattr(sae, name).copy_(tensors[name])
    sae.to(device)
    optimizer = _adam(sae, settings)
    for name in _PARAMETERS:
        parameter = getattr(sae, name)
        optimizer.state[parameter] = {
            "step": tensors[f"adam.{name}.step"].reshape(()).clone(),
            "exp_avg": tensors[f"adam.{name}.exp_avg"].to(device),
            "exp_avg_sq": tensors[f"adam.{name}.exp_avg_sq"].to(device),
        }
    return _TrainingState(int(info["step"]), sae, optimizer, tensors["since_fired"].long().to(device), list(info["losses"]),
                          int(info.get("resampled", 0)))


# -- measuring an SAE -------------------------------------------------------------------------


@dataclass(frozen=True)
class SaeMetrics:
    tokens: int
    mse: float  # mean over tokens and dimensions of (x - x_hat)^2, in the site's units
    fvu: float  # fraction of variance unexplained: sum |x - x_hat|^2 / sum |x - mean x|^2
    l0: float  # mean number of latents on per token
    dead_fraction: float  # latents on for none of the evaluation tokens
    frequencies: list[float] = field(repr=False)  # per latent, the share of tokens it is on

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "frequencies"}


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, batches: Iterable[torch.Tensor]) -> SaeMetrics:
    """Reconstruction and sparsity over activations (any number of (tokens, d_in) batches)."""
    device = sae.W_enc.device
    tokens, squared_error = 0, 0.0
    total = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
    total_sq, active = 0.0, 0.0
    fired = torch.zeros(sae.d_latent, dtype=torch.float64, device=device)
    for x in batches:
        x = x.to(device, torch.float32)
        latents = sae.encode(x)
        reconstruction = sae.decode(latents)
        squared_error += float((x - reconstruction).double().pow(2).sum())
        total += x.double().sum(0)
        total_sq += float(x.double().pow(2).sum())
        on = latents > 0
        active += float(on.sum())
        fired += on.double().sum(0)
        tokens += x.shape[0]
    if tokens == 0:
        raise SaeError("no activations to evaluate the SAE on: the evaluation split has no counted tokens")
    variance = total_sq - float(total.pow(2).sum()) / tokens
    frequencies = (fired / tokens).cpu()
    return SaeMetrics(tokens=tokens, mse=squared_error / (tokens * sae.d_in), fvu=squared_error / max(variance, 1e-30),
                      l0=active / tokens, dead_fraction=float((frequencies == 0).double().mean()),
                      frequencies=frequencies.tolist())


def log_frequency_histogram(frequencies: list[float], bins: int = 30) -> tuple[list[float], list[int], int]:
    """(bin edges in log10 frequency, counts, latents that never fired)."""
    values = torch.tensor(frequencies, dtype=torch.float64)
    alive = values[values > 0].log10()
    dead = int((values == 0).sum())
    if alive.numel() == 0:
        return [], [], dead
    low, high = float(alive.min()), max(float(alive.max()), float(alive.min()) + 1e-6)
    counts = torch.histc(alive, bins=bins, min=low, max=high)
    edges = torch.linspace(low, high, bins + 1)
    return edges.tolist(), [int(c) for c in counts.tolist()], dead


@dataclass(frozen=True)
class ReconstructionScore:
    clean_loss: float
    spliced_loss: float
    zero_ablation_loss: float

    @property
    def score(self) -> float:
        """(zero - spliced) / (zero - clean): 1 when splicing costs nothing, 0 when it is as
        bad as zeroing the site."""
        return (self.zero_ablation_loss - self.spliced_loss) / (self.zero_ablation_loss - self.clean_loss)


@torch.no_grad()
def reconstruction_score(model: nn.Module, site: nn.Module, sae: SparseAutoencoder,
                         batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> ReconstructionScore:
    """Next-token loss of a causal LM clean, with the SAE's reconstruction spliced in place of
    the site's input, and with that input zeroed. ``batches`` yield (input_ids, attention_mask,
    counted): only counted positions (after the chat prefix, before padding) are replaced, and
    the loss is over the predictions made from them."""
    sums = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    count = 0
    for ids, mask, counted in batches:
        device = next(model.parameters()).device
        ids, mask, counted = ids.to(device), mask.to(device), counted.to(device).bool()
        targets = ids[:, 1:]
        scored = counted[:, :-1] & mask[:, 1:].bool()
        count += int(scored.sum())
        for name, replace in (("clean", None), ("spliced", sae), ("zero", _zero)):
            handle = site.register_forward_pre_hook(_splice(replace, counted)) if replace is not None else None
            try:
                logits = model(input_ids=ids, attention_mask=mask).logits
            finally:
                if handle is not None:
                    handle.remove()
            losses = nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="none")
            sums[name] += float(losses.view_as(targets)[scored].double().sum())
    if count == 0:
        raise SaeError("no scored tokens for the reconstruction score: every evaluation sequence is prefix or padding")
    return ReconstructionScore(sums["clean"] / count, sums["spliced"] / count, sums["zero"] / count)


def _zero(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


def _splice(replace: Callable[[torch.Tensor], torch.Tensor], counted: torch.Tensor):
    def hook(module, args):
        hidden = args[0]
        spliced = hidden.clone()
        spliced[counted] = replace(hidden[counted]).to(hidden.dtype)
        return (spliced, *args[1:])

    return hook


# -- formats ----------------------------------------------------------------------------------


def save_sae(sae: SparseAutoencoder, folder: Path, extra: dict | None = None) -> Path:
    """This project's format: ``sae.safetensors`` (W_enc, b_enc, W_dec, b_dec) and ``sae.json``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    tensors = {name: getattr(sae, name).detach().cpu().contiguous() for name in _PARAMETERS}
    if isinstance(sae.rule, JumpReLU):
        tensors["threshold"] = sae.rule.threshold.detach().cpu().contiguous()
    with atomic_path(folder / SAE_WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    with atomic_path(folder / SAE_INFO) as tmp:
        tmp.write_text(json.dumps({**sae.info(), **(extra or {})}, indent=2))
    return folder


def load_sae(path: str | Path, format: str = "neuron_assets", layer: int | None = None) -> SparseAutoencoder:
    """An SAE from a folder in one of :data:`SAE_FORMATS`. ``path`` is the SAE's own folder, or
    a folder of per-layer folders, of which the one whose name has ``layer`` as a dotted part
    (``layers.12.mlp``, ``blocks.12.hook_mlp_out``, ``layer=12``) is taken."""
    try:
        loader = SAE_FORMATS[format]
    except KeyError:
        raise SaeError(f"unknown SAE format '{format}'; use one of {sorted(SAE_FORMATS)}") from None
    folder = _layer_folder(Path(path).expanduser(), loader.marker, layer)
    return loader.load(folder)


@dataclass(frozen=True)
class _Format:
    marker: str  # the file that says a folder holds an SAE of this format
    load: Callable[[Path], SparseAutoencoder]


def _load_native(folder: Path) -> SparseAutoencoder:
    info = json.loads((folder / SAE_INFO).read_text())
    tensors = _read_weights(folder / SAE_WEIGHTS)
    rule = JumpReLU(tensors["threshold"]) if info["kind"] == "jumprelu" else make_rule(
        info["kind"], info.get("k", 32), info.get("l1_coefficient", 5.0))
    return _assemble(tensors["W_enc"], tensors["b_enc"], tensors["W_dec"], tensors["b_dec"], rule,
                     info.get("input_scale", 1.0), info.get("subtract_decoder_bias", True))


def _load_sparsify(folder: Path) -> SparseAutoencoder:
    cfg = json.loads((folder / "cfg.json").read_text())
    if cfg.get("transcode"):
        raise SaeError(f"{folder} holds a sparsify transcoder (it predicts a later site), not an autoencoder of one site")
    if cfg.get("normalize_io"):
        raise SaeError(f"{folder} was trained with normalize_io, whose input norms sparsify keeps outside cfg.json; "
                       "retrain without it or convert the SAE")
    activation = cfg.get("activation", "topk")
    if activation != "topk":
        raise SaeError(f"{folder}: sparsify activation '{activation}' is not supported (only topk)")
    tensors = _read_weights(folder / "sae.safetensors")
    encoder = tensors["encoder.weight"]  # (latents, d_in)
    return _assemble(encoder.T, tensors["encoder.bias"], tensors["W_dec"], tensors["b_dec"], TopK(int(cfg["k"])))


def _load_saelens(folder: Path) -> SparseAutoencoder:
    cfg = json.loads((folder / "cfg.json").read_text())
    tensors = _read_weights(folder / "sae_weights.safetensors")
    architecture = cfg.get("architecture") or ("topk" if cfg.get("activation_fn_str") == "topk" else "standard")
    normalize = cfg.get("normalize_activations") or "none"
    if normalize != "none":
        raise SaeError(f"{folder}: normalize_activations '{normalize}' needs a dataset scaling factor SAELens keeps "
                       "elsewhere; fold it into the weights first")
    if architecture == "topk":
        k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
        if not k:
            raise SaeError(f"{folder}/cfg.json is a topk SAE without k")
        rule: SparsityRule = TopK(int(k))
    elif architecture == "jumprelu":
        threshold = tensors.get("threshold")
        if threshold is None and "log_threshold" in tensors:
            threshold = tensors["log_threshold"].exp()
        if threshold is None:
            raise SaeError(f"{folder}: a jumprelu SAE without a threshold tensor")
        rule = JumpReLU(threshold.float())
    elif architecture == "standard":
        rule = L1(float(cfg.get("l1_coefficient", 0.0)) or 1.0)
    else:
        raise SaeError(f"{folder}: SAELens architecture '{architecture}' is not supported (standard, topk, jumprelu)")
    return _assemble(tensors["W_enc"], tensors["b_enc"], tensors["W_dec"], tensors["b_dec"], rule,
                     subtract_decoder_bias=bool(cfg.get("apply_b_dec_to_input", True)))


SAE_FORMATS: dict[str, _Format] = {
    "neuron_assets": _Format(SAE_INFO, _load_native),
    "sparsify": _Format("cfg.json", _load_sparsify),
    "saelens": _Format("cfg.json", _load_saelens),
}


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise SaeError(f"{path} is missing: an SAE folder of this format holds {path.name} beside its config")
    return {key: value.float() for key, value in load_file(str(path)).items()}


def _assemble(W_enc, b_enc, W_dec, b_dec, rule: SparsityRule, input_scale: float = 1.0,
              subtract_decoder_bias: bool = True) -> SparseAutoencoder:
    d_in, d_latent = W_enc.shape
    if tuple(W_dec.shape) != (d_latent, d_in) or b_enc.shape[0] != d_latent or b_dec.shape[0] != d_in:
        raise SaeError(f"SAE weights do not fit together: W_enc {tuple(W_enc.shape)}, W_dec {tuple(W_dec.shape)}, "
                       f"b_enc {tuple(b_enc.shape)}, b_dec {tuple(b_dec.shape)}")
    sae = SparseAutoencoder(d_in, d_latent, rule, input_scale, subtract_decoder_bias)
    with torch.no_grad():
        for name, value in (("W_enc", W_enc), ("b_enc", b_enc), ("W_dec", W_dec), ("b_dec", b_dec)):
            getattr(sae, name).copy_(value)
    return sae.eval()


def _layer_folder(path: Path, marker: str, layer: int | None) -> Path:
    if (path / marker).is_file():
        return path
    if not path.is_dir():
        raise SaeError(f"SAE path {path} does not exist; point sae.path at the SAE's folder or a folder of per-layer folders")
    candidates = sorted(p for p in path.iterdir() if (p / marker).is_file())
    if layer is not None:
        number = re.compile(rf"(?:^|[._=]){layer}(?:$|[._])")
        candidates = [p for p in candidates if number.search(p.name)]
    if len(candidates) == 1:
        return candidates[0]
    seen = ", ".join(p.name for p in path.iterdir() if p.is_dir()) or "none"
    what = "no folder" if not candidates else f"{len(candidates)} folders"
    raise SaeError(f"{what} in {path} holds {marker} for layer {layer}; folders seen: {seen}. "
                   "Point sae.path at the one SAE folder to load")
