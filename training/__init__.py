"""BLIP3-o in PyTorch: configs and presets, model components, checkpoint I/O, reference pipeline."""
