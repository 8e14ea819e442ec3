"""Kernels: attention (`attention`, our Mosaic GPU `chunk_attention`). The names below are importable
without JAX (the CLI checks its flags with them before anything heavy loads)."""

ATTENTION_BACKENDS = ("pallas", "cudnn", "tokamax", "xla")  # also the fallback order: fastest first
ATTENTION_IMPLEMENTATIONS = ("auto", *ATTENTION_BACKENDS)
ATTENTION_PACKAGES = {"tokamax": "tokamax"}  # backends that need an optional package


def missing_package(implementation: str) -> str | None:
    """The optional package attention backend `implementation` needs and this environment lacks (None when
    it needs none or has it)."""
    import importlib.util

    package = ATTENTION_PACKAGES.get(implementation)
    return package if package and importlib.util.find_spec(package) is None else None
