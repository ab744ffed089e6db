"""Machine facts and rules: what this machine has (`probe`), which precision a GPU runs
(`hardware`), whether a folder loads here and what fixes it (`compat`), and `doctor`, the
command that reports all of it.
"""
