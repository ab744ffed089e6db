"""The sampling settings of a job, one validated value each: `GeneratorParams` (an image) and
`AnswerParams` (an answer).

After onnxruntime-genai's `GeneratorParams`: the Python API (`Generator.start` / `generate` /
`start_answer` / `answer`), the CLI (its options are derived from the fields here), the server
(its request fields are read from them), Triton's inputs and the C++ header (`blip3o.hpp`'s
`GeneratorParams` builds this object) all pass these values, checked when they are made: a bad
value is one `UserError` naming the field, the value and what is allowed. Every edge derives its
fields from the dataclasses' field metadata (`settings(cls)`), so a field added here appears
everywhere (a test checks each edge).

    params = runtime.GeneratorParams(seed=3, steps=20)
    images = gen.generate("a red circle", params)
    images = gen.generate("a red circle", seed=3, steps=20)   # the same, from keywords

A field left `None` takes the engine folder's default (the manifest's `sampler`) when a job
starts (`resolved`), where `num_images` is also checked against the folder's batch size.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from runtime import validate
from runtime.errors import UserError, UserTypeError
from runtime.folder.graphs import MAX_GUIDANCE
from runtime.jobs.samplers import DECODER_SAMPLERS, FLOW_SAMPLERS, check_sampler

MAX_STEPS = 1000
MAX_SEED = 2**63 - 1
MAX_NEW_TOKENS = 1 << 16
MAX_TEMPERATURE = 100.0


def _setting(kind: type, low, high, help: str, default=None):
    return field(default=default, metadata={"kind": kind, "range": (low, high), "help": help})


def _choice(choices: tuple[str, ...] | None, help: str):
    """A named choice; `choices` None: the engine folder's names (checked when resolved)."""
    return field(default=None, metadata={"kind": str, "choices": choices, "help": help})


# The settings an engine folder's `sampler` section (and each of its presets) gives defaults for.
SAMPLER_FIELDS = (
    "sampler", "steps", "guidance", "decoder_sampler", "decoder_steps", "decoder_guidance",
)  # fmt: skip


class _Params:
    """What both params objects share: checks at construction, `of`, the fields' metadata."""

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
            check = validate.integer if f.metadata["kind"] is int else validate.number
            object.__setattr__(self, f.name, check(f.name, value, low, high))  # numpy -> Python

    @classmethod
    def of(cls, params=None, **settings):
        """`params` (default: all defaults) with keyword `settings` replacing its fields: how
        `Generator.start(prompt, seed=..., steps=...)` turns keywords into params."""
        if params is not None and not isinstance(params, cls):
            raise UserTypeError(f"params must be a {cls.__name__}, got {type(params).__name__}")
        unknown = sorted(set(settings) - set(settings_of(cls)))
        if unknown:
            raise UserError(
                f"unknown {cls.__name__} setting(s) {unknown}; valid: {', '.join(settings_of(cls))}"
            )
        return dataclasses.replace(params or cls(), **settings)


@dataclass(frozen=True)
class GeneratorParams(_Params):
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

    def resolved(self, sampler: dict, max_images: int, min_images: int = 1) -> GeneratorParams:
        """Every `None` filled from a manifest's `sampler` (through its `presets[preset]` first
        when a preset is named); `num_images` in [min_images, max_images] (the graphs' batch:
        a folder built with a static batch takes exactly that many)."""
        validate.integer("num_images", self.num_images, min_images, max_images)
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


@dataclass(frozen=True)
class AnswerParams(_Params):
    """Sampling options of a token job: greedy when `temperature` is 0 (the default)."""

    max_new_tokens: int = _setting(int, 1, MAX_NEW_TOKENS, "most tokens to generate", 32)
    temperature: float = _setting(
        float, 0.0, MAX_TEMPERATURE, "softmax temperature; 0 is greedy", 0.0
    )
    top_p: float = _setting(float, 0.0, 1.0, "nucleus mass kept when sampling", 1.0)
    seed: int = _setting(int, 0, MAX_SEED, "seed of the token sampler", 0)


def settings_of(cls) -> tuple[str, ...]:
    """Every field of a params class, as the CLI, the server, Triton and C++ name them."""
    return tuple(f.name for f in dataclasses.fields(cls))


# Every field of GeneratorParams, as the CLI, the server and the C++ header name them.
SETTINGS = settings_of(GeneratorParams)


def field_info(cls) -> dict[str, dict]:
    """Each field's kind, default, range or choices and help: what the edges (server schema,
    Triton inputs, CLI) derive their fields from."""
    return {f.name: {"default": f.default, **f.metadata} for f in dataclasses.fields(cls)}


def add_arguments(parser, cls=GeneratorParams, *, ranges: dict | None = None) -> None:
    """One `--option` per field (`decoder_steps` -> `--decoder-steps`), typed and ranged by the
    dataclass: the CLI lists no setting of its own. `ranges` overrides a field's shown range
    (e.g. `num_images` from the engine folder's batch)."""
    for f in dataclasses.fields(cls):
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
        low, high = (ranges or {}).get(f.name, f.metadata["range"])
        default = "the engine folder's" if f.default is None else f.default
        parser.add_argument(
            flag,
            type=f.metadata["kind"],
            default=f.default,
            help=f"{f.metadata['help']}, in [{low}, {high}] (default: {default})",
        )


def from_arguments(args, cls=GeneratorParams):
    """The params of parsed arguments (`add_arguments`); validated here, once."""
    return cls(**{name: getattr(args, name) for name in settings_of(cls)})
