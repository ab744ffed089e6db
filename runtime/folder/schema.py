"""The schema of `manifest.json`, by format version: every field the runtime reads, checked once.

An engine folder travels (copied onto devices, edited by hand, built by another version), so the
runtime validates its manifest when it opens it instead of failing deep inside a run with a
`KeyError`. A refusal names the field (as a dotted path), the value found, what is allowed and
the fix. File names are confined to the folder: an absolute path, a `..` component or a symlink
that leads outside is refused, so a manifest cannot make the runtime read `/etc/passwd`. Prompt
templates may use only their own placeholders (no attribute or index access, which `str.format`
would otherwise evaluate). A manifest of a newer format says which runtime version reads it.

A schema is plain data: a dict maps field names to nested schemas or to checks (`Check`); a
field whose name ends in `?` may be absent or null.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtime.folder.graphs import latent_side
from runtime.folder.spec import PRECISIONS, spec_from_dict
from runtime.jobs.samplers import DECODER_SAMPLERS, FLOW_SAMPLERS
from runtime.jobs.schedule import BETA_SCHEDULES, TIMESTEP_SPACINGS

# The decoder's CFG negative (`sampler.decoder_negative`): "blank_prompt" (BLIP3-o 4b/8b as
# published: the DiT's features of the blank prompt) or "zeros" (the dropped condition of a
# decoder trained with zeroed conditions, like tiny's). Either way the folder holds the features.
DECODER_NEGATIVES = ("blank_prompt", "zeros")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CAPABILITY = re.compile(r"^\d+\.\d+$")


class SchemaError(ValueError):
    """One field of a manifest that does not match the schema (its path and the problem)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"field {path!r} {problem}")
        self.path = path


@dataclass(frozen=True)
class Check:
    """A leaf of the schema: `ok(value) -> None` raises `ValueError(what is allowed)`."""

    describe: str
    ok: Callable[[object], bool]

    def __call__(self, path: str, value) -> None:
        try:
            good = self.ok(value)
        except (TypeError, ValueError, KeyError):
            good = False
        if not good:
            raise SchemaError(path, f"is {_show(value)}; expected {self.describe}")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _int(low: int = 0, high: int = 2**63 - 1) -> Check:
    return Check(
        f"an integer in [{low}, {high}]",
        lambda v: type(v) is int and low <= v <= high,
    )


def _number(low: float, high: float) -> Check:
    return Check(
        f"a number in [{low:g}, {high:g}]",
        lambda v: type(v) in (int, float) and low <= v <= high,
    )


def _one_of(*values) -> Check:
    return Check(f"one of {', '.join(map(str, values))}", lambda v: v in values)


def _str(pattern: re.Pattern | None = None, describe: str = "a string") -> Check:
    return Check(describe, lambda v: isinstance(v, str) and (not pattern or pattern.match(v)))


def _list(item: Check, min_len: int = 1) -> Check:
    return Check(
        f"a list of at least {min_len} of: {item.describe}",
        lambda v: isinstance(v, list) and len(v) >= min_len and all(item.ok(x) for x in v),
    )


def _template(*fields: str) -> Check:
    """A `str.format` template whose placeholders are exactly `fields`, each used plainly."""

    def ok(value) -> bool:
        if not isinstance(value, str):
            return False
        used = []
        for _, name, spec, conversion in string.Formatter().parse(value):
            if name is None:
                continue
            if name not in fields or spec or conversion:
                return False
            used.append(name)
        return sorted(set(used)) == sorted(fields)

    placeholders = ", ".join("{" + f + "}" for f in fields)
    return Check(f"a template using exactly {placeholders} (plain)", ok)


def _spec(value) -> bool:
    spec_from_dict(value)
    return True


SHA256 = _str(_SHA256, "a sha256 (64 lower-case hex digits)")
POSITIVE = _int(1)
FILE_NAME = Check("a file name inside the engine folder", lambda v: isinstance(v, str) and v)
FILE = {"file": FILE_NAME, "sha256": SHA256, "size": _int()}  # size in bytes: fast verify
TEXT = _str()

