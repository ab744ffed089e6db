"""Scripted sessions over a fake engine folder: the jobs' control flow without exporting anything.

After nanochat's engine tests (a mock model that returns scripted outputs): `fake_folder(dir)`
writes a real, schema-valid engine folder of the tiny variant (`tests/data/tiny-manifest.json`:
a built folder's manifest with its graph specs, host arrays drawn here, the shipped tiny
tokenizer) whose graph files are placeholders; `ScriptedGraphs` opens a `ScriptedSession` per
graph that checks every feed against the spec (names, dtypes, shapes, like the real sessions) and
computes simple, deterministic outputs of the spec's shapes, recording each call:

- `prefill`: hidden states = the input embeddings + 1; logits that pick `script.answer` tokens;
  present keys/values whose every entry is its position (so a cache row says where it came from)
- `decode`: logits for the next scripted token; the new key/value row = `cache_position`, and it
  records each layer's cache as fed (to check the job wrote the rows in place)
- `dit_step` / `unet_step`: the linear update the samplers describe, with a velocity / denoised
  prediction that depends only on the row (its conditioning), so a row computes the same batched
  or alone
- `vae_decoder`: images = a squashed mean of the latents; `vision`: one embedding per merged token

Regenerate `tests/data/tiny-manifest.json` after a manifest format change with
`python -m tests.fake_sessions --refresh engines/tiny-fp32`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.folder.spec import GraphSpec, check_feeds

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "tests" / "data" / "tiny-manifest.json"
TOKENIZER = REPO / "checkpoints" / "tiny" / "tokenizer.json"


def _record(path: Path) -> dict:
    data = path.read_bytes()
    return {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def fake_folder(folder: Path, *, seed: int = 0, edit=None) -> Path:
    """A schema-valid tiny engine folder at `folder` whose graphs only scripted sessions run.
    `edit(manifest)` may change the manifest before it is written."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(MANIFEST.read_text())
    rng = np.random.default_rng(seed)
    b, d = manifest["config"]["backbone"], manifest["config"]["dit"]
    arrays = {
        "embeddings": rng.standard_normal((b["vocab_size"], b["hidden_size"]), np.float32),
        "latent_queries": rng.standard_normal((1, b["n_query"], b["hidden_size"]), np.float32),
        "negative_features": np.zeros((1, d["input_size"] ** 2, d["in_channels"]), np.float32),
    }
    for name, array in arrays.items():
        np.save(folder / f"{name}.npy", array)
        manifest["host"][name] = _record(folder / f"{name}.npy")
    shutil.copyfile(TOKENIZER, folder / "tokenizer.json")
    manifest["host"]["tokenizer"] = _record(folder / "tokenizer.json")
    for name, graph in manifest["graphs"].items():
        path = folder / graph["file"]
        path.write_bytes(f"scripted {name}".encode())
        graph.update(_record(path))
    if edit is not None:
        edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return folder


@dataclass
class Script:
    """What the scripted text decoder says: `answer` token ids, one per step, then `eos`
    (None: never). `nan_at`: (graph, call index) whose outputs are NaN, or (graph, call index,
    row) for one row of a batched call; `raise_at`: (graph, call index) that raises."""

    answer: list[int] = field(default_factory=lambda: [11, 12, 13, 14, 15, 16, 17, 18])
    eos: int | None = 2
    nan_at: tuple | None = None
    raise_at: tuple[str, int] | None = None


