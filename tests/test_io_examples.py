"""Example scenes: the shipped tiny scene, the upstream example cache, offline behaviour."""

import importlib.util
import shutil

import numpy as np
import pytest

from wm_jax.io import examples, hub
from wm_jax.io.examples import EXAMPLE_REPO, SHIPPED_EXAMPLE, example_dir, load_example
from wm_jax.io.trajectory import validate_trajectory


def fail_download(*args, **kwargs):
    raise AssertionError(f"unexpected download {args} {kwargs}")


def test_shipped_example_loads_and_is_valid():
    ex = load_example(SHIPPED_EXAMPLE)
    assert ex.image.dtype == np.uint8 and ex.image.shape == (64, 112, 3)
    assert ex.poses.shape == (57, 4, 4) and ex.poses.dtype == np.float32
    assert ex.intrinsics.shape == (57, 4) and ex.intrinsics.dtype == np.float32
    validate_trajectory(ex.poses, ex.intrinsics)
    np.testing.assert_allclose(ex.intrinsics[0], [503, 503, 416, 240])
    assert "checkerboard" in ex.prompt
    # Walks forward (frames 1-20), turns right on the spot (21-36), walks forward again (37-56).
    steps = np.diff(ex.poses[:, :3, 3], axis=0)
    along_view = np.einsum("ij,ij->i", steps, ex.poses[1:, :3, 2])
    heading = np.degrees(np.arctan2(ex.poses[:, 0, 2], ex.poses[:, 2, 2]))
    turns = np.diff(np.unwrap(heading, period=360.0))
    assert np.all(along_view[:20] > 0.07) and np.all(along_view[36:] > 0.07)
    np.testing.assert_allclose(steps[20:36], 0.0, atol=1e-6)
    assert np.all(turns[20:36] > 2.5) and np.allclose(turns[:20], 0.0) and np.allclose(turns[36:], 0.0)
    assert sum(p.stat().st_size for p in SHIPPED_EXAMPLE.iterdir()) < 100_000


def test_shipped_example_matches_its_generator():
    spec = importlib.util.spec_from_file_location("make_tiny_example", SHIPPED_EXAMPLE.parent / "make_tiny_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    np.testing.assert_array_equal(module.make_trajectory(), np.load(SHIPPED_EXAMPLE / "poses.npy"))
    assert (SHIPPED_EXAMPLE / "prompt.txt").read_text().strip() == module.PROMPT


def test_offline_empty_cache_raises_with_hint(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "cache"
    with pytest.raises(hub.HubError) as info:
        example_dir(0, cache_root=cache, hub_cache_dir=str(tmp_path / "hf"))
    message = str(info.value)
    assert EXAMPLE_REPO in message
    assert "HF_HUB_OFFLINE" in message
    assert str(SHIPPED_EXAMPLE) in message and "assets/examples/tiny" in message
    assert not (cache / "00").exists()


def test_cached_folder_is_used_without_download(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "download", fail_download)
    cache = tmp_path / "cache"
    shutil.copytree(SHIPPED_EXAMPLE, cache / "01")
    folder = example_dir(1, cache_root=cache)
    assert folder == cache / "01"
    assert load_example(folder).poses.shape == (57, 4, 4)


def test_download_is_copied_into_cache_atomically(tmp_path, monkeypatch):
    snapshot = tmp_path / "snapshot"
    shutil.copytree(SHIPPED_EXAMPLE, snapshot / "examples" / "05")
    np.save(snapshot / "examples" / "05" / "action.npy", np.zeros((57, 4), np.float32))
    calls = []

    def fake_download(repo_id, allow_patterns=None, **kwargs):
        calls.append((repo_id, list(allow_patterns)))
        return snapshot

    monkeypatch.setattr(hub, "download", fake_download)
    cache = tmp_path / "cache"
    folder = example_dir(5, cache_root=cache)
    assert calls == [(EXAMPLE_REPO, ["examples/05/*"])]
    assert folder == cache / "05"
    assert sorted(p.name for p in folder.iterdir()) == sorted([*examples.EXAMPLE_FILES, "action.npy"])
    assert [p.name for p in cache.iterdir()] == ["05"]  # no staging folder left behind
    load_example(folder)
    # Second call: served from the cache.
    monkeypatch.setattr(hub, "download", fail_download)
    assert example_dir(5, cache_root=cache) == folder


def test_failed_copy_leaves_nothing(tmp_path, monkeypatch):
    snapshot = tmp_path / "snapshot"
    shutil.copytree(SHIPPED_EXAMPLE, snapshot / "examples" / "02")
    monkeypatch.setattr(hub, "download", lambda *a, **k: snapshot)

    def broken_copytree(src, dst, **kwargs):
        (dst).mkdir()
        (dst / "image.jpg").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(examples.shutil, "copytree", broken_copytree)
    cache = tmp_path / "cache"
    with pytest.raises(OSError, match="disk full"):
        example_dir(2, cache_root=cache)
    assert list(cache.iterdir()) == []


def test_bad_index_lists_upstream_examples(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "download", fail_download)
    for bad in (3, 4, 6, -1, "0", True):
        with pytest.raises(ValueError, match="0, 1, 2, 5"):
            example_dir(bad, cache_root=tmp_path)


def test_incomplete_cached_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "download", fail_download)
    (tmp_path / "00").mkdir()
    (tmp_path / "00" / "image.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="poses.npy"):
        example_dir(0, cache_root=tmp_path)


def test_load_example_errors_name_files(tmp_path):
    folder = tmp_path / "scene"
    shutil.copytree(SHIPPED_EXAMPLE, folder)
    (folder / "prompt.txt").unlink()
    with pytest.raises(FileNotFoundError, match="prompt.txt"):
        load_example(folder)
    shutil.copy(SHIPPED_EXAMPLE / "prompt.txt", folder)
    poses = np.load(folder / "poses.npy")
    poses[7, 1, 3] = np.inf
    np.save(folder / "poses.npy", poses)
    with pytest.raises(ValueError, match=r"poses\.npy: frame 7 contains NaN or inf"):
        load_example(folder)
    (folder / "image.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"image\.jpg: cannot read image"):
        load_example(folder)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_example(tmp_path / "nope")
