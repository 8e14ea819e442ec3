"""Self-Forcing (Wan2.1 T2V 1.3B, DMD) causal text-to-video, Wan VAE decoder.

Shift 5 as the official CLI config (`configs/self_forcing_dmd.yaml`); FlashDreams and demo.py use 8
(`--shift 8` for comparisons). Cache: all 21 latent frames of the default 7-block rollout.
"""

from wm_jax.streaming.recipes import HubFiles, Recipe


def get_config() -> Recipe:
    return Recipe(
        slug="self-forcing-wan2.1-t2v-1.3b",
        model="self-forcing-1.3b",
        task="t2v",
        schedule="self_forcing",
        shift=5.0,
        steps=(1000, 750, 500, 250),
        decoder="wan_vae",
        pixel_height=480,
        pixel_width=832,
        total_blocks=7,
        sink_frames=0,
        window_frames=21,
        seed=42,
        prompt="A quiet forest path at dawn, mist between the trees, the camera slowly moving forward.",
        weights={
            "dit": HubFiles("gdhe17/Self-Forcing", ("checkpoints/self_forcing_dmd.pt",),
                            "checkpoints/self_forcing_dmd.pt", allow_pickle=True),
            "text_encoder": HubFiles("Wan-AI/Wan2.1-T2V-1.3B", ("models_t5_umt5-xxl-enc-bf16.pth", "google/*"),
                                     "models_t5_umt5-xxl-enc-bf16.pth", allow_pickle=True),
            "vae": HubFiles("Wan-AI/Wan2.1-T2V-1.3B", ("Wan2.1_VAE.pth",), "Wan2.1_VAE.pth", allow_pickle=True),
        },
    )