class ScriptedSession:
    def __init__(self, spec: GraphSpec, graphs: ScriptedGraphs) -> None:
        self.spec, self.graphs = spec, graphs
        self.calls: list[dict] = []
        self.closed = False

    def run(self, feeds: dict) -> dict:
        assert not self.closed, f"{self.spec.name}: run after close"
        check_feeds(self.spec, feeds)  # names, dtypes, shapes within the profile
        index = len(self.calls)
        self.calls.append({k: np.array(v, copy=True) for k, v in feeds.items()})
        self.graphs.log.append(self.spec.name)
        script = self.graphs.script
        if script.raise_at == (self.spec.name, index):
            raise RuntimeError(f"scripted failure of {self.spec.name} call {index}")
        out = getattr(self, "_" + self.spec.name)(feeds)
        if script.nan_at is not None and script.nan_at[:2] == (self.spec.name, index):
            rows = slice(None) if len(script.nan_at) == 2 else script.nan_at[2]
            for value in out.values():
                if value.dtype.kind == "f":
                    value[rows] = np.nan
        return out

    def to_host(self, value):
        return np.asarray(value)

    def close(self) -> None:
        self.closed = True
        self.graphs.closed.append(self.spec.name)

    # the graphs ---------------------------------------------------------------------------
    def _logits(self, step: int) -> np.ndarray:
        vocab = self.spec.tensor("logits").shape[-1]
        script = self.graphs.script
        token = script.answer[step] if step < len(script.answer) else script.eos
        logits = np.zeros((1, vocab), np.float32)
        logits[0, 0 if token is None else token] = 10.0
        return logits

    def _prefill(self, feeds):
        embeds = feeds["inputs_embeds"]  # (1, S, H)
        _, s, _ = embeds.shape
        layers, _, kv, _, dim = self.spec.tensor("present_keys").shape
        positions = np.broadcast_to(np.arange(s, dtype=np.float32)[:, None], (s, dim))
        kv_rows = np.broadcast_to(positions, (layers, 1, kv, s, dim)).astype(embeds.dtype)
        self.graphs.answer_step = 0
        return {
            "hidden_states": embeds + 1,
            "logits": self._logits(0),
            "present_keys": kv_rows.copy(),
            "present_values": -kv_rows,
        }

    def _decode(self, feeds):
        position = int(feeds["cache_position"][0])
        layers = self.spec.tensor("new_keys").shape[0]
        _, kv, _, dim = self.spec.tensor("cache_keys.0").shape
        self.graphs.answer_step += 1
        self.graphs.caches.append(np.array(feeds["cache_keys.0"][0, 0, :position, 0]))
        row = np.full((layers, 1, kv, 1, dim), position, feeds["inputs_embeds"].dtype)
        return {
            "logits": self._logits(self.graphs.answer_step),
            "new_keys": row,
            "new_values": -row,
        }

    def _dit_step(self, feeds):
        latents = feeds["latents"]  # (N, C, 8, 8)
        velocity = latents * 0.5 + feeds["cond"].mean(axis=(1, 2))[:, None, None, None]
        nxt = (
            latents
            + feeds["c_velocity"][0] * velocity
            + feeds["c_prev"][0] * feeds["prev_velocity"]
        )
        return {
            "next_latents": nxt.astype(latents.dtype),
            "velocity": velocity.astype(latents.dtype),
        }

    def _unet_step(self, feeds):
        latents = feeds["latents"]  # (N, 4, l, l)
        bias = feeds["features"].mean(axis=(1, 2))[:, None, None, None]
        denoised = latents * feeds["in_scale"][0] * 0.5 + bias
        nxt = (
            feeds["c_sample"][0] * latents
            + feeds["c_eps"][0] * denoised
            + feeds["c_prev"][0] * feeds["prev_denoised"]
        )
        return {
            "next_latents": nxt.astype(latents.dtype),
            "denoised": denoised.astype(latents.dtype),
        }

    def _vae_decoder(self, feeds):
        latents = feeds["latents"]  # (N, 4, l, l)
        n, _, h, w = self.spec.tensor("images").shape
        mean = 1 / (1 + np.exp(-latents.mean(axis=(1, 2, 3))))  # (N,)
        return {
            "images": np.broadcast_to(mean[:, None, None, None], (len(latents), 3, h, w))
            .astype(np.float32)
            .copy()
        }

    def _vision(self, feeds):
        merged = feeds["reverse_index"].shape[0]
        width = self.spec.tensor("image_embeds").shape[-1]
        return {"image_embeds": np.ones((merged, width), np.float32)}


class ScriptedGraphs:
    """`open_graph` for a Generator: one `ScriptedSession` per graph opened, all logged."""

    def __init__(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self.sessions: dict[str, list[ScriptedSession]] = {}
        self.log: list[str] = []  # graph names, one per call, in order
        self.closed: list[str] = []
        self.caches: list[np.ndarray] = []  # layer 0's cache rows as each decode call saw them
        self.answer_step = 0

    def __call__(self, spec: GraphSpec) -> ScriptedSession:
        session = ScriptedSession(spec, self)
        self.sessions.setdefault(spec.name, []).append(session)
        return session

    def calls(self, graph: str) -> list[dict]:
        return [c for s in self.sessions.get(graph, []) for c in s.calls]


def refresh(folder: Path) -> None:
    """Rewrite `tests/data/tiny-manifest.json` from a built tiny folder's manifest."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.pop("stages", None)
    manifest["checkpoint"] = {"hash": "fake", "path": None}
    manifest["weights"] = "scripted sessions (tests/fake_sessions.py)"
    for entry in [*manifest["graphs"].values(), *manifest["host"].values()]:
        entry.update(sha256="0" * 64, size=0)
        entry.pop("external_data", None)
    MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] != ["--refresh"] or len(sys.argv) != 3:
        sys.exit("usage: python -m tests.fake_sessions --refresh ENGINE_FOLDER")
    refresh(Path(sys.argv[2]))
