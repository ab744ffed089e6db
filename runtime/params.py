"""`GeneratorParams`: the sampling settings of a generation, one validated value.

After onnxruntime-genai's `GeneratorParams`: the Python API (`Generator.start` / `generate`),
the CLI (its options are derived from the fields here) and the C++ header (`blip3o.hpp`'s
`GeneratorParams` builds this object) all pass this one value, checked when it is made: a bad
value is one `UserError` naming the field, the value and what is allowed.

    params = runtime.GeneratorParams(seed=3, steps=20)
    images = gen.generate("a red circle", params)
    images = gen.generate("a red circle", seed=3, steps=20)   # the same, from keywords

A field left `None` takes the engine folder's default (the manifest's `sampler`) when a job
starts (`resolved`), where `num_images` is also checked against the folder's batch size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from runtime import checks
from runtime.errors import UserError, UserTypeError
from runtime.samplers import DECODER_SAMPLERS, FLOW_SAMPLERS, check_sampler

MAX_STEPS = 1000
# Classifier-free guidance past ~20 already saturates; 100 leaves room and refuses absurd
# values (1e38 overflows the guided combine to inf and paints a black image).
MAX_GUIDANCE = 100.0
MAX_SEED = 2**63 - 1


def _setting(kind: type, low, high, help: str, default=None):
    return field(default=default, metadata={"kind": kind, "range": (low, high), "help": help})


def _choice(choices: tuple[str, ...] | None, help: str):
    """A named choice; `choices` None: the engine folder's names (checked when resolved)."""
    return field(default=None, metadata={"kind": str, "choices": choices, "help": help})


# The settings an engine folder's `sampler` section (and each of its presets) gives defaults for.
SAMPLER_FIELDS = (
    "sampler", "steps", "guidance", "decoder_sampler", "decoder_steps", "decoder_guidance",
)  # fmt: skip


@dataclass(frozen=True)
class GeneratorParams:
    """Sampling settings; `None` means the engine folder's default (its manifest's sampler)."""

    seed: int = _setting(int, 0, MAX_SEED, "seed of the noise (DiT then decoder)", 0)
    steps: int | None = _setting(int, 1, MAX_STEPS, "DiT flow steps")
    guidance: float | None = _setting(float, 0.0, MAX_GUIDANCE, "DiT CFG scale")
    decoder_steps: int | None = _setting(int, 1, MAX_STEPS, "decoder UNet steps")
    decoder_guidance: float | None = _setting(float, 0.0, MAX_GUIDANCE, "decoder CFG scale")
    num_images: int = _setting(int, 1, 1024, "images per prompt, one batch", 1)
    sampler: str | None = _choice(FLOW_SAMPLERS, "DiT flow sampler")
    decoder_sampler: str | None = _choice(DECODER_SAMPLERS, "decoder UNet sampler")
    preset: str | None = _choice(
        None, "a named sampler preset of the engine folder (e.g. fast); set fields override it"
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is None:
                continue
            if f.metadata["kind"] is str:
                if not isinstance(value, str):
                    raise UserTypeError(f"{f.name} must be a str, got {type(value).__name__}")
                if f.metadata["choices"] is not None:
                    check_sampler(f.name, value, f.metadata["choices"])
                continue
            low, high = f.metadata["range"]
            check = checks.integer if f.metadata["kind"] is int else checks.number
            object.__setattr__(self, f.name, check(f.name, value, low, high))  # numpy -> Python

    @classmethod
    def of(cls, params: GeneratorParams | None = None, **settings) -> GeneratorParams:
        """`params` (default: all defaults) with keyword `settings` replacing its fields: how
        `Generator.start(prompt, seed=..., steps=...)` turns keywords into params."""
        if params is not None and not isinstance(params, cls):
            raise UserTypeError(f"params must be a GeneratorParams, got {type(params).__name__}")
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            valid = ", ".join(f.name for f in dataclasses.fields(cls))
            raise UserError(f"unknown generation setting(s) {unknown}; valid: {valid}")
        return dataclasses.replace(params or cls(), **settings)

    def resolved(self, sampler: dict, max_images: int, min_images: int = 1) -> GeneratorParams:
        """Every `None` filled from a manifest's `sampler` (through its `presets[preset]` first
        when a preset is named); `num_images` in [min_images, max_images] (the graphs' batch:
        a folder built with a static batch takes exactly that many)."""
        checks.integer("num_images", self.num_images, min_images, max_images)
        defaults = {k: sampler[k] for k in SAMPLER_FIELDS}
        if self.preset is not None:
            presets = sampler.get("presets") or {}
            if self.preset not in presets:
                if not presets:
                    raise UserError(f"preset {self.preset!r}: this engine folder has no presets")
                valid = ", ".join(sorted(presets))
                raise UserError(f"preset must be one of {valid}, got {self.preset!r}")
            defaults.update(presets[self.preset])
        return dataclasses.replace(
            self, **{k: v for k, v in defaults.items() if getattr(self, k) is None}
        )

    @property
    def is_resolved(self) -> bool:
        return all(getattr(self, name) is not None for name in SAMPLER_FIELDS)


# Every field, as the CLI, the server and the C++ header name them.
SETTINGS = tuple(f.name for f in dataclasses.fields(GeneratorParams))


def add_arguments(parser) -> None:
    """One `--option` per field (`decoder_steps` -> `--decoder-steps`), typed and ranged by the
    dataclass: the CLI lists no setting of its own."""
    for f in dataclasses.fields(GeneratorParams):
        flag = "--" + f.name.replace("_", "-")
        if f.metadata["kind"] is str:
            choices = f.metadata["choices"]
            shown = f"one of {', '.join(choices)}" if choices else "a name the folder lists"
            parser.add_argument(
                flag,
                choices=choices,
                default=None,
                help=f"{f.metadata['help']}, {shown} (default: the engine folder's)",
            )
            continue
        low, high = f.metadata["range"]
        default = "the engine folder's" if f.default is None else f.default
        parser.add_argument(
            flag,
            type=f.metadata["kind"],
            default=f.default,
            help=f"{f.metadata['help']}, in [{low}, {high}] (default: {default})",
        )


def from_arguments(args) -> GeneratorParams:
    """The params of parsed arguments (`add_arguments`); validated here, once."""
    return GeneratorParams(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(GeneratorParams)}
    )
