"""The runtime's own sampling loop over the PyTorch model: how the build samples anything.

Where a build needs sampled data (the decoder negative of the `negative` stage, the calibration
feeds of INT8/FP8 graphs) it runs `runtime.jobs.generation`'s loop, the one the runtime ships, not a
copy: a `runtime.Generator` whose sessions run each graph's export wrapper over the model
(`ModelGraphs`). One component is in memory at a time (the text decoder for `prefill`, then the
DiT, the UNet, the VAE): a session of another component frees the previous one, so a 4b build
never holds the text decoder, the DiT and the UNet together. The model may be on a GPU; the
loop's host data are numpy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from export.build_folder import host_entries
from export.calibration import Recorder
from export.components import GRAPH_COMPONENT
from export.dims import graph_dims
from export.torch_backend import to_host  # importing it registers the "torch" session backend
from runtime.folder.engine_folder import EngineFolder
from runtime.folder.graphs import graph_specs
from runtime.folder.spec import GraphSpec, spec_to_dict
from runtime.generator import Generator
from runtime.sessions import open_session

log = logging.getLogger(__name__)


class ModelGraphs:
    """Sessions over a `ModelSource`'s components, loaded in `dtype` on `device` one at a time."""

    def __init__(self, source, *, dtype: str = "fp32", device: str = "cpu") -> None:
        self.source, self.dtype, self.device = source, dtype, device
        self._component: str | None = None
        self._parts = None
        self._sessions: dict = {}

    def open(self, spec: GraphSpec) -> ModelSession:
        return ModelSession(self, spec)

    def session(self, spec: GraphSpec):
        """The torch session of `spec`'s graph, loading its component (freeing another)."""
        component = GRAPH_COMPONENT[spec.name]
        if component != self._component:
            self.release()
            self._parts = self.source.load(component, dtype=self.dtype, device=self.device)
            self._component = component
        if spec.name not in self._sessions:
            self._sessions[spec.name] = open_session(
                spec, "", "torch", device=self.device, precision=self.dtype, pipeline=self._parts
            )
        return self._sessions[spec.name]

    def release(self) -> None:
        self._sessions.clear()
        self._parts = self._component = None
        self.source.release()


class ModelSession:
    """A graph's session as the Generator sees it; the module behind it comes and goes."""

    def __init__(self, graphs: ModelGraphs, spec: GraphSpec) -> None:
        self.graphs, self.spec = graphs, spec

    def run(self, feeds: dict) -> dict:
        return self.graphs.session(self.spec).run(feeds)

    def to_host(self, value):
        return to_host(value)  # needs no module: the component stays whatever is loaded

    def close(self) -> None:
        pass  # the component goes when another is loaded, or with `ModelGraphs.release`


def model_generator(
    folder,
    manifest: dict,
    host: dict,
    specs: dict,
    open_graph: Callable[[GraphSpec], object],
    *,
    precision: str,
    device: str,
):
    """A `runtime.Generator` over a folder being built: its manifest so far, the host assets of
    the `assets` stage (`host`), every graph's spec, sessions from `open_graph`. `precision` is
    the dtype the sessions compute in (it sets the host feeds' dtype)."""
    view = {
        **manifest,
        "precision": precision,
        "graphs": {name: {"spec": spec_to_dict(spec)} for name, spec in specs.items()},
        "host": host,
    }
    return Generator(
        EngineFolder(folder, view),
        backend="torch",
        device=device,
        low_memory=False,
        open_graph=open_graph,
    )


def calibration_generator(folder, manifest: dict, source, *, device: str = "cpu"):
    """(Generator, Recorder, ModelGraphs) to record calibration feeds over `source`'s model in
    fp32: `folder`'s manifest (its `assets` and `negative` stages done) and every graph's spec.
    Release the `ModelGraphs` when done."""
    graphs = ModelGraphs(source, dtype="fp32", device=device)
    recorder = Recorder()
    specs = graph_specs(graph_dims(source.config))
    gen = model_generator(
        folder, manifest, host_entries(manifest), specs,
        lambda spec: recorder.wrap(graphs.open(spec)), precision="fp32", device=device,
    )  # fmt: skip
    return gen, recorder, graphs
