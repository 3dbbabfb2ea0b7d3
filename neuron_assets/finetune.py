"""The training loop every fine-tune of the project shares: the fine-tuned simulator
(neuron_assets.simulate.training) and the distilled explainer (neuron_assets.distill.train).

:func:`train_steps` owns the mechanics; a caller gives it only the loss of one micro-batch
of example indices. It runs AdamW on fp32 master copies of low-precision trainable weights
(:class:`MasterWeights`), transformers' linear warm-up and decay, gradient accumulation
and checkpointing, gradient clipping at 1, a seeded data order per epoch, and a resumable
training state (model, masters, optimizer, schedule, losses, RNG) saved every few steps,
atomically. :func:`add_lora` and :func:`merge_lora` wrap a model in peft adapters and fold
them back in, so a saved checkpoint is always a plain model folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from neuron_assets.store import atomic_path, set_aside

Log = Callable[[str], object]
LOW_PRECISION = (torch.bfloat16, torch.float16)
STATE_KEYS = frozenset({"model", "optimizer", "schedule", "step", "losses", "rng"})


@dataclass(frozen=True)
class TrainingSettings:
    """How :func:`train_steps` trains: the settings the simulator's training and the distilled
    explainer's share (each builds them from its own config section)."""

    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float = 0.01
    warmup_share: float = 0.1
    seed: int = 0
    save_every: int = 50  # steps between two saves of the resume state
    grad_accum_steps: int = 1  # micro-batches of batch_size per optimizer step
    gradient_checkpointing: bool = False


