"""Training of the tiny BLIP3-o on the shapes world: the four stages in BLIP3-o's order.

`recipe.train` runs them (`python -m training train`), `stages` defines each stage and its
defaults, `publish.export_checkpoint` writes the published layout, `evaluate` scores a pipeline.
"""
