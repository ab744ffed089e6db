"""Torch-free BLIP3-o runtime: sampling loops over ONNX Runtime / TensorRT sessions.

    import runtime
    with runtime.Generator.from_dir("engines/tiny-fp32") as gen:
        image = gen.generate("a red circle")[0]

Importing this package (and running a generation) never imports torch, transformers or diffusers;
`Generator` is loaded on first access, so `import runtime` stays cheap for the CLI.
"""

from __future__ import annotations

from importlib import metadata

__all__ = ["AnswerParams", "Generator", "GeneratorParams", "__version__"]

try:
    __version__ = metadata.version("blip3o-edge")
except metadata.PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str):
    if name == "Generator":
        from runtime.generator import Generator

        return Generator
    if name == "GeneratorParams":
        from runtime.params import GeneratorParams

        return GeneratorParams
    if name == "AnswerParams":
        from runtime.params import AnswerParams

        return AnswerParams
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
