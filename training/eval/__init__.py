"""Evaluation on the shapes world: palette detector, mini-GenEval, understanding exact match."""
