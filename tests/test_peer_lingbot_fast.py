"""The lingbot-fast peer adapter (`wm_jax.bench.peers.lingbot_fast`) run through `run_peer` on the CPU against a
tiny stand-in of the upstream checkout (written here: same module paths and the API surface the adapter touches,
not upstream's code): a `WanI2VFast.generate` that runs `len(timesteps)` denoise calls and one t = 0 call per
chunk, a small `WanModelFast` with a KV cache, `flash_attention` that fails if it is ever reached."""

import dataclasses
import textwrap

import pytest

pytest.importorskip("torch")

from wm_jax.bench.peers import check_checkout, run_peer  # noqa: E402
from wm_jax.bench.peers.job import PeerJob  # noqa: E402

BLOCKS, PASSES = 3, 4

UNREACHABLE_INIT = 'raise ImportError("this package __init__ must not run")\n'

CONFIGS = '''
import types

import torch

WAN_CONFIGS = {"i2v-A14B": types.SimpleNamespace(
    num_train_timesteps=1000, boundary=0.9, param_dtype=torch.bfloat16, vae_stride=(4, 8, 8), patch_size=(1, 2, 2),
    qk_norm=True, cross_attn_norm=True, sample_neg_prompt="", sample_shift=10.0)}
'''

ATTENTION = '''
import torch

FLASH_ATTN_2_AVAILABLE = False
FLASH_ATTN_3_AVAILABLE = False


def flash_attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                    causal=False, window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16, version=None):
    raise RuntimeError("stand-in: flash-attn is not installed")


def attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None, causal=False,
              window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16, fa_version=None):
    raise RuntimeError("stand-in: this fallback casts to bfloat16; a float32 job must not reach it")
'''

MODEL_FAST = '''
import types

import torch
from torch import nn

from wan.modules.attention import attention
from .attention import flash_attention

FAIL_AT = {fail_at!r}  # (generate call, chunk) whose first model call raises


class Layer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm = nn.LayerNorm(dim)


class WanModelFast(nn.Module):
    def __init__(self, model_type="t2v", control_type="cam", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=64,
                 ffn_dim=128, freq_dim=256, text_dim=32, out_dim=16, num_heads=2, num_layers=2, local_attn_size=-1,
                 sink_size=0, qk_norm=True, cross_attn_norm=True, eps=1e-6):
        super().__init__()
        assert local_attn_size == -1, "the stand-in keeps every frame"
        self.config = types.SimpleNamespace(dim=dim, num_heads=num_heads, num_layers=num_layers)
        self.heads, self.out_dim, self.rollout = num_heads, out_dim, 0
        self.patch = nn.Linear(in_dim * 4, dim)
        self.time = nn.Linear(1, dim)
        self.text = nn.Linear(text_dim, dim)
        self.layers = nn.ModuleList(Layer(dim) for _ in range(num_layers))
        self.head = nn.Linear(dim, out_dim * 4)

    def forward(self, x, t, context, seq_len, y=None, dit_cond_dict=None, kv_cache=None, crossattn_cache=None,
                current_start=0, max_attention_size=None):
        if FAIL_AT == (self.rollout, current_start // seq_len):
            raise RuntimeError("stand-in failure in chunk %d" % FAIL_AT[1])
        u = torch.cat([x[0], y[0]])
        c, f, h, w = u.shape
        tokens = u.reshape(c, f, h // 2, 2, w // 2, 2).permute(1, 2, 4, 0, 3, 5).reshape(1, -1, c * 4)
        hidden = self.patch(tokens) + self.time(t.float().reshape(1, 1, 1) / 1000)
        ctx = self.text(context[0])[None]
        end = current_start + hidden.shape[1]
        for layer, cache in zip(self.layers, kv_cache):
            split = lambda a: a.reshape(1, a.shape[1], self.heads, -1)
            q, k, v = split(layer.q(hidden)), split(layer.k(hidden)), split(layer.v(hidden))
            cache["k"][:, current_start:end], cache["v"][:, current_start:end] = k, v
            hidden = hidden + layer.o(attention(q, cache["k"][:, :end], cache["v"][:, :end]).flatten(2))
            hidden = hidden + flash_attention(split(layer.norm(hidden)), split(ctx), split(ctx)).flatten(2)
        out = self.head(hidden).reshape(f, h // 2, w // 2, self.out_dim, 2, 2)
        return [out.permute(3, 0, 1, 4, 2, 5).reshape(self.out_dim, f, h, w).float()]
'''

SCHEDULER = '''
import torch


class FlowUniPCMultistepScheduler:
    def __init__(self, num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False):
        self.num_train_timesteps = num_train_timesteps

    def set_timesteps(self, steps, shift=1.0):
        self.timesteps = torch.arange(steps - 1, -1, -1)
'''

