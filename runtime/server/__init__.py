"""`python -m runtime serve`: an OpenAI-compatible HTTP server over one engine folder.

Optional: needs the `serve` extra (`pip install "blip3o-edge[serve]"`: fastapi, uvicorn,
prometheus-client); importing `runtime` or this package never imports them. Modules:
`adapter` (the server's one link to the runtime core), `engine` (the thread that steps and
batches requests), `protocol` (OpenAI request/response shapes), `app` (the FastAPI app),
`metrics`, `cli` (the subcommand), `ray_serve` (scale-out on Ray Serve, the `ray` extra) and
`triton` (a Triton model repository generated from the engine folder).
"""
