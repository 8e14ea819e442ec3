"""The Self-Forcing peer adapter (`wm_jax.bench.peers.self_forcing`) run through `run_peer` on the CPU against a
small stand-in of the upstream checkout: the same module paths and the API surface the adapter touches
(package __init__s that must not run, a CUDA-only `demo_utils.memory`, a `flash_attention` that must be
routed away, a `from_pretrained` that must not be reached, hard-coded 480x832 cache sizes), written here."""

import textwrap

import pytest

pytest.importorskip("torch")

from wm_jax.bench.peers import run_peer  # noqa: E402
from wm_jax.bench.peers.job import PeerJob  # noqa: E402

STEPS = [1000.0, 750.0, 500.0, 250.0]

STAND_IN = {
    "pipeline/__init__.py": """
        raise RuntimeError("stand-in: the adapter must not run pipeline/__init__.py")
    """,
    "wan/__init__.py": """
        raise RuntimeError("stand-in: the adapter must not run wan/__init__.py")
    """,
    "wan/modules/__init__.py": """
        raise RuntimeError("stand-in: the adapter must not run wan/modules/__init__.py")
    """,
    "demo_utils/memory.py": """
        raise RuntimeError("stand-in: this module needs a CUDA device at import")
    """,
    "wan/modules/attention.py": """
        import torch

        FLASH_ATTN_2_AVAILABLE = False
        FLASH_ATTN_3_AVAILABLE = False


        def flash_attention(q, k, v, q_lens=None, k_lens=None, **kwargs):
            raise RuntimeError("stand-in: flash-attn is not installed")


        def attention(q, k, v, q_lens=None, k_lens=None, dropout_p=0.0, softmax_scale=None, q_scale=None,
                      causal=False, window_size=(-1, -1), deterministic=False, dtype=torch.bfloat16,
                      fa_version=None):
            if FLASH_ATTN_2_AVAILABLE or FLASH_ATTN_3_AVAILABLE:
                return flash_attention(q, k, v, q_lens=q_lens, k_lens=k_lens)
            q, k, v = (x.transpose(1, 2).to(dtype) for x in (q, k, v))
            return torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).contiguous()
    """,
    "wan/modules/model.py": """
        import torch
        from torch import nn
        from wm_stand_in_absent_pkg.helpers import never_called  # noqa: F401 - a package CI does not have

        from .attention import flash_attention


        class CrossAttention(nn.Module):
            def __init__(self, dim, num_heads):
                super().__init__()
                self.num_heads, self.head_dim = num_heads, dim // num_heads
                self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

            def forward(self, x, context, cache):
                b = x.shape[0]
                q = self.q(x).view(b, -1, self.num_heads, self.head_dim)
                if not cache["is_init"]:
                    cache["k"] = self.k(context).view(b, -1, self.num_heads, self.head_dim)
                    cache["v"] = self.v(context).view(b, -1, self.num_heads, self.head_dim)
                    cache["is_init"] = True
                return self.o(flash_attention(q, cache["k"], cache["v"]).flatten(2))
    """,
    "wan/modules/causal_model.py": """
        import math

        import torch
        from torch import nn

        from wan.modules.attention import attention
        from wan.modules.model import CrossAttention


        class SelfAttention(nn.Module):
            def __init__(self, dim, num_heads, local_attn_size=-1):
                super().__init__()
                self.num_heads, self.head_dim = num_heads, dim // num_heads
                self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
                self.max_attention_size = 32760 if local_attn_size == -1 else local_attn_size * 1560

            def forward(self, x, cache, start):
                b, s, _ = x.shape
                q, k, v = self.qkv(x).view(b, s, 3, self.num_heads, self.head_dim).unbind(2)
                end = start + s
                cache["k"][:, start:end] = k
                cache["v"][:, start:end] = v
                lo = max(0, end - self.max_attention_size)
                cache["global_end_index"].fill_(end)
                cache["local_end_index"].fill_(end)
                return self.o(attention(q, cache["k"][:, lo:end], cache["v"][:, lo:end]).flatten(2))


        class Block(nn.Module):
            def __init__(self, dim, ffn_dim, num_heads, local_attn_size, eps):
                super().__init__()
                self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
                self.self_attn = SelfAttention(dim, num_heads, local_attn_size)
                self.cross_attn = CrossAttention(dim, num_heads)
                self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))

            def forward(self, x, e, context, kv_cache, crossattn_cache, start):
                x = x + self.self_attn(self.norm1(x) + e, kv_cache, start)
                x = x + self.cross_attn(x, context, crossattn_cache)
                return x + self.ffn(self.norm2(x))


        class CausalWanModel(nn.Module):
            def __init__(self, model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=2048,
                         ffn_dim=8192, freq_dim=256, text_dim=4096, out_dim=16, num_heads=16, num_layers=32,
                         local_attn_size=-1, sink_size=0, qk_norm=True, cross_attn_norm=True, eps=1e-6):
                super().__init__()
                self.model_type, self.patch_size, self.text_len = model_type, patch_size, text_len
                self.in_dim, self.dim, self.ffn_dim, self.freq_dim = in_dim, dim, ffn_dim, freq_dim
                self.text_dim, self.out_dim, self.num_heads, self.num_layers = text_dim, out_dim, num_heads, num_layers
                self.local_attn_size, self.qk_norm, self.cross_attn_norm, self.eps = (
                    local_attn_size, qk_norm, cross_attn_norm, eps)
                self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
                self.text_embedding = nn.Linear(text_dim, dim)
                self.time_embedding = nn.Linear(freq_dim, dim)
                self.blocks = nn.ModuleList(Block(dim, ffn_dim, num_heads, local_attn_size, eps)
                                            for _ in range(num_layers))
                self.head = nn.Linear(dim, out_dim * math.prod(patch_size))
                self.num_frame_per_block = 1

            @classmethod
            def from_pretrained(cls, path, **kwargs):
                raise FileNotFoundError(f"stand-in: no checkpoint at {path}")

            def forward(self, x, t, context, seq_len, kv_cache=None, crossattn_cache=None, current_start=0,
                        cache_start=None):
                b, _, f, h, w = x.shape
                x = self.patch_embedding(x).flatten(2).transpose(1, 2)
                assert x.shape[1] <= seq_len
                half = self.freq_dim // 2
                angles = t.flatten().double()[:, None] * torch.exp(-torch.arange(half, device=x.device) / half)
                e = self.time_embedding(torch.cat([angles.cos(), angles.sin()], 1).to(x.dtype))
                e = e.view(b, f, 1, -1).expand(b, f, x.shape[1] // f, -1).reshape(x.shape)
                context = self.text_embedding(context)
                for i, block in enumerate(self.blocks):
                    x = block(x, e, context, kv_cache[i], crossattn_cache[i], current_start)
                x = self.head(x).view(b, f, h // 2, w // 2, self.out_dim, 2, 2)
                return x.permute(0, 4, 1, 2, 5, 3, 6).reshape(b, self.out_dim, f, h, w)
    """,
    "utils/wan_wrapper.py": """
        import torch

        from wan.modules.causal_model import CausalWanModel

        FAIL_AT_CALL = {fail_at_call}


        class Scheduler:
            def __init__(self, shift):
                sigmas = torch.linspace(1.0, 0.0, 1001)[:-1]
                self.sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
                self.timesteps = self.sigmas * 1000

            def sigma(self, t):
                index = torch.argmin((self.timesteps.to(t.device)[None] - t.flatten()[:, None]).abs(), dim=1)
                return self.sigmas.to(t.device)[index].view(-1, 1, 1, 1)

            def add_noise(self, x0, noise, t):
                sigma = self.sigma(t).to(x0.dtype)
                return ((1 - sigma) * x0 + sigma * noise).type_as(noise)


        class WanDiffusionWrapper(torch.nn.Module):
            def __init__(self, model_name="stand-in", timestep_shift=8.0, is_causal=False, local_attn_size=-1,
                         sink_size=0):
                super().__init__()
                self.model = CausalWanModel.from_pretrained(f"wan_models/{{model_name}}/",
                                                            local_attn_size=local_attn_size, sink_size=sink_size)
                self.model.eval()
                self.scheduler = Scheduler(timestep_shift)
                self.seq_len = 32760
                self.calls = 0

            def get_scheduler(self):
                return self.scheduler

            def forward(self, noisy_image_or_video, conditional_dict, timestep, kv_cache=None,
                        crossattn_cache=None, current_start=None, cache_start=None):
                self.calls += 1
                if FAIL_AT_CALL is not None and self.calls >= FAIL_AT_CALL:
                    raise RuntimeError("stand-in generator failed in block 2")
                flow = self.model(noisy_image_or_video.permute(0, 2, 1, 3, 4), t=timestep,
                                  context=conditional_dict["prompt_embeds"], seq_len=self.seq_len,
                                  kv_cache=kv_cache, crossattn_cache=crossattn_cache,
                                  current_start=current_start).permute(0, 2, 1, 3, 4)
                sigma = self.scheduler.sigma(timestep).to(flow.dtype).view(*flow.shape[:2], 1, 1, 1)
                return flow, noisy_image_or_video - sigma * flow
    """,
    "pipeline/causal_inference.py": """
        import torch

        from demo_utils.memory import gpu  # noqa: F401
        from utils.wan_wrapper import WanDiffusionWrapper


        class CausalInferencePipeline(torch.nn.Module):
            def __init__(self, args, device, generator=None, text_encoder=None, vae=None):
                super().__init__()
                self.generator = WanDiffusionWrapper(**getattr(args, "model_kwargs", {{}}), is_causal=True) \\
                    if generator is None else generator
                self.text_encoder, self.vae = text_encoder, vae
                self.scheduler = self.generator.get_scheduler()
                steps = torch.tensor(args.denoising_step_list, dtype=torch.long)
                if args.warp_denoising_step:
                    steps = torch.cat((self.scheduler.timesteps, torch.tensor([0.0])))[1000 - steps]
                self.denoising_step_list = steps
                self.num_transformer_blocks = 30
                self.frame_seq_length = 1560
                self.kv_cache1 = None
                self.args = args
                self.num_frame_per_block = getattr(args, "num_frame_per_block", 1)
                self.local_attn_size = self.generator.model.local_attn_size

            def _initialize_kv_cache(self, batch_size, dtype, device):
                size = 32760 if self.local_attn_size == -1 else self.local_attn_size * self.frame_seq_length
                self.kv_cache1 = [{{"k": torch.zeros([batch_size, size, 12, 128], dtype=dtype, device=device),
                                   "v": torch.zeros([batch_size, size, 12, 128], dtype=dtype, device=device),
                                   "global_end_index": torch.tensor([0], dtype=torch.long, device=device),
                                   "local_end_index": torch.tensor([0], dtype=torch.long, device=device)}}
                                  for _ in range(self.num_transformer_blocks)]

            def _initialize_crossattn_cache(self, batch_size, dtype, device):
                self.crossattn_cache = [{{"k": torch.zeros([batch_size, 512, 12, 128], dtype=dtype, device=device),
                                         "v": torch.zeros([batch_size, 512, 12, 128], dtype=dtype, device=device),
                                         "is_init": False}} for _ in range(self.num_transformer_blocks)]

            def inference(self, noise, text_prompts, initial_latent=None, return_latents=False, profile=False,
                          low_memory=False):
                b, frames = noise.shape[:2]
                n = self.num_frame_per_block
                cond = self.text_encoder(text_prompts=text_prompts)
                output = torch.zeros_like(noise)
                if self.kv_cache1 is None:
                    self._initialize_kv_cache(batch_size=b, dtype=noise.dtype, device=noise.device)
                    self._initialize_crossattn_cache(batch_size=b, dtype=noise.dtype, device=noise.device)
                start = 0
                for _ in range(frames // n):
                    x = noise[:, start:start + n]
                    for i, t in enumerate(self.denoising_step_list):
                        timestep = torch.ones([b, n], device=noise.device, dtype=torch.int64) * t
                        _, x0 = self.generator(noisy_image_or_video=x, conditional_dict=cond, timestep=timestep,
                                               kv_cache=self.kv_cache1, crossattn_cache=self.crossattn_cache,
                                               current_start=start * self.frame_seq_length)
                        if i < len(self.denoising_step_list) - 1:
                            nxt = self.denoising_step_list[i + 1] * torch.ones([b * n], device=noise.device)
                            x = self.scheduler.add_noise(x0.flatten(0, 1), torch.randn_like(x0.flatten(0, 1)),
                                                         nxt).unflatten(0, x0.shape[:2])
                    output[:, start:start + n] = x0
                    self.generator(noisy_image_or_video=x0, conditional_dict=cond,
                                   timestep=torch.ones_like(timestep) * self.args.context_noise,
                                   kv_cache=self.kv_cache1, crossattn_cache=self.crossattn_cache,
                                   current_start=start * self.frame_seq_length)
                    start += n
                video = (self.vae.decode_to_pixel(output, use_cache=False) * 0.5 + 0.5).clamp(0, 1)
                return (video, output) if return_latents else video
    """,
}


