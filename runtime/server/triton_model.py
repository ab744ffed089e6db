"""Triton Python-backend orchestrator (copied as `blip3o/1/model.py` by `runtime.server.triton`).

It runs the runtime's generation loop (`Generator.generate`: prefill, DiT steps, UNet steps,
VAE) with each session call sent to the graph models of the same repository through BLS.
Inputs: PROMPT (string) and one optional input per `GeneratorParams` field, in capitals (SEED,
STEPS, ..., PRESET: `runtime.server.triton.param_inputs`); output IMAGES (N, H, W, 3) uint8.
Parameters: ENGINES (the engine folder, for the tokenizer, embeddings and manifest) and
RUNTIME_PATH (where the `runtime` package is).
"""

import json
import sys

import numpy as np
import triton_python_backend_utils as pb_utils


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class BlsSession:
    """A runtime session whose `run` is a BLS call to the graph model of the same name."""

    def __init__(self, spec):
        self.spec = spec
        self.outputs = [t.name for t in spec.outputs]

    def run(self, feeds):
        request = pb_utils.InferenceRequest(
            model_name=self.spec.name,
            requested_output_names=self.outputs,
            inputs=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in feeds.items()],
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{self.spec.name}: {response.error().message()}")
        return {n: pb_utils.get_output_tensor_by_name(response, n).as_numpy() for n in self.outputs}

    def to_host(self, value):
        return np.asarray(value)

    def close(self):
        pass


class TritonPythonModel:
    def initialize(self, args):
        params = json.loads(args["model_config"]).get("parameters", {})
        path = params.get("RUNTIME_PATH", {}).get("string_value")
        if path and path not in sys.path:
            sys.path.insert(0, path)
        from runtime.errors import UserError
        from runtime.server.adapter import generator_with_sessions
        from runtime.server.triton import param_inputs

        self.user_error = UserError
        casts = {str: _text}  # numbers come as numpy scalars: int() / float() them
        self.optional = {n: (f, casts.get(k, k)) for n, _, f, k in param_inputs()}
        self.gen = generator_with_sessions(params["ENGINES"]["string_value"], BlsSession)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy()
                prompt = prompt.reshape(-1)[0]
                kwargs = {}
                for name, (key, cast) in self.optional.items():
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        kwargs[key] = cast(tensor.as_numpy().reshape(-1)[0])
                text = _text(prompt)
                images = self.gen.generate(text, **kwargs)
                pixels = np.stack([np.asarray(im) for im in images]).astype(np.uint8)
                responses.append(
                    pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("IMAGES", pixels)])
                )
            except self.user_error as err:
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(" ".join(str(err).split()))
                    )
                )
        return responses

    def finalize(self):
        self.gen.close()
