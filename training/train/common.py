"""The training loop shared by every stage: seeding, data, distributed wrapping, resumable state.

A stage is an objective module (its `forward(**batch)` returns `(loss, metrics)`), a batch
function `make_batch(step, generator)`, an optional small `evaluate()` and a `StageSettings`. The
loop here runs it: AdamW with linear warmup and cosine decay, a tqdm bar on rank 0, periodic
evaluation, and atomic checkpoints (model + optimizer + step + fingerprint) that a later run
resumes from. With `StageSettings.ema` the loop also keeps an exponential moving average of the
trained weights (saved as the checkpoint's `ema`, evaluated beside the live weights with an `ema_`
prefix, and what `final_weights` gives the later stages and the export). Every step draws its
data and noise from generators seeded by (run seed, stage, step, rank), so a resumed run sees
exactly the batches an uninterrupted one would have.

Distributed: launched by `torchrun`, `WORLD_SIZE` > 1 selects DDP with the gloo backend (CPU);
each rank draws its own scenes, rank 0 alone saves and logs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from training.data.shapes import TRAIN_SEED_LIMIT, Scene, stream
from training.train.state import (
    CHECKPOINT_FORMAT,
    ResumeError,
    check_fingerprint,
    load_state,
    save_state,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageSettings:
    """Optimization settings of one training loop (part of its resume fingerprint)."""

    steps: int
    batch: int
    lr: float
    warmup: int = 50
    weight_decay: float = 0.0
    eval_every: int = 0  # 0: evaluate only at the end
    save_every: int = 200
    grad_clip: float = 1.0
    ema: float = 0.0  # decay of an exponential moving average of the weights (0: none)

    def scaled(self, scale: float) -> StageSettings:
        """The same settings with `steps` (and warmup) multiplied by `scale` (at least 1 step)."""
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"steps scale must be a finite number > 0, got {scale!r}")
        steps = max(1, round(self.steps * scale))
        warmup = min(self.warmup, max(0, steps // 5))
        return dataclasses.replace(self, steps=steps, warmup=warmup)


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly single-process) run."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the torchrun process group (gloo) when WORLD_SIZE > 1; a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size())


def barrier(d: Dist) -> None:
    if d.world > 1:
        dist.barrier()


def wrap(module: nn.Module, d: Dist) -> nn.Module:
    """DistributedDataParallel around `module` when distributed (its trainable params synced)."""
    if d.world <= 1:
        return module
    return nn.parallel.DistributedDataParallel(module)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module


# ---------------------------------------------------------------- seeds and data


def mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integer parts (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


def step_generator(seed: int, stage: int, step: int, rank: int) -> torch.Generator:
    """The torch generator of one step's noise, dropout and sigma draws."""
    return torch.Generator().manual_seed(mix_seed(seed, stage, step, rank))


def step_rng(seed: int, stage: int, step: int, rank: int) -> np.random.Generator:
    """The numpy generator of one step's host-side choices (questions, crops)."""
    return np.random.default_rng(mix_seed(seed, stage, step, rank, 1))


def scene_batch(seed: int, stage: int, step: int, d: Dist, batch: int) -> list[Scene]:
    """`batch` training scenes for one step of one rank, from its own seeded stream."""
    scenes = stream(mix_seed(seed, stage, step, d.rank, 2) % TRAIN_SEED_LIMIT)
    return [next(scenes) for _ in range(batch)]


def images_tensor(scenes: list[Scene]) -> torch.Tensor:
    """Rendered scenes as float images in [0, 1]: (B, 3, 64, 64)."""
    array = np.stack([s.render() for s in scenes])  # (B, 64, 64, 3) uint8
    return torch.from_numpy(array).permute(0, 3, 1, 2).float() / 255.0


# ---------------------------------------------------------------- the loop


