"""Where a build's PyTorch weights come from: checked up front, loaded one component at a time.

A 4b pipeline loaded whole in fp32 holds ~31 GB (8b: ~50 GB) for the entire build, though each
stage reads one component: the vision tower for `vision`, the text decoder for `prefill` and
`decode`, the DiT for `dit`/`dit_step`, the UNet, the VAE. `ModelSource.load(component)` reads
only that component's tensors from the checkpoint (the rest of the model stays on `meta`) in the
stage's dtype (the ONNX's: fp16/bf16 for 16-bit folders, fp32 for fp32 folders and for the fp32
exports INT8/FP8 folders quantize), keeps it while the next stage asks for the same one (prefill
then decode, dit then dit_step) and frees it when another is asked for. Calibration runs the
runtime's generation jobs stage by stage (text decoder, then DiT, then UNet, then VAE), one
component at a time, in fp32 on the build's device.

Everything that can be checked without reading a tensor is checked when the source is made, so
a bad checkpoint stops the build before it creates its output folder: config.json, every
safetensors header and file size, the index, the key set and shapes, the decoder's weight files
and scheduler config, the tokenizer files. `--random-weights` (latency work) builds the whole
seeded pipeline once instead.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
from dataclasses import dataclass
from pathlib import Path

from export.components import COMPONENTS, GRAPH_COMPONENT
from export.errors import BuildError
from export.precision import torch_dtype
from training.config import from_preset, reduced_depth

log = logging.getLogger(__name__)

TINY_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny"


@dataclass
class Parts:
    """Loaded pieces of a pipeline; those a component does not need are on `meta` (or None)."""

    config: object
    model: object
    decoder: object
    tokenizer: object


def calibration_device(requested: str = "auto") -> str:
    """The device calibration runs on: `auto` is cuda when torch sees a GPU, else cpu."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise BuildError("--device cuda: torch sees no CUDA GPU; use cpu or auto")
    return requested


class ModelSource:
    """The weights of one build request: a checked checkpoint, or seeded random weights."""

    def __init__(self, request, precision: str) -> None:
        self.request = request
        self.precision = precision
        self._loaded: tuple[tuple, Parts] | None = None
        self._random = None
        ckpt = request.checkpoint
        if (
            ckpt is None
            and not request.random_weights
            and request.variant == "tiny"
            and (TINY_CHECKPOINT / "config.json").exists()
        ):
            ckpt = TINY_CHECKPOINT
        self.checkpoint = ckpt
        if ckpt is not None:
            self.config = self._checked_config(ckpt)
            from training.checkpoint import checkpoint_hash

            self.hash = checkpoint_hash(ckpt)
            self.label = f"checkpoint {ckpt}"
        else:
            cfg = from_preset(request.variant)
            self.config = cfg if request.layers is None else reduced_depth(cfg, request.layers)
            self.hash = f"random-weights-seed-{request.seed}"
            self.label = f"RANDOM weights (seed {request.seed}): not a trained model"
        mode = getattr(request, "decoder_negative", None)
        if mode is not None:  # the build's choice over the checkpoint config's
            s = dataclasses.replace(self.config.sampler, decoder_negative=mode)
            self.config = dataclasses.replace(self.config, sampler=s)

    def _checked_config(self, ckpt: Path):
        from training.checkpoint import DECODER_DIR, verify_checkpoint
        from training.checkpoint_config import read_config
        from training.decoder_folder import settle_scheduler

        request = self.request
        try:
            cfg = read_config(ckpt, layers=request.layers)
            if cfg.variant != request.variant:
                raise ValueError(
                    f"checkpoint {ckpt} is a {cfg.variant} checkpoint, not {request.variant}"
                )
            cfg = settle_scheduler(ckpt / DECODER_DIR, cfg, request.decoder_scheduler)
            verify_checkpoint(ckpt, cfg)
        except ValueError as err:  # CheckpointError and config errors: the user's to fix
            raise BuildError(str(err)) from err
        return cfg

    def load(self, component: str, *, dtype: str = "fp32", device: str = "cpu") -> Parts:
        """`component` (a key of `COMPONENTS`) loaded in `dtype` (fp32|fp16|bf16) on `device`."""
        if component not in COMPONENTS:
            raise ValueError(f"unknown component {component!r}; valid: {', '.join(COMPONENTS)}")
        key = (component, dtype, str(device))
        if self._loaded is not None and self._loaded[0] == key:
            return self._loaded[1]
        self.release()
        weights = torch_dtype(dtype)
        if self.checkpoint is None:
            parts = self._random_parts(weights, device)
        else:
            log.info("loading %s (%s, %s) from %s", component, dtype, device, self.checkpoint)
            try:
                parts = self._checkpoint_parts(component, weights, device)
            except ValueError as err:
                raise BuildError(str(err)) from err
        self._loaded = (key, parts)
        return parts

    def for_graph(self, graph: str, dtype: str) -> Parts:
        return self.load(GRAPH_COMPONENT[graph], dtype=dtype)

    def prepare(self, component: str) -> None:
        """Free the loaded component unless it is `component` (call before the stages that
        need it, so the next load never overlaps the previous one)."""
        if self._loaded is not None and self._loaded[0][0] != component:
            self.release()

    def release(self) -> None:
        """Drop the loaded component (its memory is freed once no stage holds it)."""
        self._loaded = None
        gc.collect()

    def _checkpoint_parts(self, component: str, dtype, device) -> Parts:
        from training.checkpoint import DECODER_DIR, load_checked_tokenizer, load_model
        from training.decoder_folder import load_decoder

        prefixes, decoder_parts, tokenizer = COMPONENTS[component]
        folder, cfg = self.checkpoint, self.config
        model = decoder = None
        if prefixes:
            model = load_model(folder, dtype=dtype, device=device, config=cfg, parts=prefixes)
        if decoder_parts:
            decoder = load_decoder(
                cfg.decoder, folder / DECODER_DIR, parts=decoder_parts, dtype=dtype, device=device
            )
        tok = load_checked_tokenizer(folder, cfg) if tokenizer else None
        return Parts(cfg, model, decoder, tok)

    def _random_parts(self, dtype, device) -> Parts:
        import torch

        # cast from fp32 only (fp16 -> bf16 would round twice): rebuild for another 16-bit dtype
        if self._random is None or self._random[0] not in (torch.float32, dtype):
            from training.random_weights import random_pipeline

            self._random = None
            gc.collect()
            log.info("building the PyTorch model (%s)", self.label)
            self._random = (torch.float32, random_pipeline(self.config, self.request.seed))
        pipe = self._random[1]
        pipe.model.to(dtype=dtype, device=device)
        pipe.decoder.to(dtype=dtype, device=device)
        self._random = (dtype, pipe)
        return Parts(self.config, pipe.model, pipe.decoder, pipe.tokenizer)
