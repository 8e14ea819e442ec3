"""Wan 2.1 VAE (encoder + decoder) and Wan 2.2 VAE decoder against diffusers' AutoencoderKLWan.

Random weights at a small width (dim 8 / dec_dim 16) with the real block structure. The ORIGINAL key
layout is obtained from the diffusers state dict through our diffusers->original renaming; for Wan 2.1
that renaming is checked to be the exact inverse of diffusers' own `convert_wan_vae_to_diffusers`.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from converters import wan2_2_vae as conv22  # noqa: E402
from converters import wan_vae as conv21  # noqa: E402
from wm_jax.io.safetensors_io import CheckpointError  # noqa: E402
from wm_jax.io.tensor_sources import ArraySource, open_source  # noqa: E402
from wm_jax.models import wan_vae as W  # noqa: E402
from wm_jax.models import wan_vae22 as W22  # noqa: E402

PARITY_TOL = 1e-4  # relative L2 vs diffusers (fp32)
STREAM_TOL = 1e-5  # max |Δ| chunked vs whole


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def to_cl(x: torch.Tensor) -> np.ndarray:
    """NCTHW torch -> NTHWC numpy."""
    return x.permute(0, 2, 3, 4, 1).contiguous().numpy()


def to_cf(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x)).permute(0, 4, 1, 2, 3).contiguous()


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial γ, biases and attention projections (the defaults are ones/zeros)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif "proj.weight" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def latent_stats(mean, std, z_dim):
    return torch.tensor(mean).view(1, z_dim, 1, 1, 1), torch.tensor(std).view(1, z_dim, 1, 1, 1)


# ---------------------------------------------------------------------------------------------------
# Fixtures.
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ref21():
    torch.manual_seed(0)
    model = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16).eval()
    randomize_(model, 0)
    return model


@pytest.fixture(scope="module")
def sd21_diffusers(ref21) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in ref21.state_dict().items()}


@pytest.fixture(scope="module")
def sd21_original(sd21_diffusers) -> dict[str, np.ndarray]:
    rename = conv21.diffusers_renamer(sd21_diffusers.keys())
    return {rename(k): v for k, v in sd21_diffusers.items()}


@pytest.fixture(scope="module")
def vae21(sd21_original) -> W.WanVAE:
    return conv21.load_source(ArraySource(sd21_original, "tiny Wan2.1 VAE (original keys)"))


@pytest.fixture(scope="module")
def latents21() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((1, 4, 4, 6, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def decoded21(vae21, latents21) -> np.ndarray:
    return np.asarray(vae21.decode(jnp.asarray(latents21)))


@pytest.fixture(scope="module")
def video21() -> np.ndarray:
    return np.random.default_rng(2).uniform(-1, 1, (1, 17, 32, 48, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def ref22():
    torch.manual_seed(0)
    model = diffusers.AutoencoderKLWan(
        base_dim=8, decoder_base_dim=16, z_dim=48, is_residual=True, in_channels=12, out_channels=12,
        patch_size=2, scale_factor_spatial=16, temperal_downsample=[False, True, True],
        latents_mean=list(W22.LATENT_MEAN), latents_std=list(W22.LATENT_STD)).eval()
    randomize_(model, 1)
    return model


@pytest.fixture(scope="module")
def sd22_diffusers(ref22) -> dict[str, np.ndarray]:
    return {k: v.numpy().copy() for k, v in ref22.state_dict().items()}


@pytest.fixture(scope="module")
def sd22_original(sd22_diffusers) -> dict[str, np.ndarray]:
    rename = conv22.diffusers_renamer(sd22_diffusers.keys())
    return {rename(k): v for k, v in sd22_diffusers.items()}


@pytest.fixture(scope="module")
def vae22(sd22_original) -> W22.Wan22VAE:
    return conv22.load_source(ArraySource(sd22_original, "tiny Wan2.2 VAE (original keys)"))


# ---------------------------------------------------------------------------------------------------
# Wan 2.1: layout, parity, streaming.
# ---------------------------------------------------------------------------------------------------


def test_original_layout_is_inverse_of_diffusers_converter(sd21_diffusers, sd21_original):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    assert "decoder.upsamples.4.shortcut.weight" in sd21_original  # the 192 -> 384 residual block
    assert "decoder.upsamples.7.time_conv.weight" in sd21_original
    back = convert_wan_vae_to_diffusers({k: torch.from_numpy(v) for k, v in sd21_original.items()})
    assert set(back) == set(sd21_diffusers)
    for key, value in back.items():
        np.testing.assert_array_equal(value.numpy(), sd21_diffusers[key], err_msg=key)
    assert conv21.matches(set(sd21_original)) and conv21.matches(set(sd21_diffusers))
    assert not conv22.matches(set(sd21_original)) and not conv22.matches(set(sd21_diffusers))


def test_inferred_config(vae21):
    cfg = vae21.config
    assert (cfg.dim, cfg.z_dim, cfg.dim_mult, cfg.num_res_blocks) == (8, 16, (1, 2, 4, 4), 2)
    assert cfg.temporal_downsample == (False, True, True)
    assert cfg.latent_mean == W.LATENT_MEAN and cfg.latent_std == W.LATENT_STD
    assert cfg.param_dtype == "float32"
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(vae21, nnx.Param)))


def test_decoder_matches_diffusers(ref21, latents21, decoded21):
    mean, std = latent_stats(W.LATENT_MEAN, W.LATENT_STD, 16)
    with torch.no_grad():
        ref = to_cl(ref21.decode(to_cf(latents21) * std + mean).sample)
    assert decoded21.shape == ref.shape == (1, 13, 32, 48, 3)  # 4 latents -> 1 + 4·3 frames
    assert np.mean(np.abs(ref) >= 1.0) < 0.1  # the clamp does not hide the comparison
    err = rel_l2(decoded21, ref)
    print(f"wan2.1 decoder vs diffusers: rel L2 {err:.2e}")
    assert err <= PARITY_TOL


def test_streaming_decode_equals_whole(vae21, latents21, decoded21):
    z = jnp.asarray(latents21)
    step = W.jit_decode_chunk(vae21)
    cache0 = vae21.init_decoder_cache(1, 4, 6)
    assert len(cache0.entries) == 32 and not cache0.started  # SPEC §7: 32 causal-conv caches
    assert all(e.shape[1] == 2 and float(jnp.abs(e).max()) == 0 for e in cache0.entries)

    first, cache = step(z[:, :3], cache0)
    assert first.shape[1] == 9 and cache.started  # 1 + 4·2 frames
    rest, cache = step(z[:, 3:], cache)
    assert rest.shape[1] == 4
    err3 = float(jnp.abs(jnp.concatenate([first, rest], 1) - decoded21).max())

    again, _ = step(z[:, :3], cache0)  # pure: the input cache is not consumed or changed
    np.testing.assert_array_equal(np.asarray(again), np.asarray(first))

    frames, cache = [], cache0
    for t in range(z.shape[1]):
        out, cache = step(z[:, t:t + 1], cache)
        assert out.shape[1] == (1 if t == 0 else 4)
        frames.append(out)
    err1 = float(jnp.abs(jnp.concatenate(frames, 1) - decoded21).max())
    print(f"wan2.1 streaming decode max|Δ|: 3-latent chunks {err3:.1e}, 1-latent chunks {err1:.1e}")
    assert err3 <= STREAM_TOL and err1 <= STREAM_TOL


@pytest.fixture(scope="module")
def encoded21(vae21, video21) -> np.ndarray:
    return np.asarray(vae21.encode(jnp.asarray(video21)))


def test_encoder_matches_diffusers(ref21, video21, encoded21):
    mean, std = latent_stats(W.LATENT_MEAN, W.LATENT_STD, 16)
    with torch.no_grad():
        mu = ref21.encode(to_cf(video21)).latent_dist.mean
    ref = to_cl((mu - mean) / std)
    assert encoded21.shape == ref.shape == (1, 5, 4, 6, 16)
    err = rel_l2(encoded21, ref)
    print(f"wan2.1 encoder vs diffusers: rel L2 {err:.2e}")
    assert err <= PARITY_TOL


def test_streaming_encode_equals_whole(vae21, video21, encoded21):
    chunked = np.asarray(vae21.encode(jnp.asarray(video21), chunk_latents=1))  # upstream's 1, 4, 4, ...
    err = float(np.abs(chunked - encoded21).max())
    print(f"wan2.1 chunked encode max|Δ|: {err:.1e}")
    assert err <= STREAM_TOL


def test_i2v_condition(vae21, video21):
    image = jnp.asarray(video21[:, 0])
    cond = np.asarray(W.i2v_condition(vae21, image, 17))
    assert cond.shape == (1, 5, 4, 6, 20)
    np.testing.assert_array_equal(cond[:, 0, ..., :4], 1.0)
    np.testing.assert_array_equal(cond[:, 1:, ..., :4], 0.0)
    video = np.concatenate([video21[:, :1], np.zeros_like(video21[:, 1:])], axis=1)
    np.testing.assert_allclose(cond[..., 4:], np.asarray(vae21.encode(jnp.asarray(video))), atol=1e-6)
    assert np.abs(cond[:, 1:, ..., 4:]).max() > 1e-3  # VAE(black) latents are not zero

    cache = vae21.init_encoder_cache(1, 32, 48)
    parts = []
    for i, n in enumerate((3, 2)):  # SPEC §4: [image, 8 black] -> 3 latents, then black frames, carried state
        part, cache = W.i2v_condition_chunk(vae21, cache, n, image if i == 0 else None)
        assert part.shape[1] == n
        parts.append(np.asarray(part))
    err = float(np.abs(np.concatenate(parts, 1) - cond).max())
    print(f"wan2.1 streaming I2V conditioning max|Δ|: {err:.1e}")
    assert err <= STREAM_TOL


def test_bf16_compute(vae21, latents21, decoded21, sd21_original):
    vae = conv21.load_source(ArraySource(sd21_original), compute_dtype="bfloat16")
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(vae, nnx.Param)))
    cache = vae.init_decoder_cache(1, 4, 6)
    assert cache.entries[0].dtype == jnp.bfloat16
    out, cache = W.jit_decode_chunk(vae)(jnp.asarray(latents21[:, :1]), cache)
    assert out.dtype == jnp.float32 and cache.entries[-1].dtype == jnp.bfloat16
    err = rel_l2(out, decoded21[:, :1])
    print(f"wan2.1 bf16 compute vs fp32: rel L2 {err:.2e}")
    assert err < 5e-2


# ---------------------------------------------------------------------------------------------------
# Wan 2.1: converter round trips and errors.
# ---------------------------------------------------------------------------------------------------


def flat_params(module) -> dict[str, np.ndarray]:
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def test_convert_roundtrip_pth_and_diffusers(tmp_path, vae21, sd21_original, sd21_diffusers, latents21, decoded21):
    from safetensors.numpy import save_file

    pth = tmp_path / "Wan2.1_VAE.pth"
    torch.save({k: torch.from_numpy(v) for k, v in sd21_original.items()}, pth)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        open_source(pth)
    manifest = conv21.convert(open_source(pth, allow_pickle=True), tmp_path / "vae_orig")
    assert manifest["kind"] == "wan_vae" and manifest["layout"] == "original"
    assert manifest["config"]["dim"] == 8 and manifest["num_tensors"] == len(sd21_original)
    with pytest.raises(CheckpointError, match="exists"):
        conv21.convert(open_source(pth, allow_pickle=True), tmp_path / "vae_orig")

    st = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(sd21_diffusers, str(st))
    manifest = conv21.convert(st, tmp_path / "vae_diff", dtype="bfloat16")
    assert manifest["layout"] == "diffusers" and manifest["config"]["param_dtype"] == "bfloat16"

    expected = flat_params(vae21)
    loaded = conv21.load(tmp_path / "vae_orig")
    got = flat_params(loaded)
    assert set(got) == set(expected)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
    out, _ = W.jit_decode_chunk(loaded)(jnp.asarray(latents21), loaded.init_decoder_cache(1, 4, 6))
    np.testing.assert_array_equal(np.asarray(out), decoded21)  # same executable, same parameters

    loaded_bf16 = conv21.load(tmp_path / "vae_diff")
    got = flat_params(loaded_bf16)
    for k in expected:
        assert got[k].dtype == jnp.bfloat16
        np.testing.assert_array_equal(got[k], expected[k].astype(jnp.bfloat16), err_msg=k)


def test_converter_errors(sd21_original):
    bad = dict(sd21_original)
    del bad["decoder.upsamples.7.time_conv.bias"]
    bad["decoder.middle.1.bogus.weight"] = np.zeros((1,), np.float32)
    bad["decoder.head.0.gamma"] = np.ones((8,), np.float32)  # should be (8, 1, 1, 1)
    with pytest.raises(CheckpointError) as err:
        conv21.load_source(ArraySource(bad))
    msg = str(err.value)
    assert "decoder.upsamples.7.time_conv.bias" in msg and "missing" in msg
    assert "decoder.middle.1.bogus.weight" in msg and "unexpected" in msg
    assert "decoder.head.0.gamma: got [8], expected [8, 1, 1, 1]" in msg
    with pytest.raises(CheckpointError, match="wan2_2_vae"):
        conv21.infer_config(ArraySource({"decoder.head.2.weight": np.zeros((12, 16, 3, 3, 3)),
                                         "conv2.weight": np.zeros((16, 16, 1, 1, 1)),
                                         "decoder.upsamples.0.upsamples.0.residual.6.weight": np.zeros((4,))}))


def test_bad_inputs(vae21):
    cache = vae21.init_decoder_cache(1, 4, 6)
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 16\]"):
        vae21.decode_chunk(jnp.zeros((1, 2, 4, 6, 8)), cache)
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 16\]"):
        vae21.decode_chunk(jnp.zeros((2, 4, 6, 16)), cache)
    with pytest.raises(ValueError, match=r"latent size 4x6.*expected \[1, T, 4, 6, 16\]"):
        vae21.decode_chunk(jnp.zeros((1, 1, 4, 8, 16)), cache)
    with pytest.raises(ValueError, match="batch 1"):
        vae21.decode_chunk(jnp.zeros((2, 1, 4, 6, 16)), cache)
    # Consistent metadata but entries from another resolution: caught per entry, not decoded as garbage.
    other = vae21.init_decoder_cache(1, 2, 6)
    forged = W.CausalCache(other.entries, False, "decoder", 1, 4, 6)
    with pytest.raises(ValueError, match="cache entry 0 has shape"):
        vae21.decode_chunk(jnp.zeros((1, 1, 4, 6, 16)), forged)
    with pytest.raises(ValueError, match="decoder CausalCache"):
        vae21.decode_chunk(jnp.zeros((1, 1, 4, 6, 16)), vae21.init_encoder_cache(1, 32, 48))

    enc = vae21.init_encoder_cache(1, 32, 48)
    with pytest.raises(ValueError, match="multiples of 8"):
        vae21.encode(jnp.zeros((1, 1, 30, 48, 3)))
    with pytest.raises(ValueError, match=r"T = 1 \+ 4k"):
        vae21.encode_chunk(jnp.zeros((1, 4, 32, 48, 3)), enc)
    with pytest.raises(ValueError, match="pixel size 32x48"):
        vae21.encode_chunk(jnp.zeros((1, 1, 64, 48, 3)), enc)
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        W.i2v_condition(vae21, jnp.zeros((1, 32, 48, 4)), 5)
    with pytest.raises(ValueError, match="1 \\+ 4·k"):
        W.i2v_condition(vae21, jnp.zeros((1, 32, 48, 3)), 6)


# ---------------------------------------------------------------------------------------------------
# Wan 2.2 decoder.
# ---------------------------------------------------------------------------------------------------


def test_wan22_layout_and_config(sd22_original, sd22_diffusers, vae22):
    assert "decoder.upsamples.2.upsamples.0.shortcut.weight" in sd22_original  # level 2: 64 -> 32
    assert "decoder.upsamples.0.upsamples.3.time_conv.weight" in sd22_original
    assert conv22.matches(set(sd22_original)) and conv22.matches(set(sd22_diffusers))
    assert not conv21.matches(set(sd22_original)) and not conv21.matches(set(sd22_diffusers))
    cfg = vae22.config
    assert (cfg.dec_dim, cfg.z_dim, cfg.dim_mult, cfg.num_res_blocks) == (16, 48, (1, 2, 4, 4), 2)
    assert cfg.temporal_downsample == (False, True, True) and cfg.spatial_stride == 16


def test_wan22_decoder_matches_diffusers_and_streams(ref22, vae22):
    z = np.random.default_rng(3).standard_normal((2, 3, 3, 4, 48)).astype(np.float32)  # batch 2
    mean, std = latent_stats(W22.LATENT_MEAN, W22.LATENT_STD, 48)
    with torch.no_grad():
        ref = to_cl(ref22.decode(to_cf(z) * std + mean).sample)
    whole = np.asarray(vae22.decode(jnp.asarray(z)))
    assert whole.shape == ref.shape == (2, 9, 48, 64, 3)
    assert np.mean(np.abs(ref) >= 1.0) < 0.1
    err = rel_l2(whole, ref)
    chunked = np.asarray(vae22.decode(jnp.asarray(z), chunk_latents=1))
    serr = float(np.abs(chunked - whole).max())
    print(f"wan2.2 decoder vs diffusers: rel L2 {err:.2e}; 1-latent streaming max|Δ| {serr:.1e}")
    assert err <= PARITY_TOL and serr <= STREAM_TOL


def test_wan22_convert_roundtrip(tmp_path, sd22_original, sd22_diffusers, vae22):
    from safetensors.numpy import save_file

    manifest = conv22.convert(ArraySource(sd22_original, "Wan2.2_VAE (original keys)"), tmp_path / "orig")
    assert manifest["kind"] == "wan2_2_vae" and manifest["layout"] == "original"
    ignored = manifest["ignored_keys"]
    assert "conv1.weight" in ignored and all(k.startswith("encoder.") or k.startswith("conv1.") for k in ignored)
    assert len(ignored) == sum(k.startswith(("encoder.", "conv1.")) for k in sd22_original)

    st = tmp_path / "vae22.safetensors"
    save_file(sd22_diffusers, str(st))
    assert conv22.convert(st, tmp_path / "diff")["layout"] == "diffusers"
    expected = flat_params(vae22)
    for folder in ("orig", "diff"):
        got = flat_params(conv22.load(tmp_path / folder))
        assert set(got) == set(expected)
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k], err_msg=f"{folder}: {k}")
    with pytest.raises(CheckpointError, match="not 'wan_vae'"):
        conv21.load(tmp_path / "orig")

    bad = {k: v for k, v in sd22_original.items() if k != "decoder.upsamples.2.upsamples.3.resample.1.weight"}
    with pytest.raises(CheckpointError, match="decoder.upsamples.2 has no resampler"):
        conv22.load_source(ArraySource(bad))


def test_wan22_bad_inputs(vae22):
    cache = vae22.init_decoder_cache(1, 3, 4)
    with pytest.raises(ValueError, match=r"\[B, T, H, W, 48\]"):
        vae22.decode_chunk(jnp.zeros((1, 1, 3, 4, 16)), cache)
    with pytest.raises(ValueError, match="latent size 3x4"):
        vae22.decode_chunk(jnp.zeros((1, 1, 6, 4, 48)), cache)
