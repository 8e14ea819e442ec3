"""Model-hub downloads (huggingface_hub), with a clear failure when the hub cannot be reached."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from wm_jax.errors import TemplatedError


class HubError(TemplatedError, RuntimeError):
    """The hub cannot be reached or lacks the files (options named as `{name}`)."""


def hub_cli_command(repo_id: str, files: Sequence[str] = (), *, include: Sequence[str] = (),
                    local_dir: str | None = None, cache_dir: str | None = None) -> str:
    """An `hf download` command line (the CLI huggingface_hub installs) to suggest in messages.

    `--include`, `--local-dir` and `--cache-dir` are the hub CLI's own flags, not wm-jax options, so they
    are written out here rather than as `{name}` placeholders (tests/test_layering.py allows them in this
    function only).
    """
    words = ["hf download", repo_id, *files, *(f"--include '{p}'" for p in include)]
    words += [f"--local-dir {local_dir}"] if local_dir else []
    return " ".join(words + ([f"--cache-dir {cache_dir}"] if cache_dir else []))


def download(repo_id: str, allow_patterns: Sequence[str] | None = None, *, cache_dir: str | None = None,
             revision: str | None = None) -> Path:
    """Downloads (or finds in the local cache) the files of `repo_id` matching `allow_patterns`.

    Returns the local snapshot folder. Raises HubError naming the repo, the patterns and what to do
    when the hub is unreachable or the repo/files do not exist.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    patterns = list(allow_patterns) if allow_patterns else None
    try:
        path = snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir, revision=revision)
    except Exception as err:  # offline mode, DNS/connection errors, 404s, gated repos: all end here
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        why = "HF_HUB_OFFLINE is set" if offline else f"{type(err).__name__}: {err}"
        raise HubError(
            f"cannot download {repo_id} (files {patterns or 'all'}): {why}.\n"
            f"If this machine is offline, download on a connected machine with\n"
            f"  {hub_cli_command(repo_id, include=patterns or (), cache_dir=cache_dir)}\n"
            f"and copy the hub cache it fills ({cache_dir or 'HF_HOME, by default ~/.cache/huggingface'}) "
            f"to this machine.") from None
    # The snapshot folder is shared by every download of this repo revision: count only the files asked for.
    root = Path(path)
    files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    if not list(filter_repo_objects(files, allow_patterns=patterns)):
        raise HubError(f"{repo_id}: no files match {patterns}")
    return root