def _stand_in(root, fail_at_call=None):
    for rel, text in STAND_IN.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        text = textwrap.dedent(text).lstrip()
        if rel in ("utils/wan_wrapper.py", "pipeline/causal_inference.py"):
            text = text.format(fail_at_call=fail_at_call)
        path.write_text(text)
    return root


def _job(upstream_dir, total_blocks=3):
    model = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=4, out_dim=4, text_dim=16, text_len=8,
                 freq_dim=16, eps=1e-6, image_dim=None, camera_channels=None, fp32_modulation=False)
    return PeerJob(peer="self-forcing", upstream_dir=str(upstream_dir), model=model, pixel_height=32, pixel_width=48,
                   latent_height=4, latent_width=6, latent_channels=4, chunk_frames=3, tokens_per_frame=6,
                   total_blocks=total_blocks, timesteps=STEPS, context_timestep=0.0, shift=5.0, sink_frames=0,
                   ring_frames=None, text_tokens=5, dtype="float32", seed=0, device="cpu")


def test_self_forcing_adapter_times_every_block(tmp_path):
    result = run_peer(_job(_stand_in(tmp_path / "self-forcing")), timeout_s=120)
    assert result["error"] is None, result.get("output_tail")
    assert result["returncode"] == 0
    k = len(STEPS)
    assert [c["autoregressive_index"] for c in result["chunks"]] == [0, 1, 2]
    for chunk in result["chunks"]:
        assert len(chunk["pass_ms"]) == k + 1
        assert all(ms > 0 for ms in chunk["pass_ms"])
        assert chunk["denoise_ms"] == pytest.approx(sum(chunk["pass_ms"][:k]))
        assert chunk["commit_ms"] == chunk["pass_ms"][k]

    notes = "\n".join(result["notes"])
    for expected in ("pipeline/__init__.py", "stub module demo_utils.memory", "stub module wm_stand_in_absent_pkg",
                     "wan.modules.model.flash_attention", "wan.modules.causal_model.attention",
                     "torch scaled_dot_product_attention in the inputs' dtype (torch.float32;",
                     "CausalWanModel.from_pretrained replaced", "text encoder stubbed", "VAE stubbed",
                     "frame_seq_length 1560 -> 6", "num_transformer_blocks 30 -> 2", "KV cache",
                     "cross-attention cache", "settings from", "warm-up: one whole inference"):
        assert expected in notes, expected

    config = result["config"]
    assert config["model"]["dim"] == 32 and config["model"]["num_layers"] == 2
    assert config["model"]["local_attn_size"] == -1
    assert config["num_params"] > 0
    assert config["denoising_step_list"] == [1000, 750, 500, 250]
    assert len(config["timesteps"]) == k and config["timesteps"][0] == pytest.approx(1000.0)
    assert config["num_frame_per_block"] == 3 and config["total_blocks"] == 3
    assert config["kv_cache_tokens"] == 9 * 6 and config["kv_cache_layers"] == 2
    assert config["dtype"] == "float32"


