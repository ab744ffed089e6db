"""The engine folder: what the exporter writes and the only thing the runtime reads.

`manifest` (read, validate, verify files), `schema` (every field the runtime reads, typed),
`spec` (graph I/O specs, the one contract between exporter, engine builder and runtime),
`graphs` (the graphs of a BLIP3-o folder from plain model dimensions) and `engine_folder`
(`EngineFolder`: one typed view of a folder that parses its specs once).
"""
