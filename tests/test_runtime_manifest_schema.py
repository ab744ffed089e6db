"""The typed manifest reader: every field the runtime reads is checked at open, file names stay
inside the folder, templates cannot reach attributes, future formats say which runtime reads them.
A fuzz test mutates a real manifest and asserts: a one-line EngineFolderError, or success."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.folder.manifest import EngineFolderError, load_manifest, read_manifest
from runtime.folder.schema import SCHEMA


@pytest.fixture(scope="module")
def manifest(tiny_engine_dir):
    return json.loads((tiny_engine_dir / "manifest.json").read_text())


def write(folder, manifest):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def mutated(manifest, path, value):
    m = copy.deepcopy(manifest)
    *parents, last = path.split(".")
    node = m
    for key in parents:
        node = node[key]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return m


def test_the_built_manifest_reads(tiny_engine_dir):
    m = read_manifest(tiny_engine_dir)
    assert m["format"] == 3 and m["min_runtime"] == "0.3.0"


@pytest.mark.parametrize(
    ("path", "value", "says"),
    [
        ("sampler.steps", KeyError, "'sampler.steps' is missing"),
        ("sampler.steps", "30", "'sampler.steps' is '30'"),
        ("sampler.guidance", 1e38, "'sampler.guidance'"),
        ("config.dit.in_channels", -1, "'config.dit.in_channels' is -1"),
        ("config.backbone.vision", [], "'config.backbone.vision'"),
        ("precision", "fp4", "one of fp32"),
        ("template.chat", "{text.__class__}{system}", "'template.chat'"),
        ("template.generation_instruction", "{0}", "exactly {caption}"),
        ("host.tokenizer.file", "../../../etc/passwd", "inside the folder"),
        ("host.tokenizer.file", "/etc/passwd", "inside the folder"),
        ("graphs.prefill.file", "/etc/passwd", "'graphs.prefill.file'"),
        ("host.embeddings.sha256", "abc", "sha256"),
        ("graphs.dit_step.spec", {"name": "dit_step"}, "graph spec"),
        ("config", "tiny", "'config' is 'tiny'"),
    ],
)
def test_bad_fields_are_named(tmp_path, manifest, path, value, says):
    folder = write(tmp_path / "f", mutated(manifest, path, value))
    with pytest.raises(EngineFolderError) as err:
        read_manifest(folder)
    message = str(err.value)
    assert says in message and "rebuild with: python export/build_engines.py" in message
    assert "\n" not in message


def test_a_symlink_out_of_the_folder_is_refused(tmp_path, manifest):
    folder = write(tmp_path / "f", mutated(manifest, "host.tokenizer.file", "tok.json"))
    os.symlink("/etc/passwd", folder / "tok.json")
    with pytest.raises(EngineFolderError, match="leads outside the engine folder"):
        read_manifest(folder)


def test_future_and_past_formats(tmp_path, manifest):
    newer = write(tmp_path / "new", {**manifest, "format": 7, "min_runtime": "0.9.0"})
    with pytest.raises(EngineFolderError, match=r"format 7 is newer.*blip3o-edge 0\.9\.0 or newer"):
        load_manifest(newer)
    older = write(tmp_path / "old", {**manifest, "format": 0})
    with pytest.raises(EngineFolderError, match="rebuild with"):
        load_manifest(older)


def test_a_file_is_not_a_missing_folder(tmp_path):
    (tmp_path / "x").write_text("{}")
    with pytest.raises(EngineFolderError, match="is a file, not an engine folder"):
        load_manifest(tmp_path / "x")
    with pytest.raises(EngineFolderError, match="does not exist"):
        load_manifest(tmp_path / "nope")


def test_from_dir_never_opens_a_file_outside(tmp_path, tiny_engine_dir, manifest):
    """The security case end to end: the Generator refuses before reading the file."""
    from runtime.generator import Generator

    folder = tmp_path / "copy"
    shutil.copytree(tiny_engine_dir, folder)
    bad = mutated(manifest, "host.tokenizer.file", "/etc/passwd")
    write(folder, bad)
    for verify in ("full", "fast", "none"):
        with pytest.raises(EngineFolderError, match="inside the folder"):
            Generator.from_dir(folder, verify=verify)


def _leaves(schema, prefix=""):
    for key, sub in schema.items():
        path = f"{prefix}.{key.rstrip('?')}" if prefix else key.rstrip("?")
        yield path
        if isinstance(sub, dict):
            yield from _leaves(sub, path)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.sampled_from(["../x", "/etc/passwd", "{text.__class__}", "fp8", "a" * 64]),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(
                sorted(set(_leaves(SCHEMA)))
                + ["graphs.prefill.file", "graphs.vision.spec", "graphs.decode.external_data"]
            ),
            JSON | st.just(KeyError),
        ),
        min_size=1,
        max_size=3,
    )
)
def test_fuzz_the_reader(tmp_path_factory, manifest, edits):
    m = manifest
    for path, value in edits:
        try:
            m = mutated(m, path, value)
        except (KeyError, TypeError, IndexError):
            continue  # a parent was replaced by an earlier edit
    folder = write(tmp_path_factory.mktemp("fuzz"), m)
    try:
        read_manifest(folder)
    except EngineFolderError as err:
        assert "\n" not in str(err).strip()
