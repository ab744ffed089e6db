"""Fuzz the engine-folder reader beyond the manifest (hypothesis, derandomized, bounded): the
tokenizer file and the host arrays are replaced by mutated ones whose sha256 and size the
manifest records (a folder that verifies, built wrong or edited by hand), then the folder is
opened, generates and answers. Every case ends in success or one line (`UserError`,
`ResultError`), never another exception."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from runtime.errors import ResultError, UserError
from runtime.generator import Generator

pytestmark = pytest.mark.slow
FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def folder(tiny_engine_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("fuzz") / "engines"
    shutil.copytree(tiny_engine_dir, out)
    return out


@pytest.fixture(scope="module")
def pristine(folder):
    """The folder's original host files and manifest, restored after each example."""
    names = ("tokenizer.json", "embeddings.npy", "latent_queries.npy", "negative_features.npy")
    return {name: (folder / name).read_bytes() for name in (*names, "manifest.json")}


def install(folder, pristine, key: str, name: str, data: bytes) -> None:
    for original, raw in pristine.items():
        (folder / original).write_bytes(raw)
    (folder / name).write_bytes(data)
    manifest = json.loads(pristine["manifest.json"])
    manifest["host"][key].update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    (folder / "manifest.json").write_text(json.dumps(manifest))


def run(folder) -> None:
    """Open, generate, answer: success or one line."""
    try:
        with Generator.from_dir(folder, verify="full", session_options={"threads": 1}) as gen:
            image = gen.generate("a red circle", seed=0, steps=1, decoder_steps=1)[0]
            gen.answer(image, "What is it?", max_new_tokens=2)
    except (UserError, ResultError) as err:
        assert "\n" not in str(err).strip(), err


# ---- the tokenizer --------------------------------------------------------------------------
def _edit_json(doc: dict, path: list, value):
    node = doc
    for key in path[:-1]:
        node = node[key] if isinstance(node, dict) else node[int(key) % max(len(node), 1)]
    if isinstance(node, dict):
        if value is KeyError:
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    elif isinstance(node, list) and node:
        node[int(path[-1]) % len(node)] = None if value is KeyError else value


TOKENIZER_EDITS = [
    ["model", "type"],
    ["model", "vocab"],
    ["model", "merges"],
    ["added_tokens"],
    ["added_tokens", "0", "content"],
    ["added_tokens", "0", "id"],
    ["added_tokens", "1", "special"],
    ["pre_tokenizer"],
    ["decoder"],
    ["normalizer"],
    ["post_processor"],
]
VALUES = st.one_of(
    st.just(KeyError),
    st.none(),
    st.integers(-5, 10**6),
    st.text(max_size=8),
    st.lists(st.integers(0, 600), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(0, 600), max_size=3),
)


@FUZZ
@given(
    edits=st.lists(st.tuples(st.sampled_from(TOKENIZER_EDITS), VALUES), min_size=1, max_size=3),
    cut=st.one_of(st.none(), st.integers(0, 8000)),
)
def test_fuzz_the_tokenizer_file(folder, pristine, edits, cut):
    doc = json.loads(pristine["tokenizer.json"])
    for path, value in edits:
        try:
            _edit_json(doc, path, value)
        except (KeyError, TypeError, IndexError, ValueError):
            pass  # a parent an earlier edit replaced
    data = json.dumps(doc).encode()
    if cut is not None:
        data = data[:cut]
    install(folder, pristine, "tokenizer", "tokenizer.json", data)
    run(folder)


def test_a_tokenizer_without_the_template_tokens_is_one_line(folder, pristine):
    doc = json.loads(pristine["tokenizer.json"])
    doc["added_tokens"] = []
    install(folder, pristine, "tokenizer", "tokenizer.json", json.dumps(doc).encode())
    run(folder)


# ---- the host arrays ------------------------------------------------------------------------
ARRAYS = {
    "embeddings": "embeddings.npy",
    "latent_queries": "latent_queries.npy",
    "negative_features": "negative_features.npy",
}


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


@st.composite
def arrays(draw, original: np.ndarray):
    kind = draw(st.sampled_from(["shape", "dtype", "values", "bytes"]))
    if kind == "shape":
        shape = list(original.shape)
        axis = draw(st.integers(0, len(shape)))
        if axis == len(shape):
            shape = shape[:-1]  # one dim fewer
        else:
            shape[axis] = draw(st.integers(0, shape[axis] * 2 + 1))
        return npy(np.zeros(shape, np.float32))
    if kind == "dtype":
        dtype = draw(st.sampled_from(["float16", "float64", "int64", "uint8", "bool", "complex64"]))
        return npy(original.astype(dtype))
    if kind == "values":
        value = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e30, 0.0]))
        out = original.copy()
        out.reshape(-1)[: draw(st.integers(1, out.size))] = value
        return npy(out)
    raw = bytearray(npy(original))
    at = draw(st.integers(0, 200))
    raw[at : at + 4] = draw(st.binary(min_size=1, max_size=4))
    return bytes(raw)


@FUZZ
@given(data=st.data(), key=st.sampled_from(sorted(ARRAYS)))
def test_fuzz_the_host_arrays(folder, pristine, data, key):
    name = ARRAYS[key]
    original = np.load(io.BytesIO(pristine[name]))
    install(folder, pristine, key, name, data.draw(arrays(copy.deepcopy(original))))
    run(folder)


def test_the_pristine_folder_runs(folder, pristine):
    install(folder, pristine, "tokenizer", "tokenizer.json", pristine["tokenizer.json"])
    with Generator.from_dir(folder, verify="full") as gen:
        image = gen.generate("a red circle", seed=0, steps=1, decoder_steps=1)[0]
        assert isinstance(image, Image.Image)
