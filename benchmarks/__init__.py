"""Benchmarks: one script per question (latency, GPU check, roofline); see benchmarks/README.md."""