def train_steps(
    model: torch.nn.Module,
    examples: int,
    micro_batch_loss: Callable[[np.ndarray], torch.Tensor],
    settings: TrainingSettings,
    resume: Path | None = None,
    log: Log = print,
    on_step: Callable[[int, int, float], object] | None = None,
    device: torch.device | str = "cpu",
) -> list[float]:
    """Train ``model``'s trainable weights over ``examples`` examples for ``settings.epochs``
    epochs; returns the loss per optimizer step (the mean over its ``grad_accum_steps``
    micro-batches of ``batch_size``). ``micro_batch_loss(indices)`` is the mean loss of those
    examples. With ``resume``, the state is saved every ``save_every`` steps and picked up
    again. ``on_step(step, total, loss)`` follows every step (loss: the mean of the last ten)."""
    from transformers import get_linear_schedule_with_warmup

    micro_per_epoch = math.ceil(examples / settings.batch_size)
    micro_total = settings.epochs * micro_per_epoch
    total = math.ceil(micro_total / settings.grad_accum_steps)
    masters = MasterWeights([p for p in model.parameters() if p.requires_grad])
    optimizer = torch.optim.AdamW(masters.params, lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, int(settings.warmup_share * total)), total)
    losses: list[float] = []
    step = 0
    state = load_training_state(resume, device, log) if resume is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        masters.load(state.get("masters"))
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        step, losses = state["step"], state["losses"]
        torch.set_rng_state(state["rng"])
        log(f"resuming at step {step}/{total} from {resume}")
    else:
        torch.manual_seed(settings.seed)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    orders: dict[int, np.ndarray] = {}
    model.train()
    while step < total:
        micro = range(step * settings.grad_accum_steps, min((step + 1) * settings.grad_accum_steps, micro_total))
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for m in micro:
            epoch, index = divmod(m, micro_per_epoch)
            order = orders.get(epoch)
            if order is None:
                orders.clear()
                order = orders[epoch] = np.random.default_rng(settings.seed + epoch).permutation(examples)
            loss = micro_batch_loss(order[index * settings.batch_size : (index + 1) * settings.batch_size])
            (loss / len(micro)).backward()
            step_loss += float(loss.detach()) / len(micro)
        masters.take_grads()
        torch.nn.utils.clip_grad_norm_(masters.params, 1.0)
        optimizer.step()
        schedule.step()
        masters.write_back()
        losses.append(step_loss)
        step += 1
        if step % max(1, total // 10) == 0 or step == total:
            log(f"step {step}/{total} loss {np.mean(losses[-max(1, total // 10):]):.4f}")
        if on_step is not None:
            on_step(step, total, float(np.mean(losses[-10:])))
        if resume is not None and (step % settings.save_every == 0) and step < total:
            with atomic_path(resume) as temp:
                torch.save({"model": model.state_dict(), "masters": masters.state(), "optimizer": optimizer.state_dict(),
                            "schedule": schedule.state_dict(), "step": step, "losses": losses,
                            "rng": torch.get_rng_state()}, temp)
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model.eval()
    return losses


class MasterWeights:
    """fp32 master copies of trainable weights held in bfloat16 (or float16).

    bf16 keeps 8 mantissa bits: at lr 1e-5 an Adam update (about lr per weight) is far below
    half the spacing of bf16 numbers near a typical weight (0.03 -> spacing 1.2e-4), so a
    plain optimizer step on bf16 weights rounds most updates away and the model never moves.
    Here the optimizer (its moments and update) runs on fp32 copies; after each step the
    copies are rounded into the model, so updates accumulate in fp32 until they show. fp32
    weights are trained directly (no copies: the CPU default is unchanged)."""

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        self.model_params = list(params)
        self.active = any(p.dtype in LOW_PRECISION for p in self.model_params)
        self.params = ([torch.nn.Parameter(p.detach().float().clone()) for p in self.model_params] if self.active
                       else self.model_params)

    def take_grads(self) -> None:
        """The model's gradients, in fp32, onto the masters (the model's are released)."""
        if self.active:
            for master, param in zip(self.params, self.model_params):
                master.grad = None if param.grad is None else param.grad.float()
                param.grad = None

    def write_back(self) -> None:
        if self.active:
            with torch.no_grad():
                for master, param in zip(self.params, self.model_params):
                    param.copy_(master)

    def state(self) -> list[torch.Tensor] | None:
        return [m.detach().clone() for m in self.params] if self.active else None

    def load(self, saved: Sequence[torch.Tensor] | None) -> None:
        if self.active and saved is not None:
            with torch.no_grad():
                for master, value in zip(self.params, saved):
                    master.copy_(value)
            self.write_back()


def load_training_state(resume: Path, device, log: Log) -> dict | None:
    """A saved training state, or None to train from the start: a state that cannot be read
    (a torn or foreign file) is set aside, renamed and not deleted, and named."""
    if not resume.is_file():
        return None
    try:
        state = torch.load(resume, map_location=device, weights_only=False)
        if not isinstance(state, dict) or not STATE_KEYS <= state.keys():
            raise ValueError("not a training state")
    except Exception as err:  # torch.load raises many types for a damaged file
        aside = set_aside(resume)
        log(f"warning: training state {resume} is damaged ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}); set it aside as {aside.name}, training this stage from its start")
        return None
    return state


def linear_module_names(model: torch.nn.Module, outside: set[str] = frozenset()) -> list[str]:
    """peft's ``all-linear`` spelled out: the last name part of every linear layer of the
    body, leaving out the top-level children named in ``outside`` and the output embedding."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    outside = set(outside) | {name for name, child in model.named_children() if child is output}
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear) and name.split(".")[0] not in outside and module is not output})


def add_lora(model: torch.nn.Module, rank: int, alpha: float, dropout: float = 0.0,
             target_modules: Sequence[str] | str = "all-linear", modules_to_save: Sequence[str] | None = None,
             task_type: str | None = None):
    """``model`` wrapped in fresh peft LoRA adapters (only they, and ``modules_to_save``,
    train); returns (the peft model, trainable weights, total weights)."""
    from peft import LoraConfig, get_peft_model

    targets = linear_module_names(model, set(modules_to_save or ())) if target_modules == "all-linear" else list(target_modules)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                        modules_to_save=list(modules_to_save) if modules_to_save else None, task_type=task_type)
    wrapped = get_peft_model(model, config)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    return wrapped, trainable, sum(p.numel() for p in wrapped.parameters())


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """LoRA adapters folded into the weights (a plain transformers model again); the model
    itself when it has none."""
    return model.merge_and_unload().eval() if hasattr(model, "merge_and_unload") else model
