"""Wan DiT converters: every layout round-trips to the same parameters; bad input fails clearly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from converters import wan_dit
from converters.core import plan_conversion
from wm_jax.io import checkpoint as ckpt
from wm_jax.io.hub import HubError, download
from wm_jax.io.safetensors_io import CheckpointError, open_safetensors
from wm_jax.io.tensor_sources import ArraySource, open_source
from wm_jax.models.config import CLIP_DIM, WanConfig
from tests.wan_testlib import TINY, diffusers_model, original_key_shapes, random_original_state

CFG = WanConfig(**TINY)
LINGBOT = WanConfig(**TINY, in_dim=36, camera_channels=384)


def _flat(model):
    from flax import nnx
    return {"/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_params(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def _save_sharded(state, folder: Path, shards: int = 3):
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    weight_map, total = {}, 0
    for s in range(shards):
        name = f"diffusion_pytorch_model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[s::shards]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
        total += sum(v.nbytes for v in part.values())
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def state():
    return random_original_state(LINGBOT, seed=5)


@pytest.fixture(scope="module")
def reference(state):
    return wan_dit.load_source(ArraySource(state))


def test_rules_cover_every_parameter_of_every_variant():
    for cfg in (CFG, LINGBOT, WanConfig(**TINY, in_dim=36, image_dim=CLIP_DIM, image_pos_tokens=514)):
        shapes = original_key_shapes(cfg)
        plan, ignored = plan_conversion(ArraySource({k: np.zeros(s, np.float32) for k, s in shapes.items()}),
                                        wan_dit.RULES, wan_dit.expected_params(cfg))
        assert len(plan) == len(shapes) and not ignored


def test_single_file_convert_and_load_roundtrip(state, reference, tmp_path):
    save_file(state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    manifest = wan_dit.convert(open_source(tmp_path / "diffusion_pytorch_model.safetensors"), tmp_path / "out")
    assert manifest["config"]["camera_channels"] == 384 and manifest["config"]["num_heads"] == 2
    _assert_same_params(wan_dit.load(tmp_path / "out"), reference)


def test_sharded_index_roundtrip_and_config_json(state, reference, tmp_path):
    _save_sharded(state, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({"num_heads": 2, "eps": 1e-6, "dim": 256}))
    src = tmp_path / "ckpt" / "diffusion_pytorch_model.safetensors.index.json"
    wan_dit.convert(open_source(src), tmp_path / "out", source_path=src)
    _assert_same_params(wan_dit.load(tmp_path / "out"), reference)
    # a folder holding the index resolves to the same thing
    _assert_same_params(wan_dit.load_source(open_source(tmp_path / "ckpt")), reference)


def test_diffusers_layout_roundtrip(tmp_path):
    cfg = WanConfig(**TINY, in_dim=36, image_dim=CLIP_DIM)
    state = random_original_state(cfg, seed=6)
    diffusers_state = {k: v.numpy() for k, v in diffusers_model(cfg, state).state_dict().items()}
    save_file(diffusers_state, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    from_diffusers = wan_dit.load_source(open_source(tmp_path / "diffusion_pytorch_model.safetensors"))
    _assert_same_params(from_diffusers, wan_dit.load_source(ArraySource(state)))


def test_self_forcing_pt_prefers_generator_ema(tmp_path):
    ema = random_original_state(CFG, seed=7)
    other = random_original_state(CFG, seed=8)
    as_torch = lambda s: {f"model.{k}": torch.from_numpy(v) for k, v in s.items()}
    torch.save({"generator": as_torch(other), "generator_ema": as_torch(ema),
                "critic": {"model.x": torch.zeros(1)}}, tmp_path / "self_forcing_dmd.pt")
    with pytest.raises(CheckpointError, match="Pass allow_pickle if you trust"):
        open_source(tmp_path / "self_forcing_dmd.pt")
    source = open_source(tmp_path / "self_forcing_dmd.pt", allow_pickle=True,
                         prefer_entries=("generator_ema", "generator"))
    _assert_same_params(wan_dit.load_source(source), wan_dit.load_source(ArraySource(ema)))
    # safetensors exports of the same training state carry the entry name in the key
    flat = {f"generator_ema.model.{k}": v for k, v in ema.items()}
    flat.update({f"generator.model.{k}": v for k, v in other.items()})
    flat["critic.model.blocks.0.x"] = np.zeros(1, np.float32)
    save_file(flat, str(tmp_path / "sf.safetensors"))
    _assert_same_params(wan_dit.load_source(open_source(tmp_path / "sf.safetensors")),
                        wan_dit.load_source(ArraySource(ema)))


def test_expert_pair_folder(state, reference, tmp_path):
    low = random_original_state(LINGBOT, seed=9)
    _save_sharded(state, tmp_path / "src" / "high_noise_model", shards=2)
    _save_sharded(low, tmp_path / "src" / "low_noise_model", shards=2)
    manifest = wan_dit.convert_experts(tmp_path / "src", tmp_path / "out", open_fn=open_source)
    assert manifest["boundary"] == 0.947  # LingBot base (camera layers)
    pair = wan_dit.load_experts(tmp_path / "out")
    _assert_same_params(pair.high_noise, reference)
    assert pair.select(947) is pair.high_noise and pair.select(946) is pair.low_noise


def test_bf16_storage_keeps_norms_and_modulation_fp32(state, tmp_path):
    save_file(state, str(tmp_path / "m.safetensors"))
    wan_dit.convert(open_source(tmp_path / "m.safetensors"), tmp_path / "out", dtype="bfloat16")
    params = _flat(wan_dit.load(tmp_path / "out"))
    assert params["blocks/ffn/fc1/kernel"].dtype.name == "bfloat16"
    assert params["blocks/modulation"].dtype == np.float32
    assert params["blocks/self_attn/norm_q/scale"].dtype == np.float32


# --------------------------------------------------------------------------------------------------
# Bad input.
# --------------------------------------------------------------------------------------------------


def test_missing_unexpected_and_misshaped_keys_are_named(state):
    broken = dict(state)
    del broken["blocks.1.ffn.0.weight"]
    broken["blocks.0.surprise.weight"] = np.zeros((3,), np.float32)
    broken["blocks.0.self_attn.q.bias"] = np.zeros((7,), np.float32)
    with pytest.raises(CheckpointError) as err:
        wan_dit.load_source(ArraySource(broken, "broken.safetensors"))
    msg = str(err.value)
    assert "broken.safetensors" in msg
    assert "blocks.1.ffn.0.weight (expected shape [512, 256])" in msg
    assert "blocks.0.surprise.weight" in msg
    assert "blocks.0.self_attn.q.bias: got [7], expected [256]" in msg


def test_truncated_and_corrupt_safetensors(state, tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(state, str(path))
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="trunc.safetensors: truncated"):
        open_safetensors(tmp_path / "trunc.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="garbage.safetensors: corrupt safetensors header"):
        open_safetensors(tmp_path / "garbage.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match="truncated"):
        open_safetensors(tmp_path / "tiny.safetensors")


def test_index_pointing_at_missing_shard(state, tmp_path):
    _save_sharded(state, tmp_path)
    os.remove(tmp_path / "diffusion_pytorch_model-00002-of-00003.safetensors")
    with pytest.raises(CheckpointError, match="missing.*00002-of-00003"):
        open_source(tmp_path / "diffusion_pytorch_model.safetensors.index.json")


def test_existing_destination_refused_unless_overwrite(state, tmp_path):
    save_file(state, str(tmp_path / "m.safetensors"))
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="pass overwrite to replace it"):
        wan_dit.convert(open_source(tmp_path / "m.safetensors"), tmp_path / "out")
    wan_dit.convert(open_source(tmp_path / "m.safetensors"), tmp_path / "out", overwrite=True)
    assert ckpt.read_manifest(tmp_path / "out")["kind"] == "wan_dit"


def test_interrupted_conversion_leaves_nothing(state, tmp_path):
    save_file(state, str(tmp_path / "m.safetensors"))
    seen = []

    def interrupt(key):
        seen.append(key)
        if len(seen) == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        wan_dit.convert(open_source(tmp_path / "m.safetensors"), tmp_path / "out", on_tensor=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_hub_offline_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="(?s)robbyant/lingbot-world-fast.*HF_HUB_OFFLINE.*hf download"):
        download("robbyant/lingbot-world-fast", ["*.json"], cache_dir=str(tmp_path))


# --------------------------------------------------------------------------------------------------
# The command line, as a user runs it.
# --------------------------------------------------------------------------------------------------


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "wm_jax.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})})


def test_cli_convert(state, reference, tmp_path):
    _save_sharded(state, tmp_path / "ckpt")
    ok = _cli("convert", "--src", str(tmp_path / "ckpt"), "--dst", str(tmp_path / "out"))
    assert ok.returncode == 0, ok.stderr
    assert "wan_dit" in ok.stdout
    _assert_same_params(wan_dit.load(tmp_path / "out"), reference)
    again = _cli("convert", "--src", str(tmp_path / "ckpt"), "--dst", str(tmp_path / "out"))
    assert again.returncode == 1 and "destination exists; pass --overwrite" in again.stderr
    torch.save({"x": torch.zeros(1)}, tmp_path / "m.pt")
    refused = _cli("convert", "--src", str(tmp_path / "m.pt"), "--dst", str(tmp_path / "o2"))
    assert refused.returncode == 1 and "--allow_pickle" in refused.stderr and "execute code" in refused.stderr
    offline = _cli("convert", "--hub_repo", "robbyant/lingbot-world-fast", "--dst", str(tmp_path / "o3"),
                   env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert offline.returncode == 1 and "cannot download robbyant/lingbot-world-fast" in offline.stderr
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
