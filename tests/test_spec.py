"""runtime.folder.spec derivations: dynamic axes, TensorRT profiles, shapes, sample inputs,
feed checks."""

import numpy as np
import pytest

from runtime.folder.spec import (
    Dim,
    GraphSpec,
    TensorSpec,
    check_feeds,
    dynamic_axes,
    io_dtype,
    profile_sizes,
    resolve_shape,
    sample_inputs,
    spec_from_dict,
    spec_to_dict,
    trt_profile,
)

SPEC = GraphSpec(
    "toy",
    inputs=(
        TensorSpec("x", "float", ("batch", 4, "seq")),
        TensorSpec("past", "float", ("batch", "seq")),
        TensorSpec("index", "int64", ("seq",), low=0, high="seq"),
        TensorSpec("scale", "float32", (1,), low=0.0, high=2.0),
    ),
    outputs=(TensorSpec("y", "float", ("batch", "seq+1")),),
    dims=(Dim("batch", 1, 2, 4), Dim("seq", 3, 8, 16)),
)


def test_dynamic_axes_and_profiles_come_from_the_dims():
    assert dynamic_axes(SPEC) == {
        "x": {0: "batch", 2: "seq"},
        "past": {0: "batch", 1: "seq"},
        "index": {0: "seq"},
        "y": {0: "batch", 1: "seq_plus_1"},
    }
    assert trt_profile(SPEC)["x"] == ((1, 4, 3), (2, 4, 8), (4, 4, 16))
    assert trt_profile(SPEC)["scale"] == ((1,), (1,), (1,))
    assert resolve_shape(SPEC.outputs[0], profile_sizes(SPEC, "max")) == (4, 17)


def test_static_dims_are_not_dynamic_axes():
    spec = GraphSpec("s", (TensorSpec("a", "float", ("b", 3)),), (), (Dim("b", 2, 2, 2),))
    assert dynamic_axes(spec) == {} and spec.static


def test_sample_inputs_respect_dtypes_and_bounds():
    for which in ("min", "opt", "max"):
        sizes = profile_sizes(SPEC, which)
        feeds = sample_inputs(SPEC, sizes, precision="fp16", seed=1)
        assert feeds["x"].dtype == np.float16 and feeds["scale"].dtype == np.float32
        assert feeds["index"].max() <= sizes["seq"] - 1 and 0 <= feeds["scale"][0] <= 2
        check_feeds(SPEC, feeds, "fp16")


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda f: f.pop("past"), r"missing inputs \['past'\]"),
        (lambda f: f.update(extra=np.zeros(1)), r"unexpected inputs \['extra'\]"),
        (lambda f: f.update(x=f["x"].astype(np.float64)), "dtype float64, expected float32"),
        (lambda f: f.update(x=np.zeros((2, 5, 8), np.float32)), "axis 1 is 5, expected 4"),
        (lambda f: f.update(past=np.zeros((3, 8), np.float32)), "batch is 3 here but 2"),
        (lambda f: f.update(x=np.zeros((2, 4, 40), np.float32)), r"seq=40 is outside \[3, 16\]"),
        (lambda f: f.update(index=np.full(8, 99)), r"outside \[0, 7\]"),
        (lambda f: f.update(x=np.zeros((2, 4), np.float32)), "rank 2, expected 3"),
    ],
)
def test_check_feeds_errors(mutate, match):
    feeds = sample_inputs(SPEC)
    mutate(feeds)
    with pytest.raises(ValueError, match=match):
        check_feeds(SPEC, feeds)


def test_round_trip_and_declared_dims():
    assert spec_from_dict(spec_to_dict(SPEC)) == SPEC
    with pytest.raises(ValueError, match="not declared"):
        GraphSpec("bad", (TensorSpec("a", "float", ("nope",)),), ())
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Dim("d", 4, 2, 8)
    with pytest.raises(ValueError, match="unknown precision"):
        io_dtype("int4")