IMAGE2VIDEO_FAST = '''
import numpy as np
import torch
import torchvision.transforms.functional as TF
from tqdm import tqdm

from .modules.model_fast import WanModelFast  # noqa: F401 (the adapter takes the class from here)
from .utils.fm_solvers_unipc import FlowUniPCMultistepScheduler  # noqa: F401


class WanI2VFast:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("stand-in: __init__ loads checkpoints; the adapter must bypass it")

    def _configure_model(self, model, use_sp, dit_fsdp, shard_fn, convert_model_dtype):
        return model.eval().requires_grad_(False)

    def generate(self, input_prompt, img, action_path=None, chunk_size=3, max_area=480 * 832, frame_num=81,
                 timesteps_index=[0, 21, 52, 174], shift=5.0, seed=-1, offload_model=True, max_sequence_length=512,
                 max_attention_size=None):
        self.model.rollout += 1
        poses = np.load(action_path + "/poses.npy")
        assert np.load(action_path + "/intrinsics.npy").shape == (len(poses), 4)
        frames = min((frame_num - 1) // 4 * 4 + 1, (len(poses) - 1) // 4 * 4 + 1)
        image = TF.to_tensor(img)
        aspect = image.shape[1] / image.shape[2]
        sides = [int(np.sqrt(max_area * a) // s // p * p)
                 for a, s, p in ((aspect, self.vae_stride[1], self.patch_size[1]),
                                 (1 / aspect, self.vae_stride[2], self.patch_size[2]))]
        lat_f = (frames - 1) // self.vae_stride[0] + 1
        lat_f -= lat_f % chunk_size
        noise = torch.randn(16, lat_f, *sides, generator=torch.Generator(self.device).manual_seed(seed))
        self.scheduler.set_timesteps(self.num_train_timesteps, shift=shift)
        timesteps = self.scheduler.timesteps[timesteps_index]
        context = self.text_encoder([input_prompt], self.device)
        video = torch.zeros(3, (lat_f - 1) * 4 + 1, sides[0] * 8, sides[1] * 8)
        y = torch.cat([torch.zeros(4, lat_f, *sides), self.vae.encode([video])[0]])
        tokens = sides[0] * sides[1] // 4
        cfg = self.model.config
        shape = (1, tokens * lat_f, cfg.num_heads, cfg.dim // cfg.num_heads)
        cache = [{"k": torch.zeros(shape, dtype=self.pipe_dtype), "v": torch.zeros(shape, dtype=self.pipe_dtype)}
                 for _ in range(cfg.num_layers)]
        out = []
        for chunk in tqdm(range(lat_f // chunk_size)):
            frames_of = slice(chunk * chunk_size, (chunk + 1) * chunk_size)
            kwargs = dict(context=context, seq_len=chunk_size * tokens, y=[y[:, frames_of]], kv_cache=cache,
                          current_start=chunk * chunk_size * tokens)
            x = noise[:, frames_of]
            for t in timesteps:
                x = x - 0.01 * self.model(x=[x], t=t.reshape(1), **kwargs)[0]
            out.append(x)
            self.model(x=[x], t=timesteps[-1:] * 0.0, **kwargs)
        return self.vae.decode([torch.cat(out, dim=1)])[0]
'''


def standin_checkout(root, fail_at=None):
    files = {
        "wan/__init__.py": UNREACHABLE_INIT,
        "wan/modules/__init__.py": UNREACHABLE_INIT,
        "wan/utils/__init__.py": UNREACHABLE_INIT,
        "wan/configs/__init__.py": CONFIGS,
        "wan/modules/attention.py": ATTENTION,
        "wan/modules/model_fast.py": MODEL_FAST.replace("{fail_at!r}", repr(fail_at)),
        "wan/utils/fm_solvers_unipc.py": SCHEDULER,
        "wan/image2video_fast.py": IMAGE2VIDEO_FAST,
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return str(root)


def tiny_job(upstream_dir):
    model = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=36, out_dim=16, text_dim=16, text_len=512,
                 freq_dim=256, eps=1e-6, image_dim=None, image_pos_tokens=None, camera_channels=384,
                 fp32_modulation=True, param_dtype="float32")
    return PeerJob(peer="lingbot-fast", upstream_dir=upstream_dir, model=model, pixel_height=64, pixel_width=96,
                   latent_height=4, latent_width=6, latent_channels=16, chunk_frames=3, tokens_per_frame=6,
                   total_blocks=BLOCKS, timesteps=[999.0, 978.0, 947.0, 825.0], context_timestep=0.0, shift=10.0,
                   sink_frames=0, ring_frames=None, text_tokens=5, dtype="float32", seed=3, device="cpu")


