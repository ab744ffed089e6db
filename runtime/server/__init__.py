"""`python -m runtime serve`: an OpenAI-compatible HTTP server over one engine folder.

Optional: needs the `serve` extra (`pip install "blip3o-edge[serve]"`: fastapi, uvicorn,
prometheus-client); importing `runtime` or this package never imports them. Modules:
`adapter` (the server's one link to the runtime core), `scheduler` (the thread that steps and
batches requests), `state` (what one server holds; admission), `models` (the request and
response models: the API's contract, derived from the params dataclasses, and the request
parser), `protocol` (what requests mean, response bodies), `errors` (OpenAI-shaped errors, the
guard middleware), the routes (`images`, `jobs`, `chat`, `health`), `streams` (waiting on a
task, server-sent events), `app` (assembles the FastAPI app and its OpenAPI contract),
`metrics`, `cli` (the subcommand), `ray_serve` (scale-out on Ray Serve, the `ray` extra) and
`triton` (a Triton model repository generated from the engine folder).
"""
