"""wm_jax: a pure-JAX (Flax NNX) runtime for autoregressive Wan-family video world models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("wm_jax")  # the installed package's metadata (pyproject.toml's version)
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
