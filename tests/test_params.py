"""`runtime.GeneratorParams`: one validated value for the Python API, the CLI and the C++ header."""

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

from runtime.cli import build_parser, main
from runtime.errors import UserError
from runtime.params import AnswerParams, GeneratorParams, from_arguments, settings_of

SAMPLER = {
    "sampler": "euler",
    "steps": 30,
    "guidance": 3.0,
    "decoder_sampler": "euler",
    "decoder_steps": 50,
    "decoder_guidance": 2.5,
    "presets": {"fast": {"steps": 15, "decoder_sampler": "dpmpp_2m", "decoder_steps": 20}},
}
FIELDS = [f.name for f in dataclasses.fields(GeneratorParams)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(steps=0), r"^steps must be in \[1, 1000\], got 0$"),
        (dict(decoder_steps=1001), r"^decoder_steps must be in \[1, 1000\], got 1001$"),
        (dict(guidance=float("nan")), r"^guidance must be a finite number in \[0, 10\], got nan$"),
        (dict(decoder_guidance=-1), r"decoder_guidance .* \[0, 10\], got -1.0$"),
        (dict(seed=-1), r"^seed must be in \[0, 9223372036854775807\], got -1$"),
        (dict(seed=True), r"^seed must be an integer, got True \(bool\)$"),
        (dict(num_images=0), r"^num_images must be in \[1, 1024\], got 0$"),
        (dict(steps="30"), r"^steps must be an integer, got '30' \(str\)$"),
        (
            dict(decoder_sampler="ddim"),
            r"^decoder_sampler must be one of euler, dpmpp_2m, got 'ddim'$",
        ),
        (dict(sampler="dpmpp_2m"), r"^sampler must be one of euler, heun, lms, got 'dpmpp_2m'$"),
        (dict(preset=3), r"^preset must be a str, got int$"),
    ],
)
def test_a_bad_value_is_one_line_naming_it_and_the_range(kwargs, match):
    with pytest.raises(UserError, match=match):
        GeneratorParams(**kwargs)


def test_values_are_normalized_and_unset_ones_resolve_from_the_manifest():
    p = GeneratorParams(seed=np.int64(3), steps=np.int32(7), guidance=np.float32(1.5))
    assert (type(p.seed), type(p.steps), type(p.guidance)) == (int, int, float)
    assert not p.is_resolved
    r = p.resolved(SAMPLER, max_images=4)
    assert r.is_resolved and (r.steps, r.guidance) == (7, 1.5)
    assert (r.decoder_steps, r.decoder_guidance) == (50, 2.5)
    with pytest.raises(UserError, match=r"num_images must be in \[1, 4\], got 5"):
        GeneratorParams(num_images=5).resolved(SAMPLER, max_images=4)


def test_a_preset_fills_what_is_unset_and_set_fields_win():
    r = GeneratorParams(preset="fast", decoder_steps=12).resolved(SAMPLER, max_images=1)
    assert (r.sampler, r.steps, r.guidance) == ("euler", 15, 3.0)
    assert (r.decoder_sampler, r.decoder_steps) == ("dpmpp_2m", 12)
    plain = GeneratorParams().resolved(SAMPLER, max_images=1)
    assert (plain.steps, plain.decoder_sampler, plain.decoder_steps) == (30, "euler", 50)
    with pytest.raises(UserError, match=r"^preset must be one of fast, got 'turbo'$"):
        GeneratorParams(preset="turbo").resolved(SAMPLER, max_images=1)


def test_keywords_build_the_same_params_in_one_place():
    base = GeneratorParams(seed=2, steps=5)
    assert GeneratorParams.of(base, guidance=1.0) == GeneratorParams(seed=2, steps=5, guidance=1.0)
    assert GeneratorParams.of(seed=2, steps=5) == base
    unknown = r"unknown GeneratorParams setting\(s\) \['step'\]; valid: seed"
    with pytest.raises(UserError, match=unknown):
        GeneratorParams.of(step=5)
    with pytest.raises(UserError, match="steps must be in"):
        GeneratorParams.of(base, steps=0)
    with pytest.raises(TypeError, match="params must be a GeneratorParams, got dict"):
        GeneratorParams.of({"seed": 1})


def test_the_cli_options_are_the_fields():
    parser = build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    options = {a.dest for a in generate._actions if a.option_strings}
    assert set(FIELDS) <= options
    args = parser.parse_args(["generate", "x", "--decoder-steps", "4", "--num-images", "2"])
    assert from_arguments(args) == GeneratorParams(decoder_steps=4, num_images=2)


def test_the_cli_refuses_a_bad_value_before_opening_anything(tmp_path, capsys):
    code = main(["generate", "x", "--engines", str(tmp_path / "none"), "--steps", "0", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err == "error: steps must be in [1, 1000], got 0\n"


@pytest.mark.parametrize("cls", [GeneratorParams, AnswerParams])
def test_the_cpp_header_has_the_same_fields(cls):
    header = (Path(__file__).resolve().parents[1] / "runtime/cpp/blip3o.hpp").read_text()
    fields = list(settings_of(cls))
    body = re.search(rf"struct {cls.__name__} \{{(.*?)\}};", header, re.S).group(1)
    names = re.findall(r"^\s*[\w:<>]+\s+(\w+)(?:\s*=[^;]*)?;", body, re.M)
    assert names == fields
    # and each is passed on by name
    call = re.search(rf'attr\("{cls.__name__}"\)\((.*?)\);', header, re.S).group(1)
    assert re.findall(r'"(\w+)"_a', call) == fields


def test_params_and_keywords_give_the_same_image(tiny_engine_dir):
    from runtime import Generator

    with Generator.from_dir(tiny_engine_dir) as gen:
        a = gen.generate("a red circle", GeneratorParams(seed=4, steps=2, decoder_steps=2))
        b = gen.generate("a red circle", seed=4, steps=2, decoder_steps=2)
        c = gen.generate("a red circle", seed=5, steps=2, decoder_steps=2)
        assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
        assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
        job = gen.start("a red circle", seed=4, steps=2, decoder_steps=2)
        assert job.params == gen.params(GeneratorParams(seed=4, steps=2, decoder_steps=2))
        assert job.params.decoder_guidance == gen.manifest["sampler"]["decoder_guidance"]
