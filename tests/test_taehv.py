"""TAEHV decoder: golden parity, an independent frame-by-frame PyTorch reference, converter and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from converters import taehv as taehv_converter
from wm_jax.io import checkpoint as ckpt
from wm_jax.io.safetensors_io import CheckpointError
from wm_jax.io.tensor_sources import ArraySource, open_source
from wm_jax.models import taehv
from tests.wan_testlib import random_taehv_state as random_state_dict

_ROOT = Path(__file__).resolve().parents[1]
# shared/ sits beside the checkout (CI, developers) or inside it (device-machine copies).
GOLDEN = next((p for p in (_ROOT.parent / "shared" / "golden" / "taehv_decode",
                           _ROOT / "shared" / "golden" / "taehv_decode") if p.is_dir()),
              _ROOT.parent / "shared" / "golden" / "taehv_decode")
TOL = 1e-5


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------------------------------------------
# An independent torch reference (random upstream-layout checkpoints: tests.wan_testlib).
# ---------------------------------------------------------------------------------------------------


def torch_reference(sd: dict[str, np.ndarray], latent_ntchw: np.ndarray, time_strides=(1, 2, 2),
                    patch: int = 1) -> np.ndarray:
    """Frame-by-frame (depth-first) decode in PyTorch, NCHW convs on the upstream-layout weights.

    Written for this test from the architecture description (not upstream's parallel code path): every
    MemBlock sees one frame at a time and keeps the previous one; a TGrow splits a frame into `stride`
    frames that are pushed through the rest of the network in time order. Returns NTCHW frames with the
    first (prod(strides) - 1) dropped, clamped to [0, 1].
    """
    import torch
    import torch.nn.functional as F

    w = {k: torch.from_numpy(v.astype(np.float32)) for k, v in sd.items()}
    conv = lambda x, name, bias=True: F.conv2d(x, w[f"{name}.weight"], w[f"{name}.bias"] if bias else None,
                                              padding=w[f"{name}.weight"].shape[-1] // 2)
    memory: dict[tuple[int, int], torch.Tensor] = {}
    frames: list[torch.Tensor] = []

    def through(x: torch.Tensor, stage: int):
        if stage == 3:
            y = conv(torch.relu(x), "decoder.22")
            frames.append(F.pixel_shuffle(y, patch) if patch > 1 else y)
            return
        base = 3 + 6 * stage
        for k in range(3):
            past = memory.get((stage, k), torch.zeros_like(x))
            memory[(stage, k)] = x
            h = torch.relu(conv(torch.cat([x, past], 1), f"decoder.{base + k}.conv.0"))
            h = torch.relu(conv(h, f"decoder.{base + k}.conv.2"))
            x = torch.relu(conv(h, f"decoder.{base + k}.conv.4") + x)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        n, stride = x.shape[1], time_strides[stage]
        tg = w[f"decoder.{base + 4}.conv.weight"][-stride * n:]  # last rows, like upstream
        y = F.conv2d(x, tg)
        for j in range(stride):
            through(conv(y[:, j * n:(j + 1) * n], f"decoder.{base + 5}", bias=False), stage + 1)

    with torch.no_grad():
        for t in range(latent_ntchw.shape[1]):
            x = torch.tanh(torch.from_numpy(latent_ntchw[:, t]) / 3) * 3
            through(torch.relu(conv(x, "decoder.1")), 0)
    trim = int(np.prod(time_strides)) - 1
    return torch.stack(frames, 1)[:, trim:].clamp(0, 1).numpy()


def to_nthwc(x):
    return np.ascontiguousarray(np.asarray(x).transpose(0, 1, 3, 4, 2))


def to_ntchw(x):
    return np.asarray(x).transpose(0, 1, 4, 2, 3)


# ---------------------------------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not GOLDEN.is_dir(), reason="shared golden data not present")
def test_golden_parity_parallel_and_streaming():
    from wm_jax.parity import compare, load_case, run_case

    _, config, inputs = load_case(GOLDEN)
    outputs = run_case(GOLDEN)
    with np.load(GOLDEN / "outputs.npz") as npz:
        golden = {k: npz[k] for k in npz.files}
    errors = compare(outputs, golden)
    assert set(errors) == {"frames_parallel", "frames_streaming"}
    for name, err in errors.items():
        assert err < TOL, (name, err)
    t = inputs["latent"].shape[1]
    assert outputs["frames_parallel"].shape[1] == 4 * t - 3
    assert config["shapes"]["streaming_frames_per_chunk"][0] == 4 * config["shapes"]["streaming_chunk_latents"] - 3


@pytest.mark.parametrize("variant", ["taew2_1", "taew2_2"])
def test_matches_frame_by_frame_torch_reference(variant):
    z_ch, patch = (16, 1) if variant == "taew2_1" else (48, 2)
    sd = random_state_dict(1, z_ch, patch=patch)
    module = taehv_converter.load_source(ArraySource(sd), precision="highest")
    cfg = module.config
    assert (cfg.latent_channels, cfg.patch_size, cfg.decoder_n_f) == (z_ch, patch, (32, 16, 8, 8))
    latent = np.random.default_rng(2).standard_normal((1, 5, z_ch, 3, 4)).astype(np.float32)
    ref = torch_reference(sd, latent, patch=patch)
    assert ref.shape == (1, 4 * 5 - 3, 3, 3 * 8 * patch, 4 * 8 * patch)

    parallel = to_ntchw(taehv.decode_video(module, to_nthwc(latent)))
    assert parallel.shape == ref.shape
    assert rel_l2(parallel, ref) < TOL

    # Streaming with an uneven last chunk: 2 + 2 + 1 latents -> 5 + 8 + 4 frames.
    z = to_nthwc(latent)
    state = taehv.init_decoder_state(module, 1, 3, 4)
    pieces = []
    for start in range(0, 5, 2):
        frames, state = taehv.decode_chunk(module, z[:, start:start + 2], state)
        pieces.append(to_ntchw(frames))
    assert [p.shape[1] for p in pieces] == [5, 8, 4]
    streaming = np.concatenate(pieces, axis=1)
    assert rel_l2(streaming, ref) < TOL
    assert np.abs(streaming - parallel).max() < 1e-5
    # One latent per chunk also reproduces it.
    assert rel_l2(to_ntchw(taehv.decode_stream(module, z, 1)), ref) < TOL


def test_tgrow_keeps_last_rows_and_checks_shape():
    sd = random_state_dict(3, 16)
    latent = np.random.default_rng(4).standard_normal((1, 2, 16, 3, 4)).astype(np.float32)
    ref = torch_reference(sd, latent)
    # The first 256-row half of a stride-2 TGrow stored for a stride-1 stage must not be used.
    sd_first = dict(sd)
    n = sd["decoder.7.conv.weight"].shape[1]
    w7 = sd["decoder.7.conv.weight"]
    sd_first["decoder.7.conv.weight"] = np.concatenate([w7[n:], w7[:n]], 0)  # halves swapped
    ours = to_ntchw(taehv.decode_video(taehv_converter.load_source(ArraySource(sd), precision="highest"),
                                       to_nthwc(latent)))
    swapped = to_ntchw(taehv.decode_video(taehv_converter.load_source(ArraySource(sd_first), precision="highest"),
                                          to_nthwc(latent)))
    assert rel_l2(ours, ref) < TOL
    assert rel_l2(swapped, ref) > 1e-3
    # A checkpoint whose TGrow already has stride-1 shape ([n, n, 1, 1]) loads too (the golden case).
    sd_small = dict(sd)
    sd_small["decoder.7.conv.weight"] = sd["decoder.7.conv.weight"][n:]
    small = to_ntchw(taehv.decode_video(taehv_converter.load_source(ArraySource(sd_small), precision="highest"),
                                        to_nthwc(latent)))
    assert rel_l2(small, ref) < TOL
    # Too few rows for a stride-2 stage, or a wrong inner shape, are refused with the key named.
    bad = dict(sd)
    bad["decoder.13.conv.weight"] = sd["decoder.13.conv.weight"][: sd["decoder.13.conv.weight"].shape[1]]
    with pytest.raises(CheckpointError, match=r"decoder\.13\.conv\.weight"):
        taehv_converter.load_source(ArraySource(bad))
    bad = dict(sd)
    bad["decoder.7.conv.weight"] = np.zeros((2 * n, n, 3, 3), np.float32)
    with pytest.raises(CheckpointError, match=r"decoder\.7\.conv\.weight.*TGrow"):
        taehv_converter.load_source(ArraySource(bad))


def test_pth_and_folder_round_trip(tmp_path):
    import torch

    sd = random_state_dict(5, 16, with_encoder=True)
    pth = tmp_path / "taew2_1.pth"
    torch.save({k: torch.from_numpy(v).half() for k, v in sd.items()}, pth)
    with pytest.raises(CheckpointError, match="pickle"):
        open_source(pth)
    source = open_source(pth, allow_pickle=True)
    assert taehv_converter.matches(set(source.keys()))
    assert taehv_converter.config_for(source).param_dtype == "float16"  # storage dtype kept by default
    module = taehv_converter.load_source(source, precision="highest", dtype="float32")

    dst = tmp_path / "converted"
    manifest = taehv_converter.convert(source, dst, dtype="float32")
    assert manifest["kind"] == "taehv" and ckpt.read_manifest(dst)["kind"] == "taehv"
    assert sorted(manifest["ignored_keys"]) == ["encoder.0.bias", "encoder.0.weight"]
    with pytest.raises(CheckpointError, match="exists"):
        taehv_converter.convert(source, dst)
    loaded = taehv_converter.load(dst, precision="highest")
    assert loaded.config == module.config and loaded.config.param_dtype == "float32"

    latent = np.random.default_rng(6).standard_normal((1, 2, 3, 4, 16)).astype(np.float32)
    a = np.asarray(taehv.decode_video(module, latent))
    b = np.asarray(taehv.decode_video(loaded, latent))
    half_sd = {k: v.astype(np.float16).astype(np.float32) for k, v in sd.items()}
    ref = torch_reference(half_sd, latent.transpose(0, 1, 4, 2, 3))
    assert rel_l2(to_ntchw(a), ref) < TOL
    np.testing.assert_array_equal(a, b)

    # FlashDreams-style `decoder.blocks.{i}` naming maps to the same parameters.
    renamed = {k.replace("decoder.", "decoder.blocks.", 1): v for k, v in sd.items() if k.startswith("decoder.")}
    assert taehv_converter.matches(set(renamed))
    fd = taehv_converter.load_source(ArraySource(renamed), precision="highest")
    np.testing.assert_allclose(np.asarray(taehv.decode_video(fd, latent)),
                               np.asarray(taehv.decode_video(taehv_converter.load_source(
                                   ArraySource(sd), precision="highest"), latent)), atol=1e-6)


def test_bad_inputs_and_state():
    module = taehv_converter.load_source(ArraySource(random_state_dict(7, 16)))
    good = np.zeros((1, 2, 3, 4, 16), np.float32)
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 16\]"):
        taehv.decode_video(module, np.zeros((1, 2, 3, 4, 48), np.float32))
    with pytest.raises(ValueError, match="NTCHW"):
        taehv.decode_video(module, np.zeros((1, 2, 16, 3, 4), np.float32))
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 16\]"):
        taehv.decode_video(module, np.zeros((2, 3, 4, 16), np.float32))
    state = taehv.init_decoder_state(module, 1, 3, 4)
    frames, state = taehv.decode_chunk(module, good, state)
    assert frames.shape == (1, 5, 24, 32, 3)
    frames, state2 = taehv.decode_chunk(module, good, state)
    assert frames.shape == (1, 8, 24, 32, 3)
    with pytest.raises(ValueError, match=r"latent size 3x4.*latent size 5x4"):
        taehv.decode_chunk(module, np.zeros((1, 2, 5, 4, 16), np.float32), state2)
    with pytest.raises(ValueError, match="batch"):
        taehv.decode_chunk(module, np.zeros((2, 2, 3, 4, 16), np.float32), state2)
    # Config errors: a patch size that the output conv cannot have.
    with pytest.raises(CheckpointError, match="decoder.22.weight"):
        taehv_converter.load_source(ArraySource(random_state_dict(8, 16, patch=2)), patch_size=1)


def test_config_options():
    cfg = taehv.TAEHVConfig(decoder_time_upscale=(True, False))
    assert cfg.decoder_time_upscale == (False, True, False) and cfg.t_upscale == 2 and cfg.frames_to_trim == 1
    assert taehv.TAEHVConfig.from_dict(cfg.to_dict()) == cfg
    # Time upscaling off everywhere: one frame per latent, nothing trimmed; spatial upscaling can be off too.
    sd = random_state_dict(9, 16)
    module = taehv_converter.load_source(ArraySource(sd), precision="highest",
                                         decoder_time_upscale=(False, False, False),
                                         decoder_space_upscale=(True, True, False))
    latent = np.random.default_rng(10).standard_normal((1, 3, 2, 2, 16)).astype(np.float32)
    out = taehv.decode_video(module, latent)
    assert out.shape == (1, 3, 8, 8, 3)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_parity_runner_reads_shapes_from_the_case(tmp_path):
    """Another instance (other sizes, a partial last chunk, small widths) through the golden-case runner."""
    from safetensors.numpy import save_file

    from wm_jax.parity import compare, run_case

    sd = random_state_dict(11, 16)
    save_file({k: v.astype(np.float16) for k, v in sd.items()}, str(tmp_path / "weights.safetensors"))
    latent = np.random.default_rng(12).standard_normal((1, 7, 16, 3, 5)).astype(np.float32)
    half_sd = {k: v.astype(np.float16).astype(np.float32) for k, v in sd.items()}
    ref = torch_reference(half_sd, latent)
    np.savez(tmp_path / "inputs.npz", latent=latent)
    config = {"case": "taehv_decode", "format_version": 1,
              "model_config": {"patch_size": 1, "latent_channels": 16, "arch_variant": None,
                               "decoder_time_upscale": [False, True, True],
                               "decoder_space_upscale": [True, True, True], "decoder_n_f": [32, 16, 8, 8],
                               "t_upscale": 4, "frames_to_trim": 3},
              "shapes": {"latent_NTCHW": list(latent.shape), "frames_NTCHW": list(ref.shape),
                         "streaming_chunk_latents": 3, "streaming_frames_per_chunk": [9, 12]}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    outputs = run_case(tmp_path)
    errors = compare(outputs, {"frames_parallel": ref, "frames_streaming": ref})
    assert ref.shape == (1, 25, 3, 24, 40)
    assert max(errors.values()) < TOL, errors
