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
        ("graphs.dit_step.spec", {"name": "dit_step"}, "'graphs.dit_step.spec.inputs' is missing"),
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


# ---- every field the runtime reads is in the schema, typed and bounded ---------------------------
class Recorder(dict):
    """A manifest that records the path of every field read from it."""

    def __init__(self, data, path=(), reads=None):
        super().__init__(data)
        self.path, self.reads = path, reads if reads is not None else set()

    def _wrap(self, key, value):
        where = (*self.path, key)
        self.reads.add(where)
        if isinstance(value, dict):
            return Recorder(value, where, self.reads)
        if isinstance(value, list):
            return [Recorder(x, (*where, "[]"), self.reads) if isinstance(x, dict) else x
                    for x in value]  # fmt: skip
        return value

    def __getitem__(self, key):
        return self._wrap(key, dict.__getitem__(self, key))

    def get(self, key, default=None):
        self.reads.add((*self.path, key))
        return self[key] if dict.__contains__(self, key) else default

    def __contains__(self, key):
        self.reads.add((*self.path, key))
        return dict.__contains__(self, key)

    def items(self):
        return [(k, self[k]) for k in dict.keys(self)]

    def values(self):
        return [self[k] for k in dict.keys(self)]


def covered(path: tuple) -> bool:
    """A read path is covered when the schema has it, or a leaf above it checks it whole."""
    from runtime.folder.schema import SCHEMA, Table

    node = SCHEMA
    for key in path:
        if isinstance(node, Table):
            node = node.entry  # `key` is an entry's name
            continue
        if not isinstance(node, dict):
            return True  # a check of the whole value below (a graph spec, the presets)
        name = key if key in node else f"{key}?" if f"{key}?" in node else None
        if name is None:
            return False
        node = node[name]
    return True


def test_the_schema_covers_every_field_the_runtime_reads(tiny_engine_dir, monkeypatch):
    """Open a folder, generate (default and preset), answer (greedy and sampled), start a
    server's state, check TensorRT engine records and ask for rebuild hints, with a manifest
    that records its reads: every read must be a field the schema types and bounds."""
    from runtime.folder import engine_folder
    from runtime.folder.manifest import loaded_files
    from runtime.generator import Generator
    from runtime.sessions.tensorrt import check_engine_compat

    reads: set = set()
    real = engine_folder.read_manifest
    monkeypatch.setattr(engine_folder, "read_manifest", lambda p: Recorder(real(p), (), reads))
    with Generator.from_dir(tiny_engine_dir, verify="full") as gen:
        image = gen.generate("a red circle", seed=1, steps=1, decoder_steps=1)[0]
        gen.generate("a red circle", preset="fast", steps=1, decoder_steps=1)
        gen.answer(image, "What is it?", max_new_tokens=3)
        gen.answer(image, "What is it?", max_new_tokens=3, temperature=0.7, top_p=0.9, seed=2)
        manifest = gen.manifest
        list(loaded_files(manifest, "tensorrt"))
        for name in manifest["graphs"]:
            entry = {"engine": {"file": f"{name}.fp32.trt10.8.0.sm90.plan"}}
            with pytest.raises(EngineFolderError):
                check_engine_compat(entry, "10.0.0", (8, 0), manifest)
        gen.folder.rebuild_hint()
    pytest.importorskip("fastapi")
    from runtime.server.state import ServerConfig, State

    state = State(ServerConfig(engines=tiny_engine_dir, warmup=False))
    state.start()
    assert state.ready, state.failure
    state.scheduler.close()
    state.gen.close()
    assert len(reads) > 40
    missing = sorted(".".join(map(str, p)) for p in reads if not covered(p))
    assert not missing, f"read by the runtime, not in the schema: {missing}"


def _bad_dit_width(m, width):
    m["config"]["dit"]["in_channels"] = width
    m["graphs"]["dit_step"]["spec"]["dims"][0]["max"] = 1 << 20  # batch
    for t in m["graphs"]["dit_step"]["spec"]["inputs"] + m["graphs"]["dit_step"]["spec"]["outputs"]:
        if t["name"] in ("latents", "prev_velocity", "next_latents", "velocity"):
            t["shape"][1] = width


@pytest.mark.parametrize(
    ("edit", "says"),
    [
        # absurd dims that agree with each other: noise of petabytes, before
        (lambda m: _bad_dit_width(m, 2**40), "'config.dit.in_channels' is 1099511627776"),
        (lambda m: _bad_dit_width(m, 60_000), "elements at the profile's max"),
        # a field the answer job reads: a string there was a TypeError deep in the KV cache
        (lambda m: m["config"]["backbone"].update(num_layers="4"), "'config.backbone.num_layers'"),
        (lambda m: m["config"]["backbone"].update(num_layers=9), "takes 4 layers' KV cache"),
        # a tensor's high as a string was taken for a dim name (a KeyError at the first run)
        (
            lambda m: m["graphs"]["dit_step"]["spec"]["inputs"][2].update(high="1000"),
            "'graphs.dit_step.spec.inputs[2].high' is '1000'",
        ),
        (lambda m: m["template"].update(system="a \ud800 b"), "'template.system'"),
        (lambda m: m.update(checkpoint=[1]), "'checkpoint'"),
        (lambda m: m["config"]["backbone"]["vision"].update(min_pixels=10**9), "min_pixels"),
        (lambda m: m["config"]["decoder"].update(image_size=2), "under one latent pixel"),
        (lambda m: m["sampler"].update(guidance=50.0), "'sampler.guidance'"),
    ],
)
def test_absurd_or_mistyped_values_are_refused_at_open(tmp_path, manifest, edit, says):
    m = copy.deepcopy(manifest)
    edit(m)
    folder = write(tmp_path / "f", m)
    with pytest.raises(EngineFolderError) as err:
        read_manifest(folder)
    assert says in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "text",
    [
        '{"format": 3, "x": ' + "9" * 5000 + "}",  # past Python's integer digit limit
        "[" * 100_000 + "]" * 100_000,  # deeper than the parser's recursion
        '{"format": NaN}',
        b"\xff\xfe{}",
    ],
)
def test_manifest_json_the_parser_chokes_on_is_one_line(tmp_path, text):
    folder = tmp_path / "f"
    folder.mkdir()
    data = text if isinstance(text, bytes) else text.encode()
    (folder / "manifest.json").write_bytes(data)
    with pytest.raises(EngineFolderError, match="is not valid JSON") as err:
        load_manifest(folder)
    assert "\n" not in str(err.value)


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
