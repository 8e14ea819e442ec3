"""LingBot-World example scenes: an image, a camera trajectory and a prompt per folder.

A scene folder holds `image.jpg`, `poses.npy` ([N, 4, 4] c2w, OpenCV axes), `intrinsics.npy`
([N, 4] for a 480x832 frame) and `prompt.txt` (upstream v2 folders add action files, which are
copied along but not loaded here).

- `example_dir(i)` returns the folder of upstream example i (0, 1, 2 or 5 of the Hugging Face repo
  robbyant/lingbot-world-v2), downloading it into a local cache on first use.
- `SHIPPED_EXAMPLE` is a tiny scene made by this project (`assets/examples/make_tiny_example.py`)
  that needs no network.
- `load_example(folder)` reads any such folder.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wm_jax.io import hub
from wm_jax.io.trajectory import load_trajectory

EXAMPLE_REPO = "robbyant/lingbot-world-v2"
UPSTREAM_EXAMPLE_INDICES = (0, 1, 2, 5)
DEFAULT_CACHE_ROOT = "assets/example_data/lingbot_world"
EXAMPLE_FILES = ("image.jpg", "poses.npy", "intrinsics.npy", "prompt.txt")
REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_EXAMPLE = REPO_ROOT / "assets" / "examples" / "tiny"


@dataclass(frozen=True)
class Example:
    image: np.ndarray  # uint8 [H, W, 3] RGB
    poses: np.ndarray  # [N, 4, 4] camera-to-world, OpenCV axes
    intrinsics: np.ndarray  # [N, 4] (fx, fy, cx, cy) for a 480x832 frame
    prompt: str
    path: Path | None = None


def _missing_files(folder: Path) -> list[str]:
    return [name for name in EXAMPLE_FILES if not (folder / name).is_file()]


def example_dir(index: int, cache_root: str | os.PathLike = DEFAULT_CACHE_ROOT, *,
                hub_cache_dir: str | None = None) -> Path:
    """Folder of upstream LingBot example `index`, downloaded on first use.

    Args:
      index: 0, 1, 2 or 5 (the example folders of robbyant/lingbot-world-v2).
      cache_root: where scenes are kept, as `<cache_root>/NN/` (relative paths are relative to the
        current directory). A folder already holding the four scene files is used as is, with no
        network access.
      hub_cache_dir: Hugging Face cache for the download (default: the usual HF cache).
    Returns:
      `<cache_root>/NN` holding at least image.jpg, poses.npy, intrinsics.npy and prompt.txt.
    Raises:
      ValueError for an index upstream does not have; hub.HubError when the download fails (offline,
      no network), with a pointer to the shipped offline example.
    """
    valid = isinstance(index, (int, np.integer)) and not isinstance(index, bool)
    if not valid or int(index) not in UPSTREAM_EXAMPLE_INDICES:
        raise ValueError(f"no LingBot example {index!r}; {EXAMPLE_REPO} has examples "
                         f"{', '.join(str(i) for i in UPSTREAM_EXAMPLE_INDICES)}")
    tag = f"{int(index):02d}"
    root = Path(cache_root)
    target = root / tag
    if target.exists():
        missing = _missing_files(target)
        if not missing:
            return target
        raise FileExistsError(f"{target} exists but lacks {', '.join(missing)}; delete the folder to "
                              f"download example {tag} again")

    pattern = f"examples/{tag}/*"
    try:
        snapshot = hub.download(EXAMPLE_REPO, allow_patterns=[pattern], cache_dir=hub_cache_dir)
    except hub.HubError as err:
        raise hub.HubError(
            f"{err}\nAlternatively copy {', '.join(EXAMPLE_FILES)} of {EXAMPLE_REPO} examples/{tag}/ into "
            f"{target}/ yourself.\nTo run without the network, use the example shipped with wm_jax: "
            f"{SHIPPED_EXAMPLE} (wm_jax.io.examples.SHIPPED_EXAMPLE).") from None
    source = Path(snapshot) / "examples" / tag
    missing = _missing_files(source)
    if missing:
        raise hub.HubError(f"{EXAMPLE_REPO} examples/{tag} lacks {', '.join(missing)} "
                           f"(downloaded to {source})")

    # Copy into a temporary sibling folder, then rename it into place in one step.
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{tag}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        shutil.copytree(source, staging)  # follows the HF cache's symlinks: real files are copied
        try:
            os.rename(staging, target)
        except OSError:
            # Another process finished the same download first; keep its complete copy.
            if target.is_dir() and not _missing_files(target):
                shutil.rmtree(staging, ignore_errors=True)
            else:
                raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def load_example(path: str | os.PathLike) -> Example:
    """Reads a scene folder (upstream layout) into an `Example`, validating the trajectory.

    Errors name the offending file (missing files, unreadable image, bad trajectory).
    """
    from PIL import Image

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"example folder {folder} does not exist")
    missing = _missing_files(folder)
    if missing:
        raise FileNotFoundError(f"example folder {folder} lacks {', '.join(missing)} "
                                f"(expected {', '.join(EXAMPLE_FILES)})")
    image_path = folder / "image.jpg"
    try:
        with Image.open(image_path) as im:
            image = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except Exception as err:
        raise ValueError(f"{image_path}: cannot read image ({type(err).__name__}: {err})") from None
    poses, intrinsics = load_trajectory(folder / "poses.npy", folder / "intrinsics.npy")
    prompt = (folder / "prompt.txt").read_text(encoding="utf-8").strip()
    if not prompt:
        raise ValueError(f"{folder / 'prompt.txt'}: the prompt is empty")
    return Example(image=image, poses=poses, intrinsics=intrinsics, prompt=prompt, path=folder)