def lr_factor(step: int, settings: StageSettings) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 10% at the last step."""
    if step < settings.warmup:
        return (step + 1) / settings.warmup
    span = max(1, settings.steps - settings.warmup)
    progress = min(1.0, (step - settings.warmup) / span)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class Loop:
    """One resumable optimization loop (a stage, or one phase of the decoder stage)."""

    name: str
    path: Path  # its checkpoint file
    objective: nn.Module  # forward(**batch) -> (loss, metrics); holds the trained modules
    modules: dict[str, nn.Module]  # what the checkpoint saves (state_dicts)
    make_batch: Callable[[int], dict]  # step -> keyword batch
    settings: StageSettings
    fingerprint: dict
    evaluate: Callable[[], dict] | None = None
    extra: dict = dataclasses.field(default_factory=dict)  # saved alongside (e.g. stats)


def run_loop(loop: Loop, d: Dist, *, resume: bool, stop_at: int | None = None) -> dict:
    """Train `loop` to `settings.steps` (or `stop_at`), resuming from its checkpoint if asked.

    Returns {"start_step", "step", "done", "seconds", "metrics"} (last step's metrics, last eval).
    """
    s = loop.settings
    params = [p for p in loop.objective.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, s))
    start, saved, state = 0, {}, {}
    if loop.path.exists():
        if not resume:
            raise ResumeError(
                f"{loop.path} exists; pass --resume to continue it, or choose a new --out folder"
            )
        state = load_state(loop.path)
        check_fingerprint(loop.path, state["fingerprint"], loop.fingerprint)
        for key, module in loop.modules.items():
            module.load_state_dict(state["model"][key])
        if not state["done"]:  # a finished loop only needs its weights
            optimizer.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        start, saved = state["step"], state.get("metrics", {})
        loop.extra.update(state.get("extra", {}))
        log.info("%s: resuming at step %d/%d from %s", loop.name, start, s.steps, loop.path)
    end = s.steps if stop_at is None else min(s.steps, stop_at)
    ema = EmaWeights(loop.modules, s.ema, state.get("ema") if start else None) if s.ema else None
    model = wrap(loop.objective, d)
    model.train()
    bar = tqdm(
        total=s.steps, initial=start, desc=loop.name, disable=not d.main, mininterval=10,
        dynamic_ncols=True,
    )  # fmt: skip
    metrics: dict = saved.get("train", {})
    evals: dict = saved.get("eval", {})
    t0 = time.time()
    for step in range(start, end):
        batch = loop.make_batch(step)
        loss, metrics = model(**batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if s.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
        optimizer.step()
        sched.step()
        if ema is not None:
            ema.update(step)
        metrics = {
            k: float(torch.as_tensor(v).detach()) for k, v in {"loss": loss, **metrics}.items()
        }
        bar.update(1)
        bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
        done_now = step + 1
        last = done_now == s.steps
        if (
            loop.evaluate is not None
            and d.main
            and (last or (s.eval_every and done_now % s.eval_every == 0))
        ):
            loop.objective.eval()
            evals = loop.evaluate()
            if ema is not None:
                with ema.swapped():
                    evals.update({f"ema_{k}": v for k, v in loop.evaluate().items()})
            loop.objective.train()
            log.info("%s step %d eval %s", loop.name, done_now, _fmt(evals))
        if last or done_now == end or done_now % s.save_every == 0:
            _save(loop, optimizer, sched, done_now, d, {"train": metrics, "eval": evals}, ema)
    bar.close()
    seconds = time.time() - t0
    if d.main and end > start:
        log.info("%s: steps %d-%d in %.0f s (%.2f steps/s)", loop.name, start, end, seconds,
                 (end - start) / max(seconds, 1e-9))  # fmt: skip
    loop.objective.eval()
    return {"start_step": start, "step": end, "done": end == s.steps, "seconds": seconds,
            "metrics": metrics, "eval": evals}  # fmt: skip


class EmaWeights:
    """An exponential moving average of the trainable parameters of a loop's saved modules.

    The decay ramps up as min(decay, (1 + step) / (10 + step)), so early averages are not
    dominated by the random initialization.
    """

    def __init__(self, modules: dict[str, nn.Module], decay: float, saved: dict | None) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = {
            key: {n: p for n, p in m.named_parameters() if p.requires_grad}
            for key, m in modules.items()
        }
        self.avg = {
            key: {n: (saved or {}).get(key, {}).get(n, p.detach()).clone() for n, p in ps.items()}
            for key, ps in self.params.items()
        }

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for key, ps in self.params.items():
            for n, p in ps.items():
                self.avg[key][n].lerp_(p.detach(), 1.0 - decay)

    def state(self) -> dict:
        return {key: {n: t.clone() for n, t in avg.items()} for key, avg in self.avg.items()}

    @contextlib.contextmanager
    def swapped(self):
        """The averaged weights in the live parameters for the duration of the block."""
        live = self.state_of_params()
        self._copy(self.avg)
        try:
            yield
        finally:
            self._copy(live)

    def state_of_params(self) -> dict:
        return {
            key: {n: p.detach().clone() for n, p in ps.items()} for key, ps in self.params.items()
        }

    @torch.no_grad()
    def _copy(self, source: dict) -> None:
        for key, ps in self.params.items():
            for n, p in ps.items():
                p.copy_(source[key][n])


def final_weights(state: dict, key: str) -> dict:
    """A saved module's state dict, with its averaged weights where the loop kept an EMA."""
    return {**state["model"][key], **state.get("ema", {}).get(key, {})}


def _fmt(values: dict) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )


def _save(loop: Loop, optimizer, sched, step: int, d: Dist, metrics: dict, ema=None) -> None:
    if d.main:
        state = {
            "format": CHECKPOINT_FORMAT,
            "stage": loop.name,
            "step": step,
            "done": step == loop.settings.steps,
            "fingerprint": loop.fingerprint,
            "model": {k: m.state_dict() for k, m in loop.modules.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": sched.state_dict(),
            "extra": loop.extra,
            "metrics": metrics,
        }
        if ema is not None:
            state["ema"] = ema.state()
        save_state(loop.path, state)
        with open(loop.path.with_suffix(".jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
    barrier(d)
