"""LingBot-World v2 causal-fast (`robbyant/lingbot-world-v2`, `--infer_mode causal_fast` as `run_fast.sh` runs it).

The v1 Fast network and camera layers unchanged (one 14B `WanModelFast`, original Wan key names), with v2's
sampling: 480x832 (60x104 latents, 1560 tokens per latent frame), chunks of 4 latent frames, 4 passes at
table indices [0, 250, 500, 750] -> t = [999, 967, 908, 768] at shift 10 (x0 with the σ of the first
table entry equal to t, re-noising with the second's), a commit pass at t = 0.

Cache: upstream's `--local_attn_size 18 --sink_size 6` is an 18-frame buffer that holds the sink AND the
current chunk, i.e. sink 6 + 8 recent + 4 current. In this repo's terms (the window counts the current
chunk, not the sink) that is sink 6 + window 12. The sink is not a whole number of chunks: chunk 1 is
split between the sink and the ring, the first eviction (chunk 4) drops 2 frames, later chunks 4 each.

Video size: as upstream, from the input image's aspect at 480·832 pixels (`max_area`; an explicit
--pixel_height / --pixel_width wins), by upstream's float arithmetic: the 16:9 example images give 464x832
(58x104 latents), example 04 (2:3) 512x768, and even a 480x832 image gives 464x832 (sqrt(480·832·480/832)
is 479.99999999999994 in float64). 480x832 is the size without an image.

The DiT comes from the `transformers/` shards (with their index json) of
`robbyant/lingbot-world-v2-14b-causal-fast`, which also ships the Wan2.1 VAE and the umT5 encoder.
22 chunks = 88 latent frames (349 video frames): `run_fast.sh`'s `--frame_num 361` trimmed to whole chunks.
"""

from wm_jax.streaming.recipes import HubFiles, Recipe

REPO = "robbyant/lingbot-world-v2-14b-causal-fast"


def get_config() -> Recipe:
    return Recipe(
        slug="lingbot-world-v2-fast",
        model="lingbot-world-fast",
        task="i2v_camera",
        schedule="lingbot_fast",
        shift=10.0,
        step_indices=(0, 250, 500, 750),
        chunk_frames=4,
        decoder="wan_vae",
        pixel_height=480,
        pixel_width=832,
        max_area=480 * 832,
        total_blocks=22,
        sink_frames=6,
        window_frames=12,
        seed=42,
        weights={
            "dit": HubFiles(REPO, ("transformers/*.safetensors", "transformers/*.json"), "transformers"),
            "text_encoder": HubFiles(REPO, ("models_t5_umt5-xxl-enc-bf16.pth", "google/*"),
                                     "models_t5_umt5-xxl-enc-bf16.pth", allow_pickle=True),
            "vae": HubFiles(REPO, ("Wan2.1_VAE.pth",), "Wan2.1_VAE.pth", allow_pickle=True),
        },
    )