def test_self_forcing_adapter_keeps_finished_blocks_when_upstream_fails(tmp_path):
    calls_per_block = len(STEPS) + 1
    # the generator fails in block 2 of the timed rollout, after the warm-up one (4 blocks)
    tree = _stand_in(tmp_path / "self-forcing", fail_at_call=(4 + 2) * calls_per_block + 1)
    result = run_peer(_job(tree, total_blocks=4), timeout_s=120)
    assert result["returncode"] == 1
    assert "stand-in generator failed in block 2" in result["error"]
    assert [c["autoregressive_index"] for c in result["chunks"]] == [0, 1]
    assert all(len(c["pass_ms"]) == calls_per_block for c in result["chunks"])


def test_chunks_reject_a_loop_of_another_shape(tmp_path):
    from wm_jax.bench.peers.job import ResultWriter
    from wm_jax.bench.peers.torch_timing import ChunkGrouper

    writer = ResultWriter(tmp_path / "result.json", "self-forcing")
    chunks = ChunkGrouper(writer, 2, context=0.0, total=2, steps=[1000.0, 937.5])
    for ms, t in [(3.0, 1000.0), (2.0, 937.5), (1.0, 0.0)]:
        chunks.add(ms, t)
    assert writer.data["chunks"] == [{"autoregressive_index": 0, "denoise_ms": 5.0, "commit_ms": 1.0,
                                      "pass_ms": [3.0, 2.0, 1.0]}]
    chunks.add(3.0, 1000.0)
    with pytest.raises(RuntimeError, match="chunk 1 made model calls at t = \\[1000.0, 0.0\\]"):
        chunks.add(1.0, 0.0)
    with pytest.raises(RuntimeError, match="ran 1 full chunks"):
        chunks.finish()
