"""Torch-free BLIP3-o runtime: sampling loops over ONNX Runtime / TensorRT sessions.

Importing this package (and running a generation) never imports torch, transformers or diffusers.
"""
