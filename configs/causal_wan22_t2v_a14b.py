"""FastVideo's causal Wan2.2 A14B (Self-Forcing on Wan2.2's two 14B experts), text-to-video, Wan VAE decoder.

The sampler is FastVideo's `CausalDMDDenosingStage` (../shared/FAMILIES.md §3): a 1-frame first block, then
3-frame blocks; 8 warped steps, the first three (t >= 875) on the high-noise expert with the boundary rule,
the rest on the low-noise expert; one KV cache per expert, both committed after each block; one
cross-attention K/V (the high-noise expert's) shared by both. The shift is read from the checkpoint's
`scheduler/scheduler_config.json` when it is converted (5.0 until then: FlashDreams' value, and what an
unconverted random-weight run uses). Cache: every frame of the default 7 blocks (1 + 6·3 = 19 latent
frames, FastVideo's 81-frame run after its trim); longer rollouts roll a 21-frame window with no sink
(FlashDreams' setting; FastVideo stops at 21 frames). The umT5 text encoder and the Wan2.1 VAE are the
ones every Wan2.1 recipe uses (the same weights as the checkpoint's own `text_encoder/` and `vae/`).
"""

from wm_jax.streaming.recipes import HubFiles, Recipe

STEPS = (1000, 850, 700, 550, 350, 275, 200, 125)
EXPERT_FILES = ("transformer/*", "transformer_2/*", "scheduler/*", "model_index.json")


def get_config() -> Recipe:
    return Recipe(
        slug="causal-wan2.2-t2v-a14b",
        model="wan2.2-t2v-a14b",
        task="t2v",
        schedule="self_forcing",
        shift=5.0,
        steps=STEPS,
        boundary=0.875,
        decoder="wan_vae",
        pixel_height=480,
        pixel_width=832,
        total_blocks=7,
        first_chunk_frames=1,
        chunk_frames=3,
        sink_frames=0,
        window_frames=21,
        seed=1000,
        prompt="A red fox trotting through fresh snow in a pine forest, soft morning light.",
        weights={
            "dit": HubFiles("rand0nmr/SFWan2.2-T2V-A14B-Diffusers", EXPERT_FILES),
            "text_encoder": HubFiles("Wan-AI/Wan2.1-T2V-1.3B", ("models_t5_umt5-xxl-enc-bf16.pth", "google/*"),
                                     "models_t5_umt5-xxl-enc-bf16.pth", allow_pickle=True),
            "vae": HubFiles("Wan-AI/Wan2.1-T2V-1.3B", ("Wan2.1_VAE.pth",), "Wan2.1_VAE.pth", allow_pickle=True),
        },
    )
