"""The schema of `manifest.json`, by format version: every field the runtime reads, checked once.

An engine folder travels (copied onto devices, edited by hand, built by another version), so the
runtime validates its manifest when it opens it instead of failing deep inside a run with a
`KeyError`. A refusal names the field (as a dotted path), the value found, what is allowed and
the fix. File names are confined to the folder: an absolute path, a `..` component or a symlink
that leads outside is refused, so a manifest cannot make the runtime read `/etc/passwd`. Prompt
templates may use only their own placeholders (no attribute or index access, which `str.format`
would otherwise evaluate). A manifest of a newer format says which runtime version reads it.

A schema is plain data: a dict maps field names to nested schemas, to tables (`Table`: a dict
of any names, each entry one schema) or to checks (`Check`, `SPEC`: a leaf that checks the whole
value below it); a field whose name ends in `?` may be absent or null. Every number has a sane
range, not only a type: a manifest is a file a person can edit, and the runtime allocates noise,
KV caches and buffers from its dims, so absurd ones are refused here (each tensor of a graph
spec is at most `MAX_TENSOR_ELEMENTS` at the top of its profile) instead of ending in a
`MemoryError`. Every text is valid Unicode and bounded. `tests/test_runtime_manifest_schema.py`
records every field the runtime reads while it opens a folder, generates and answers, and fails
when one of them is not covered here.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtime.folder.graphs import MAX_GUIDANCE, cache_names, latent_side
from runtime.folder.spec import PRECISIONS, spec_from_dict
from runtime.jobs.samplers import DECODER_SAMPLERS, FLOW_SAMPLERS
from runtime.jobs.schedule import BETA_SCHEDULES, TIMESTEP_SPACINGS
from runtime.params import MAX_STEPS

# The decoder's CFG negative (`sampler.decoder_negative`): "blank_prompt" (BLIP3-o 4b/8b as
# published: the DiT's features of the blank prompt) or "zeros" (the dropped condition of a
# decoder trained with zeroed conditions, like tiny's). Either way the folder holds the features.
DECODER_NEGATIVES = ("blank_prompt", "zeros")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CAPABILITY = re.compile(r"^\d+\.\d+$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,127}$")
_DIM_EXPR = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:\+(\d{1,7}))?$")
# Sane ranges: several times the largest real value (8b's), far below what would exhaust memory.
MAX_DIM = 1 << 24  # a fixed size or a profile's max (8b: vocab 151,668)
MAX_TENSOR_ELEMENTS = 1 << 30  # one graph tensor at the top of its profile (8b: ~2.4e8)
MAX_TEXT = 100_000  # characters of one template or name
MAX_TOKEN_ID = 1 << 24
DTYPES = ("float", "float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool")


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
    return Check(
        f"one of {', '.join(map(str, values))}",
        lambda v: isinstance(v, (str, int)) and not isinstance(v, bool) and v in values,
    )


def is_text(value, max_chars: int = MAX_TEXT) -> bool:
    """A str of at most `max_chars` characters that is valid Unicode (no lone surrogate, which
    JSON's `\\ud800` escapes can carry and no tokenizer takes) and holds no NUL."""
    if not isinstance(value, str) or len(value) > max_chars or "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _str(pattern: re.Pattern | None = None, describe: str = "a string") -> Check:
    return Check(
        describe + f" (valid Unicode, at most {MAX_TEXT} characters)",
        lambda v: is_text(v) and (not pattern or pattern.match(v)),
    )


def _list(item: Check, min_len: int = 1) -> Check:
    return Check(
        f"a list of at least {min_len} of: {item.describe}",
        lambda v: isinstance(v, list) and len(v) >= min_len and all(item.ok(x) for x in v),
    )


def _template(*fields: str) -> Check:
    """A `str.format` template whose placeholders are exactly `fields`, each used plainly."""

    def ok(value) -> bool:
        if not is_text(value):
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


@dataclass(frozen=True)
class Table:
    """A dict of any names (a graph table), each value checked against `entry`."""

    describe: str
    entry: dict

    def __call__(self, path: str, value) -> None:
        if not isinstance(value, dict) or not value:
            raise SchemaError(path, f"is {_show(value)}; expected {self.describe}")
        for name, item in value.items():
            if not isinstance(name, str) or not _NAME.match(name):
                raise SchemaError(path, f"has the name {_show(name)}; expected a plain name")
            check(self.entry, item, f"{path}.{name}")


class SpecCheck:
    """A graph spec, checked field by field (so a refusal names e.g.
    `graphs.vision.spec.inputs[4].high`): plain names, known dtypes, dims with
    0 <= min <= opt <= max <= MAX_DIM, shapes of fixed sizes or declared dims (`name+K`), value
    bounds that are finite numbers or (`high`) a declared dim's name, and every tensor at most
    MAX_TENSOR_ELEMENTS at the top of its profile."""

    describe = "a graph spec (name, inputs, outputs, dims)"

    def __call__(self, path: str, spec) -> None:
        if not isinstance(spec, dict):
            raise SchemaError(path, f"is {_show(spec)}; expected {self.describe}")
        for key in ("name", "inputs", "outputs", "dims"):
            if key not in spec:
                raise SchemaError(f"{path}.{key}", "is missing")
        if not (isinstance(spec["name"], str) and _NAME.match(spec["name"])):
            raise SchemaError(f"{path}.name", f"is {_show(spec['name'])}; expected a plain name")
        dims = self._dims(f"{path}.dims", spec["dims"])
        names: set[str] = set()
        for side in ("inputs", "outputs"):
            tensors = spec[side]
            if not isinstance(tensors, list) or not tensors or len(tensors) > 4096:
                raise SchemaError(f"{path}.{side}", f"is {_show(tensors)}; expected a list")
            for i, tensor in enumerate(tensors):
                where = f"{path}.{side}[{i}]"
                name = self._tensor(where, tensor, dims)
                if name in names:
                    raise SchemaError(f"{where}.name", f"is {name!r}, a second time")
                names.add(name)
        try:
            spec_from_dict(spec)
        except (TypeError, ValueError, KeyError) as err:
            raise SchemaError(path, f"is not {self.describe}: {err}") from None

    @staticmethod
    def _dims(path: str, dims) -> dict[str, int]:
        if not isinstance(dims, list) or len(dims) > 64:
            raise SchemaError(path, f"is {_show(dims)}; expected a list of dims")
        out: dict[str, int] = {}
        for i, d in enumerate(dims):
            where = f"{path}[{i}]"
            if not isinstance(d, dict) or set(d) != {"name", "min", "opt", "max"}:
                raise SchemaError(where, f"is {_show(d)}; expected {{name, min, opt, max}}")
            plain = isinstance(d["name"], str) and bool(_DIM_EXPR.match(d["name"]))
            if not plain or "+" in d["name"] or d["name"] in out:
                raise SchemaError(f"{where}.name", f"is {_show(d['name'])}; expected a new name")
            sizes = [d[k] for k in ("min", "opt", "max")]
            if not all(type(x) is int and 0 <= x <= MAX_DIM for x in sizes) or sizes != sorted(
                sizes
            ):
                raise SchemaError(
                    where, f"is {_show(d)}; expected integers 0 <= min <= opt <= max <= {MAX_DIM}"
                )
            out[d["name"]] = d["max"]
        return out

    @staticmethod
    def _tensor(path: str, t, dims: dict[str, int]) -> str:
        if not isinstance(t, dict) or not {"name", "dtype", "shape"} <= set(t) <= {
            "name", "dtype", "shape", "low", "high"
        }:  # fmt: skip
            raise SchemaError(path, f"is {_show(t)}; expected {{name, dtype, shape, low?, high?}}")
        if not (isinstance(t["name"], str) and _NAME.match(t["name"])):
            raise SchemaError(f"{path}.name", f"is {_show(t['name'])}; expected a plain name")
        if t["dtype"] not in DTYPES or not isinstance(t["dtype"], str):
            raise SchemaError(f"{path}.dtype", f"is {_show(t['dtype'])}; expected one of {DTYPES}")
        shape = t["shape"]
        if not isinstance(shape, list) or len(shape) > 8:
            raise SchemaError(f"{path}.shape", f"is {_show(shape)}; expected a list of <= 8 dims")
        elements = 1
        for axis, d in enumerate(shape):
            if type(d) is int and 0 <= d <= MAX_DIM:
                elements *= d
                continue
            match = _DIM_EXPR.match(d) if isinstance(d, str) else None
            if match is None or match.group(1) not in dims:
                raise SchemaError(
                    f"{path}.shape[{axis}]",
                    f"is {_show(d)}; expected a size in [0, {MAX_DIM}] or a declared dim "
                    f"({', '.join(dims) or 'none'})",
                )
            elements *= dims[match.group(1)] + int(match.group(2) or 0)
        if elements > MAX_TENSOR_ELEMENTS:
            raise SchemaError(
                f"{path}.shape",
                f"is {_show(shape)}: {elements} elements at the profile's max; at most "
                f"{MAX_TENSOR_ELEMENTS} are accepted",
            )
        for key in ("low", "high"):
            v = t.get(key)
            if v is None or (type(v) in (int, float) and math.isfinite(v)):
                continue
            if key == "high" and isinstance(v, str) and v in dims:
                continue  # an index into that dim
            raise SchemaError(
                f"{path}.{key}",
                f"is {_show(v)}; expected a finite number"
                + (f" or a declared dim ({', '.join(dims)})" if key == "high" else ""),
            )
        return t["name"]


SPEC = SpecCheck()
SHA256 = _str(_SHA256, "a sha256 (64 lower-case hex digits)")
POSITIVE = _int(1)
FILE_NAME = Check(
    "a file name inside the engine folder (valid Unicode, at most 4096 characters)",
    lambda v: is_text(v, 4096) and bool(v),
)
# a file's external data (an ONNX graph's weights): each entry a FILE, checked by `validate`
EXTERNAL = Check(
    "a list of {file, sha256, size}",
    lambda v: isinstance(v, list) and len(v) <= 4096 and all(isinstance(x, dict) for x in v),
)
# size in bytes: fast verify
FILE = {"file": FILE_NAME, "sha256": SHA256, "size": _int(), "external_data?": EXTERNAL}
TEXT = _str()

GRAPH = {
    "file": FILE_NAME,
    "sha256": SHA256,
    "size": _int(),
    "spec": SPEC,
    "external_data?": EXTERNAL,
    "engine?": FILE,
}

# The generation settings a `sampler` section, and each of its named presets, gives (the
# ranges `runtime.params.GeneratorParams` accepts).
SAMPLER_SETTINGS = {
    "sampler": _one_of(*FLOW_SAMPLERS),
    "steps": _int(1, MAX_STEPS),
    "guidance": _number(0.0, MAX_GUIDANCE),
    "decoder_sampler": _one_of(*DECODER_SAMPLERS),
    "decoder_steps": _int(1, MAX_STEPS),
    "decoder_guidance": _number(0.0, MAX_GUIDANCE),
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

TOKEN_ID = _int(0, MAX_TOKEN_ID)
VERSION = _str(re.compile(r"^\d+(\.\d+){0,3}$"), "a version like 0.3.0")

SCHEMA = {
    "format": _int(1),
    "min_runtime?": VERSION,
    "variant": _str(re.compile(r"^[A-Za-z0-9_.-]{1,64}$"), "a variant name (letters, digits, ._-)"),
    "precision": _one_of(*PRECISIONS),
    "backend?": _one_of("onnxruntime", "tensorrt"),
    "tensorrt?": _str(re.compile(r"^\d+(\.\d+)*$"), "a TensorRT version like 10.8.0"),
    "compute_capability?": _str(_CAPABILITY, "a compute capability like 9.0"),
    # read by the rebuild hint of every refusal: where the folder was built from
    "checkpoint?": {"hash?": TEXT, "path?": TEXT},
    "config": {
        "backbone": {
            "eos_token_id": TOKEN_ID,
            "image_token_id": TOKEN_ID,
            "img_token_id": TOKEN_ID,
            "vision_start_token_id": TOKEN_ID,
            "num_layers": _int(1, 512),  # the answer job's KV cache: one per layer
            "vision": {
                "patch_size": _int(1, 256),
                "temporal_patch_size": _int(1, 64),
                "spatial_merge_size": _int(1, 64),
                "window_size": _int(1, 1 << 16),
                "min_pixels": _int(1, 1 << 28),
                "max_pixels": _int(1, 1 << 28),
            },
        },
        "dit": {"in_channels": _int(1, 1 << 16), "input_size": _int(1, 1024)},
        "decoder": {
            "image_size": _int(1, 1 << 14),
            "latent_channels": _int(1, 1024),
            "vae_block_out_channels": Check(
                "a list of 1 to 8 channel counts in [1, 65536]",
                lambda v: (
                    isinstance(v, list)
                    and 1 <= len(v) <= 8
                    and all(type(x) is int and 1 <= x <= 1 << 16 for x in v)
                ),
            ),
            "num_train_timesteps": _int(1, 100_000),
            "beta_start": _number(0.0, 1.0),
            "beta_end": _number(0.0, 1.0),
            "beta_schedule": _one_of(*BETA_SCHEDULES),
            "timestep_spacing": _one_of(*TIMESTEP_SPACINGS),
            "steps_offset": _int(0, 1000),
        },
    },
    "graphs": Table("a table of graphs", GRAPH),
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
        # the words the model was trained on (a closed world such as tiny's shapes); absent: any
        "vocabulary?": _list(_str(re.compile(r"^[a-z]{1,40}$"), "a lowercase word")),
    },
    "sampler": {
        **SAMPLER_SETTINGS,
        "negative_seed": _int(0, 2**63 - 1),
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
        optional = key.endswith("?")  # absent or null
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
    records = [(f"host.{key}", entry) for key, entry in (manifest.get("host") or {}).items()]
    for name, graph in manifest["graphs"].items():
        records.append((f"graphs.{name}", graph))
        if graph.get("engine"):
            records.append((f"graphs.{name}.engine", graph["engine"]))
    for path, entry in records:
        yield path, entry
        for i, extra in enumerate(entry.get("external_data") or []):
            yield f"{path}.external_data[{i}]", extra


def validate(manifest: dict, folder: Path) -> None:
    """The whole check of a manifest (the caller has checked the format number)."""
    schema, _ = SCHEMAS[manifest["format"]]
    check(schema, manifest)
    for name, graph in manifest["graphs"].items():
        if graph["spec"]["name"] != name:
            raise SchemaError(f"graphs.{name}.spec.name", f"is {graph['spec']['name']!r}")
    for path, entry in file_fields(manifest):
        check(FILE, entry, path)
        confined(folder, entry["file"], f"{path}.file")
    _check_agreements(manifest)
    _check_latent_shapes(manifest)


def _check_agreements(manifest: dict) -> None:
    """Fields that must agree with each other or with the graphs."""
    cfg = manifest["config"]
    vision = cfg["backbone"]["vision"]
    if vision["min_pixels"] > vision["max_pixels"]:
        raise SchemaError(
            "config.backbone.vision.min_pixels",
            f"is {vision['min_pixels']}, over max_pixels {vision['max_pixels']}",
        )
    if latent_side(cfg["decoder"]) < 1:
        raise SchemaError(
            "config.decoder.image_size",
            f"is {cfg['decoder']['image_size']}, under one latent pixel for "
            f"{len(cfg['decoder']['vae_block_out_channels'])} VAE blocks",
        )
    decode = manifest["graphs"].get("decode")
    if decode is not None:
        layers = cfg["backbone"]["num_layers"]
        inputs = {t["name"] for t in decode["spec"]["inputs"]}
        want = {name for pair in cache_names(layers) for name in pair}
        have = {name for name in inputs if name.startswith(("cache_keys.", "cache_values."))}
        if want != have:
            raise SchemaError(
                "config.backbone.num_layers",
                f"is {layers}, but graph decode takes {len(have) // 2} layers' KV cache",
            )


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
