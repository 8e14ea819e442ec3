"""Kernels: attention (`attention`, our Mosaic GPU `chunk_attention`). The names below are importable
without JAX (the CLI checks its flags with them before anything heavy loads)."""

ATTENTION_BACKENDS = ("pallas", "cudnn", "tokamax", "xla")  # also the fallback order: fastest first
ATTENTION_IMPLEMENTATIONS = ("auto", *ATTENTION_BACKENDS)
ATTENTION_PACKAGES = {"tokamax": "tokamax"}  # backends that need an optional package