def test_lingbot_fast_records_every_chunk(tmp_path):
    upstream = standin_checkout(tmp_path / "lingbot-world")
    assert check_checkout("lingbot-fast", upstream).path == upstream  # the stand-in has the peer's marker files
    result = run_peer(tiny_job(upstream), timeout_s=120)
    assert result["error"] is None and result["returncode"] == 0, result.get("output_tail")

    chunks = result["chunks"]
    assert [c["autoregressive_index"] for c in chunks] == list(range(BLOCKS))
    for c in chunks:
        assert len(c["pass_ms"]) == PASSES + 1 and all(ms > 0 for ms in c["pass_ms"])
        assert c["denoise_ms"] == pytest.approx(sum(c["pass_ms"][:PASSES]))
        assert c["commit_ms"] == c["pass_ms"][-1]

    notes = "\n".join(result["notes"])
    for expected in ("stub: T5 text encoder", "stub: Wan VAE", "flash_attention", "wan.modules.model_fast.flash_attention",
                     "__init__ bypassed", "registered as empty packages", "warm-up", "outside the model"):
        assert expected in notes, expected

    config = result["config"]
    assert config["latent_shape"] == [16, BLOCKS * 3, 4, 6] and config["chunk_size"] == 3
    assert config["frame_num"] == (BLOCKS * 3 - 1) * 4 + 1 and config["vae_encode_input"] == [3, 33, 32, 48]
    assert config["timesteps"] == [999.0, 978.0, 947.0, 825.0] and config["context_timestep"] == 0.0
    assert config["kv_cache_shape"] == [1, 6 * BLOCKS * 3, 2, 16]
    assert (config["local_attn_size"], config["sink_size"]) == (-1, 0)
    assert config["model"]["dim"] == 32 and config["model"]["control_type"] == "cam" and config["num_params"] > 0
    assert len(config["outside_model_ms"]) == BLOCKS


def test_lingbot_fast_keeps_chunks_before_a_failure(tmp_path):
    # the model fails in chunk 2 of the timed rollout (after the warm-up one)
    upstream = standin_checkout(tmp_path / "lingbot-world", fail_at=(2, 2))
    result = run_peer(dataclasses.replace(tiny_job(upstream), warmup_rollouts=1), timeout_s=120)
    assert result["returncode"] == 1
    assert "stand-in failure in chunk 2" in result["error"]
    assert [c["autoregressive_index"] for c in result["chunks"]] == [0, 1]
    assert all(len(c["pass_ms"]) == PASSES + 1 for c in result["chunks"])


def test_lingbot_fast_geometry_and_cache():
    from wm_jax.bench.peers.lingbot_fast import max_area_for

    for latent, pixels in [((58, 104), (464, 832)), ((60, 104), (480, 832)), ((4, 6), (64, 96)), ((90, 160), (720, 1280))]:
        area = max_area_for(latent, pixels, (4, 8, 8), (1, 2, 2))
        aspect = pixels[0] / pixels[1]
        assert int((area * aspect) ** 0.5 // 8 // 2 * 2) == latent[0]
        assert int((area / aspect) ** 0.5 // 8 // 2 * 2) == latent[1]
    with pytest.raises(ValueError):
        max_area_for((58, 104), (832, 464), (4, 8, 8), (1, 2, 2))  # the image's aspect cannot give that grid

    job = tiny_job("unused")
    assert job.upstream_cache() == (-1, 0)
    # window_frames = ring frames (no sink, no current chunk): upstream's buffer holds all three
    assert dataclasses.replace(job, sink_frames=3, ring_frames=12).upstream_cache() == (18, 3)


def test_chunks_take_a_missing_last_commit_only_when_asked(tmp_path):
    from wm_jax.bench.peers.job import ResultWriter
    from wm_jax.bench.peers.torch_timing import ChunkGrouper

    writer = ResultWriter(tmp_path / "result.json", "lingbot-fast")
    chunks = ChunkGrouper(writer, 2, context=0.0, total=2)
    for ms, t in [(3.0, 999.0), (2.0, 978.0), (1.0, 0.0), (4.0, 999.0), (5.0, 978.0)]:
        chunks.add(ms, t)
    with pytest.raises(RuntimeError, match="ran 1 full chunks \\(\\+2 calls\\)"):
        chunks.finish()
    chunks.finish(last_commit_optional=True)
    assert writer.data["chunks"][1] == {"autoregressive_index": 1, "denoise_ms": 9.0, "commit_ms": 0.0,
                                        "pass_ms": [4.0, 5.0]}
    assert "skipped the commit pass after the last chunk (1)" in writer.data["notes"][-1]
    unclosed = ChunkGrouper(writer, 2, context=0.0, total=1)
    unclosed.add(1.0, 999.0)
    unclosed.add(1.0, 978.0)
    with pytest.raises(RuntimeError, match="chunk 0 made model calls at t = \\[999.0, 978.0, 947.0\\]"):
        unclosed.add(1.0, 947.0)  # a third denoise call, no commit
