"""Export-only modules: plain tensors in and out, named like the graph specs' tensors."""
