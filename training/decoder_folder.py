"""A checkpoint's `diffusion-decoder/` folder: weights under the published names, scheduler checked.

BLIP3-o publishes Emu2-Gen's decoder as a diffusers folder whose weights are the bf16 variant
(`unet/diffusion_pytorch_model.bf16.safetensors`: its code loads them with `variant="bf16"`);
diffusers asked without `variant=` looks for the plain name and fails. `load_decoder` takes the
variant that is there (`checkpoint_files.diffusers_weights`: plain, bf16 or fp16), loads only
the components asked for (a UNet export needs no VAE: the other one is built on `meta`, holding
no memory) and casts to the build's dtype.

The scheduler is no weight, but it decides the sampling: the runtime follows the config's
`DecoderConfig` scheduler fields (they are written into the engine folder's manifest), while the
reference pipeline would follow the file. A published `scheduler_config.json` that differs from
the preset would drift quality silently, so `settle_scheduler` compares the file's effective
values (diffusers' defaults for absent keys) with the config and stops on a difference, naming
both values, unless told to adopt the file's values or keep the preset's.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

from training.checkpoint_files import CheckpointError, diffusers_weights, read_json_object
from training.config import DecoderConfig, ModelConfig
from training.model.decoder import Decoder, unet_kwargs, vae_kwargs

log = logging.getLogger(__name__)

DECODER_PARTS = ("unet", "vae")
SCHEDULER_FILE = Path("scheduler") / "scheduler_config.json"
SCHEDULER_MODES = ("check", "checkpoint", "preset")
# DecoderConfig fields a checkpoint may set, and the values the runtime's schedule implements
# (runtime/jobs/schedule.py; None: any value).
SCHEDULER_FIELDS = {
    "num_train_timesteps": None,
    "beta_start": None,
    "beta_end": None,
    "beta_schedule": ("linear", "scaled_linear"),
    "timestep_spacing": ("leading", "trailing", "linspace"),
    "steps_offset": None,
}
# Scheduler options the runtime implements at one value only (epsilon Euler discrete sampling).
FIXED_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "timestep_type": "discrete",
    "rescale_betas_zero_snr": False,
    "final_sigmas_type": "zero",
    "trained_betas": None,
}


def load_decoder(
    cfg: DecoderConfig,
    folder: str | Path,
    *,
    parts: tuple[str, ...] = DECODER_PARTS,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Decoder:
    """`Decoder` of a diffusers folder with `parts` loaded (in `dtype` on `device`), others on meta.

    The scheduler comes from `cfg` (settle it against the file first: `settle_scheduler`).
    """
    folder = Path(folder)
    unknown = sorted(set(parts) - set(DECODER_PARTS))
    if unknown:
        raise ValueError(f"unknown decoder part(s) {unknown}; valid: {', '.join(DECODER_PARTS)}")
    built = {}
    for part, cls, kwargs in (
        ("unet", UNet2DConditionModel, unet_kwargs),
        ("vae", AutoencoderKL, vae_kwargs),
    ):
        if part in parts:
            variant, _ = diffusers_weights(folder / part)
            model = cls.from_pretrained(
                folder / part, variant=variant, torch_dtype=dtype, use_safetensors=True
            )
            built[part] = model.to(device)
            log.debug("loaded %s/%s (variant %s) as %s", folder.name, part, variant, dtype)
        else:
            with init_empty_weights():
                built[part] = cls(**kwargs(cfg))
    return Decoder(cfg, unet=built["unet"], vae=built["vae"]).eval()


def read_scheduler_config(folder: str | Path) -> dict:
    """The decoder folder's `scheduler/scheduler_config.json` as written."""
    path = Path(folder) / SCHEDULER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist (the decoder's scheduler config)")
    data = read_json_object(path)
    return data


def _defaults() -> dict:
    params = inspect.signature(EulerDiscreteScheduler.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b or a == b and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def scheduler_mismatches(data: dict, cfg: DecoderConfig) -> list[tuple[str, object, object]]:
    """(field, file value, config value) of every scheduler setting where the file differs.

    Absent keys take diffusers' `EulerDiscreteScheduler` defaults, as diffusers would load them.
    """
    effective = {**_defaults(), **data}
    wanted = {**{f: getattr(cfg, f) for f in SCHEDULER_FIELDS}, **FIXED_SCHEDULER}
    return [(f, effective.get(f), v) for f, v in wanted.items() if not _same(effective.get(f), v)]


def settle_scheduler(folder: str | Path, cfg: ModelConfig, mode: str = "check") -> ModelConfig:
    """`cfg` with its decoder scheduler settled against the checkpoint's scheduler config.

    mode "check": a difference raises `CheckpointError` naming each field and both values;
    "checkpoint": the file's values replace the config's (the ones the runtime implements);
    "preset": the config's values are kept (the differences are logged).
    """
    if mode not in SCHEDULER_MODES:
        raise ValueError(f"unknown scheduler mode {mode!r}; valid: {', '.join(SCHEDULER_MODES)}")
    path = Path(folder) / SCHEDULER_FILE
    diffs = scheduler_mismatches(read_scheduler_config(folder), cfg.decoder)
    if not diffs:
        return cfg
    said = "; ".join(f"{f} = {got!r} (the {cfg.variant} preset: {v!r})" for f, got, v in diffs)
    if mode == "preset":
        log.warning("%s differs from the preset, keeping the preset's values: %s", path, said)
        return cfg
    if mode == "checkpoint":
        fixed = [(f, got, want) for f, got, want in diffs if f not in SCHEDULER_FIELDS]
        fixed += [
            (f, got, SCHEDULER_FIELDS[f])
            for f, got, _ in diffs
            if SCHEDULER_FIELDS.get(f) is not None and got not in SCHEDULER_FIELDS[f]
        ]
        if fixed:
            what = "; ".join(f"{f} = {got!r} (supported: {want!r})" for f, got, want in fixed)
            raise CheckpointError(f"{path}: the runtime's sampler cannot follow {what}")
        log.warning("%s: using the checkpoint's scheduler values: %s", path, said)
        values = {f: got for f, got, _ in diffs}
        return dataclasses.replace(cfg, decoder=dataclasses.replace(cfg.decoder, **values))
    raise CheckpointError(
        f"{path} differs from the {cfg.variant} preset: {said}; choose which to build with: "
        "--decoder-scheduler checkpoint (the file's values) or preset (the preset's)"
    )
