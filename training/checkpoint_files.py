"""The files of a checkpoint folder, checked from safetensors headers and indexes alone.

A checkpoint arrives by a multi-GB download that can be cut short, corrupted or missing a shard.
Loading such a folder fails deep inside safetensors with a traceback, after a build has already
made its output folder. Everything here reads only the 8-byte length and the JSON header of each
safetensors file (never the tensor data), so a 16 GB checkpoint is checked in milliseconds and a
build can refuse it before it writes anything. Each problem is a `CheckpointError` whose one-line
message names the file and what is wrong with it:

- a header that is not a safetensors header (bad length, bad JSON, bad entries);
- a file shorter or longer than its header says (truncated, or bytes appended);
- an index whose shards are missing, whose `weight_map` names tensors its shards lack, or whose
  `metadata.total_size` differs from the byte sizes in the shards' headers;
- a diffusers component (`unet/`, `vae/`) with no weight file under any name diffusers writes
  (plain, or the `bf16` / `fp16` variant that BLIP3-o's published decoder uses);
- a tokenizer folder with neither `tokenizer.json` nor the `vocab.json` + `merges.txt` to build it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILES = ("vocab.json", "merges.txt")  # a Qwen2 (byte-level BPE) slow tokenizer
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"
# diffusers' weight variants, in the order we take them: the plain file first (as diffusers does
# without `variant=`), then BLIP3-o's bf16, then fp16.
DIFFUSERS_VARIANTS = (None, "bf16", "fp16")
DTYPE_BYTES = {
    **{"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1},
    **{"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1},
}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


class CheckpointError(ValueError):
    """A checkpoint folder does not match the model it should hold, or its files are damaged."""


def read_json_object(path: Path) -> dict:
    """A checkpoint's JSON file (config, index, scheduler config) as a dict, or CheckpointError."""
    try:
        data = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def read_header(path: str | Path) -> dict[str, TensorInfo]:
    """Tensor key -> `TensorInfo` of one safetensors file, checked against the file's size."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path} is truncated: {size} bytes, too short for safetensors")
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if length > min(size - 8, _MAX_HEADER):
            raise CheckpointError(
                f"{path} is not a valid safetensors file: its header claims {length} bytes in a "
                f"{size}-byte file (truncated or corrupted)"
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} has a corrupted safetensors header: {err}") from err
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupted safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    tensors, spans = {}, []
    for key, entry in header.items():
        info, span = _entry(path, key, entry)
        tensors[key] = info
        spans.append(span)
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise CheckpointError(f"{path} has a corrupted safetensors header (overlapping data)")
        end = stop
    expected = 8 + length + end
    if size != expected:
        what = "is truncated" if size < expected else "has bytes past its last tensor"
        raise CheckpointError(f"{path} {what}: {size} bytes, its header describes {expected}")
    return tensors


def _entry(path: Path, key: str, entry) -> tuple[TensorInfo, tuple[int, int]]:
    ok = isinstance(entry, dict) and entry.get("dtype") in DTYPE_BYTES
    shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if ok else (None, None)
    ok = ok and isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)
    ok = ok and isinstance(offsets, list) and len(offsets) == 2
    ok = ok and all(isinstance(n, int) for n in offsets) and 0 <= offsets[0] <= offsets[1]
    nbytes = math.prod(shape) * DTYPE_BYTES[entry["dtype"]] if ok else -1
    if not ok or offsets[1] - offsets[0] != nbytes:
        raise CheckpointError(f"{path} has a corrupted safetensors header entry {key!r}: {entry}")
    return TensorInfo(path, entry["dtype"], tuple(shape), nbytes), (offsets[0], offsets[1])


def _read_index(index: Path) -> dict:
    data = read_json_object(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map (tensor key -> shard file)")
    if not all(isinstance(v, str) and "/" not in v and "\\" not in v for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map values must be file names in {index.parent}")
    return data


def read_weights(folder: Path, index_name: str = INDEX_FILE, single_name: str = SINGLE_FILE):
    """Tensor key -> `TensorInfo` over a folder's safetensors: the index's shards, or one file.

    Checks every header (see `read_header`), that no key is in two files, that each key of the
    index's `weight_map` is in the shard it names, and the index's `metadata.total_size`.
    """
    index = folder / index_name
    if index.is_file():
        data = _read_index(index)
        names = sorted(set(data["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{index} lists shard(s) missing from {folder}: {missing}")
        files = [folder / n for n in names]
    elif (folder / single_name).is_file():
        data, files = None, [folder / single_name]
    else:
        raise CheckpointError(f"{folder} has neither {index_name} nor {single_name}")
    found: dict[str, TensorInfo] = {}
    for path in files:
        for key, info in read_header(path).items():
            if key in found:
                raise CheckpointError(f"tensor {key!r} is in both {found[key].file} and {path}")
            found[key] = info
    if data is not None:
        _check_index(index, data, found)
    return found


def _check_index(index: Path, data: dict, found: dict[str, TensorInfo]) -> None:
    wrong = [k for k, f in data["weight_map"].items() if k not in found or found[k].file.name != f]
    if wrong:
        more = f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else ""
        where = [(k, data["weight_map"][k]) for k in wrong[:5]]
        raise CheckpointError(f"{index} lists tensor(s) its shards do not hold: {where}{more}")
    total = (data.get("metadata") or {}).get("total_size")
    if total is not None:
        actual = sum(info.nbytes for info in found.values())
        if total != actual:
            raise CheckpointError(
                f"{index}: metadata.total_size is {total} bytes, but the shards' headers hold "
                f"{actual} bytes of tensors (a shard is truncated, replaced or from another save)"
            )


def diffusers_weights(component: Path) -> tuple[str | None, dict[str, TensorInfo]]:
    """(variant, tensors) of a diffusers component folder such as `diffusion-decoder/unet`.

    The first of `DIFFUSERS_VARIANTS` present wins: `diffusion_pytorch_model.safetensors`, then
    `diffusion_pytorch_model.bf16.safetensors`, then `.fp16.`; sharded forms with their index
    (`diffusion_pytorch_model.safetensors.index[.bf16].json`) count too.
    """
    if not component.is_dir():
        raise CheckpointError(f"{component} does not exist (a diffusers component folder)")
    if not (component / "config.json").is_file():
        raise CheckpointError(f"{component} has no config.json")
    names = []
    for variant in DIFFUSERS_VARIANTS:
        tag = f".{variant}" if variant else ""
        single = f"{DIFFUSERS_WEIGHTS}{tag}.safetensors"
        index = f"{DIFFUSERS_WEIGHTS}.safetensors.index{tag}.json"
        names += [single, index]
        if (component / single).is_file() or (component / index).is_file():
            return variant, read_weights(component, index, single)
    raise CheckpointError(f"{component} has no weight file; expected one of: {', '.join(names)}")


def missing_tokenizer_files(folder: Path) -> list[str]:
    """[] when the folder has a tokenizer we can load, else the files it lacks."""
    if (folder / TOKENIZER_FILE).is_file():
        return []
    return [name for name in VOCAB_FILES if not (folder / name).is_file()]


def check_tokenizer_files(folder: Path) -> None:
    missing = missing_tokenizer_files(folder)
    if missing:
        raise CheckpointError(
            f"{folder} has no {TOKENIZER_FILE}, and no {' + '.join(missing)} to build it from "
            f"(a Qwen2 tokenizer is built from {' + '.join(VOCAB_FILES)})"
        )
