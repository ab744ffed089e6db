"""What made an image: the prompt, the seed, the sampler settings and the engine folder.

Every image the runtime writes carries this, so any image can be made again: the CLI prints the
seed on its output line and writes all of it into the PNG's text chunks (`image_info`,
`save_image`); the server returns the seed beside each image. `params_of_info` reads a PNG's
chunks back into the `GeneratorParams` that reproduce it.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, PngImagePlugin

from runtime.params import GeneratorParams, settings_of

SOFTWARE = "blip3o-edge"


def image_info(job) -> dict[str, str]:
    """A finished (or started) generation job's provenance, as text: `prompt`, every resolved
    `GeneratorParams` field that is set, the engine folder (`engines`: path, `variant`,
    `precision`) and `Software`."""
    from runtime import __version__

    folder = job.gen.folder
    info = {"prompt": job.prompt}
    for name in settings_of(GeneratorParams):
        value = getattr(job.params, name)
        if value is not None:
            info[name] = str(value)
    info |= {
        "engines": str(folder.path),
        "variant": folder.variant,
        "precision": folder.precision,
        "Software": f"{SOFTWARE} {__version__}",
    }
    return info


def save_image(image: Image.Image, path: str | Path, info: dict[str, str]) -> None:
    """Write `image`; a PNG gets `info` as its text chunks (other formats have none to carry)."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        chunks = PngImagePlugin.PngInfo()
        for key, value in info.items():
            chunks.add_itxt(key, value)  # iTXt: UTF-8, any prompt
        image.save(path, pnginfo=chunks)
    else:
        image.save(path)


def params_of_info(info: dict[str, str]) -> GeneratorParams:
    """The `GeneratorParams` recorded in a PNG's text chunks (`Image.open(p).text`)."""
    kinds = {name: GeneratorParams.__dataclass_fields__[name].metadata["kind"] for name in
             settings_of(GeneratorParams)}  # fmt: skip
    return GeneratorParams(**{k: kinds[k](v) for k, v in info.items() if k in kinds})
