"""Device memory: the estimate matches the real buffers, the pre-check, XLA out-of-memory -> DeviceMemoryError."""

import dataclasses
import re

import jax
import numpy as np
import pytest

from wm_jax.cli import flag_style
from wm_jax.streaming import memory
from tests.conftest import plan_of
from wm_jax.streaming.engine import WorldRollout
from wm_jax.streaming.kv_cache import CacheLayout
from wm_jax.streaming.memory import GIB, DeviceMemoryError, MemoryEstimate, RolloutSize

OOM = "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123456789 bytes."


def tiny_rollout(recipe, parts, **changes) -> WorldRollout:
    recipe = recipe.replace(**changes)
    return WorldRollout(recipe, plan_of(recipe), parts.dit, parts.decoder, seed=0,
                        vae_encoder=parts.vae_encoder if recipe.task == "i2v_camera" else None)


def test_estimate_matches_the_allocated_rollout(tiny_parts):
    rollout = tiny_rollout(*tiny_parts)
    plan = rollout.plan
    rollout.start(tiny_parts[1].encode_prompt("a road"), image=np.zeros((plan.pixel_height, plan.pixel_width, 3),
                                                                          np.uint8))
    s, estimate = rollout.state, rollout.memory
    assert estimate.kv_cache == s.cache.k.nbytes + s.cache.v.nbytes
    assert estimate.cross_kv == memory.tree_nbytes(s.cross_kv)
    assert estimate.vae_state == memory.tree_nbytes(s.decoder_state, s.encoder_cache)
    assert estimate.dit_weights == memory.tree_nbytes(rollout.step.params)
    assert estimate.vae_weights == memory.tree_nbytes(rollout.decoder.weights)  # the shared VAE counted once
    assert "KV cache" in estimate.describe() and "total" in estimate.describe()


@pytest.mark.parametrize("window_frames, blocks_hint", [(6, False), (None, True)])
def test_too_small_device_fails_before_compiling(tiny_parts, monkeypatch, window_frames, blocks_hint):
    estimate = tiny_rollout(*tiny_parts, window_frames=window_frames).memory  # CPU: no capacity, no check
    capacity = (estimate.fixed_bytes + estimate.known) // 2  # the weights fit, the cache does not
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
    monkeypatch.setattr(memory, "device_capacity", lambda device=None: capacity)
    with pytest.raises(DeviceMemoryError) as info:
        tiny_rollout(*tiny_parts, window_frames=window_frames)
    message = info.value.render(flag_style)  # as the CLI prints it
    assert compiles == []
    assert message.startswith("not enough device memory (checked before compiling): this rollout needs about "
                              f"{estimate.total / GIB:.2f} GiB, the device (cpu) has {capacity / GIB:.2f} GiB.")
    assert re.search(rf"\n  KV cache +{estimate.kv_cache / GIB:.2f} GiB\n", message)
    assert "DiT weights" in message and "total" in message
    assert "--pixel_height" in message and "--compute_dtype bfloat16 (now float32" in message
    assert ("--total_blocks" in message) == blocks_hint and "window15-sink3" not in message


@pytest.mark.parametrize("phase", ["compiling", "denoising", "committing", "decoding"])
def test_xla_out_of_memory_becomes_device_memory_error(tiny_parts, monkeypatch, phase):
    rollout = tiny_rollout(*tiny_parts, task="t2v")  # no I2V encoder: only the patched programs would run
    rollout.start(tiny_parts[1].encode_prompt("a road"))
    fail = _raiser(jax.errors.JaxRuntimeError(OOM))
    _patch_programs(rollout, monkeypatch, phase, fail)
    with pytest.raises(DeviceMemoryError) as info:
        rollout.next_chunk()
    message = info.value.render(flag_style)
    assert message.startswith(f"out of device memory while {phase}") and "this rollout needs about" in message
    assert "KV cache" in message and "--pixel_height" in message and f"XLA: {OOM}" in message
    assert isinstance(info.value.__cause__, jax.errors.JaxRuntimeError)


def test_other_xla_errors_pass_through(tiny_parts, monkeypatch):
    rollout = tiny_rollout(*tiny_parts, task="t2v")
    rollout.start(tiny_parts[1].encode_prompt("a road"))
    _patch_programs(rollout, monkeypatch, "denoising", _raiser(jax.errors.JaxRuntimeError("INTERNAL: bad")))
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL: bad"):
        rollout.next_chunk()


def _raiser(err):
    def fail(*args, **kwargs):
        raise err
    return fail


def _patch_programs(rollout, monkeypatch, phase, fail):
    """Replaces compile / denoise / commit / decode by stand-ins; `fail` stands in for `phase`."""
    def compile_(inputs):
        if phase == "compiling":
            fail()
        rollout._denoise = fail if phase == "denoising" else lambda params, cache, cross, noise, inputs: noise[0]
        rollout._commit = fail if phase == "committing" else lambda params, cache, *args: cache

    monkeypatch.setattr(rollout, "_compile", compile_)
    monkeypatch.setattr(rollout, "decoder", dataclasses.replace(rollout.decoder, step=fail))


def test_reduction_flags_for_lingbot_global_cache(monkeypatch):
    monkeypatch.delenv(memory.MEM_FRACTION_VAR, raising=False)
    layout = CacheLayout(1508, sink_frames=60, ring_frames=0)
    estimate = MemoryEstimate(dit_weights=30 * GIB, kv_cache=61 * GIB, cross_kv=GIB // 10, vae_weights=GIB // 2,
                              vae_state=GIB, activations=3 * GIB)
    size = RolloutSize("lingbot-world-fast", 464, 832, 20, layout, "float32")
    share, pixels, blocks, window, dtype = memory.reduction_flags(size, estimate, capacity=80 * GIB)
    assert share.startswith("XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 in the environment")
    # 80 - (95.6 - 61) - 1 GiB per frame leaves 44.4 GiB: 14 blocks of 3 GiB
    assert blocks.startswith("{total_blocks} 14 or fewer (now 20;") and "3.00 GiB per block" in blocks
    assert pixels.startswith("{pixel_height} ") and "(now 464x832;" in pixels
    assert window.startswith("wm-jax run lingbot-world-fast-taehv-window15-sink3")
    assert dtype.startswith("{compute_dtype} bfloat16")
    height, width = (int(v) for v in pixels.split()[1:4:2])
    scale = height * width / (464 * 832)
    assert height % 16 == width % 16 == 0 and 30.6 + 65 * scale <= 80  # the suggested size fits
    monkeypatch.setenv(memory.MEM_FRACTION_VAR, "0.9")
    assert memory.reduction_flags(size, estimate, capacity=20 * GIB) == [
        "no flag: the weights, cross-attention K/V and other buffers alone take 30.60 GiB; "
        "this model needs a device with more memory"]


def test_cli_prints_the_message_without_traceback(capsys):
    from wm_jax import cli

    def main(argv):
        raise DeviceMemoryError("not enough device memory (checked before compiling): ...")

    with pytest.raises(SystemExit) as exit_info:
        cli._friendly_errors(main)(["wm-jax run"])
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "wm-jax: error: not enough device memory (checked before compiling): ...\n"