GRAPH = {
    "file": FILE_NAME,
    "sha256": SHA256,
    "size": _int(),
    "spec": Check("a graph spec (name, inputs, outputs, dims)", _spec),
    "external_data?": Check(
        "a list of {file, sha256, size}",
        lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
    ),
    "engine?": FILE,
}

# The generation settings a `sampler` section, and each of its named presets, gives.
SAMPLER_SETTINGS = {
    "sampler": _one_of(*FLOW_SAMPLERS),
    "steps": _int(1, 1000),
    "guidance": _number(0.0, 100.0),
    "decoder_sampler": _one_of(*DECODER_SAMPLERS),
    "decoder_steps": _int(1, 1000),
    "decoder_guidance": _number(0.0, 100.0),
}


def _preset_ok(value) -> bool:
    """A table of named presets, each some of the sampler settings."""

    def ok(name, preset) -> bool:
        return (
            isinstance(name, str)
            and bool(re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", name))
            and isinstance(preset, dict)
            and set(preset) <= set(SAMPLER_SETTINGS)
            and all(SAMPLER_SETTINGS[k].ok(v) for k, v in preset.items())
        )

    return isinstance(value, dict) and all(ok(k, v) for k, v in value.items())


PRESETS = Check(
    "a table of named presets (lower-case names), each some of: " + ", ".join(SAMPLER_SETTINGS),
    _preset_ok,
)

SCHEMA = {
    "format": _int(1),
    "variant": _str(re.compile(r"^[A-Za-z0-9_.-]+$"), "a variant name (letters, digits, ._-)"),
    "precision": _one_of(*PRECISIONS),
    "backend?": _one_of("onnxruntime", "tensorrt"),
    "tensorrt?": _str(re.compile(r"^\d+(\.\d+)*$"), "a TensorRT version like 10.8.0"),
    "compute_capability?": _str(_CAPABILITY, "a compute capability like 9.0"),
    "config": {
        "backbone": {
            "eos_token_id": _int(),
            "image_token_id": _int(),
            "img_token_id": _int(),
            "vision_start_token_id": _int(),
            "vision": {
                "patch_size": POSITIVE,
                "temporal_patch_size": POSITIVE,
                "spatial_merge_size": POSITIVE,
                "window_size": POSITIVE,
                "min_pixels": POSITIVE,
                "max_pixels": POSITIVE,
            },
        },
        "dit": {"in_channels": POSITIVE, "input_size": POSITIVE},
        "decoder": {
            "image_size": POSITIVE,
            "latent_channels": POSITIVE,
            "vae_block_out_channels": _list(POSITIVE),
            "num_train_timesteps": _int(1, 100_000),
            "beta_start": _number(0.0, 1.0),
            "beta_end": _number(0.0, 1.0),
            "beta_schedule": _one_of(*BETA_SCHEDULES),
            "timestep_spacing": _one_of(*TIMESTEP_SPACINGS),
            "steps_offset": _int(0, 1000),
        },
    },
    "graphs": Check("a table of graphs", lambda v: isinstance(v, dict)),  # entries: GRAPH
    # `negative_features`: the decoder's CFG negative (1, 64, C) float32, always a built file (the
    # `negative` build stage): the DiT's features of the blank prompt when
    # `sampler.decoder_negative` is "blank_prompt", zeros when it is "zeros".
    "host?": {
        "tokenizer": FILE,
        "embeddings": FILE,
        "latent_queries": FILE,
        "negative_features": FILE,
    },
    "template": {
        "chat": _template("system", "text"),
        "system": TEXT,
        "generation_instruction": _template("caption"),
        "image_chat": _template("image", "question"),
        "image_pad": TEXT,
        "negative_prompt": TEXT,
    },
    "sampler": {
        **SAMPLER_SETTINGS,
        "negative_seed": _int(),
        "decoder_negative": _one_of(*DECODER_NEGATIVES),
        "presets?": PRESETS,
    },
}

# Format -> (schema, the first runtime version that reads it). Format 2: the step graphs take
# their sampler's coefficients (`runtime.jobs.samplers`) and the sampler section names the samplers.
# Format 3 (same fields): the decode graph takes its KV cache per layer (`cache_keys.{i}`,
# `cache_values.{i}`); a folder of an older format is rebuilt.
SCHEMAS = {3: (SCHEMA, "0.3.0")}
FORMAT_VERSION = max(SCHEMAS)


def check(schema: dict, data, path: str = "") -> None:
    """Validate `data` against a schema dict; raise `SchemaError` on the first mismatch."""
    if not isinstance(data, dict):
        raise SchemaError(path or "(top level)", f"is {_show(data)}; expected a JSON object")
    for key, sub in schema.items():
        optional = key.endswith("?")
        name = key.rstrip("?")
        where = f"{path}.{name}" if path else name
        if data.get(name) is None:
            if optional:
                continue
            raise SchemaError(where, "is missing")
        if isinstance(sub, dict):
            check(sub, data[name], where)
        else:
            sub(where, data[name])


def confined(folder: Path, name: str, path: str) -> Path:
    """`folder / name` if it stays inside the folder (symlinks resolved), else `SchemaError`."""
    pure = Path(name)
    if pure.is_absolute() or ".." in pure.parts or name.startswith("~") or "\x00" in name:
        raise SchemaError(path, f"is {name!r}; file names must be relative, inside the folder")
    root = folder.resolve()
    full = (root / pure).resolve()
    if full != root and root not in full.parents:
        raise SchemaError(path, f"is {name!r}, which leads outside the engine folder")
    return folder / pure


def file_fields(manifest: dict):
    """(dotted path, record) of every file record the runtime may open."""
    for key, entry in (manifest.get("host") or {}).items():
        yield f"host.{key}", entry
    for name, graph in manifest["graphs"].items():
        yield f"graphs.{name}", graph
        for i, extra in enumerate(graph.get("external_data") or []):
            yield f"graphs.{name}.external_data[{i}]", extra
        if graph.get("engine"):
            yield f"graphs.{name}.engine", graph["engine"]


def validate(manifest: dict, folder: Path) -> None:
    """The whole check of a manifest (the caller has checked the format number)."""
    schema, _ = SCHEMAS[manifest["format"]]
    check(schema, manifest)
    for name, graph in manifest["graphs"].items():
        check(GRAPH, graph, f"graphs.{name}")
        if graph["spec"]["name"] != name:
            raise SchemaError(f"graphs.{name}.spec.name", f"is {graph['spec']['name']!r}")
    for path, entry in file_fields(manifest):
        check(FILE, entry, path)
        confined(folder, entry["file"], f"{path}.file")
    _check_latent_shapes(manifest)


def _check_latent_shapes(manifest: dict) -> None:
    """The config's feature and latent grids must be the ones the graphs were exported for: the
    runtime draws its noise from the config and feeds it to the graphs."""
    cfg = manifest["config"]
    d, dec = cfg["dit"], cfg["decoder"]
    side = latent_side(dec)
    want = {
        "dit": (d["in_channels"], d["input_size"], d["input_size"], "config.dit"),
        "unet": (dec["latent_channels"], side, side, "config.decoder"),
    }
    for graph, kind in (
        ("dit_step", "dit"),
        ("dit", "dit"),
        ("unet_step", "unet"),
        ("unet", "unet"),
        ("vae_decoder", "unet"),
    ):
        entry = manifest["graphs"].get(graph)
        latents = [
            t for t in (entry or {}).get("spec", {}).get("inputs", []) if t.get("name") == "latents"
        ]
        if latents and tuple(latents[0]["shape"][1:]) != want[kind][:3]:
            raise SchemaError(
                want[kind][3],
                f"gives latents {want[kind][:3]}, but graph {graph} takes "
                f"{tuple(latents[0]['shape'][1:])}",
            )
