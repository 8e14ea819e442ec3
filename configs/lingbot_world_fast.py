"""LingBot-World Fast: causal image-to-video with camera control, Wan VAE, every frame kept in the cache.

464x832 like FlashDreams' default (1508 tokens per latent frame); 4 passes at t = [999, 978, 947, 825].
"""

from wm_jax.streaming.recipes import HubFiles, Recipe


def get_config() -> Recipe:
    return Recipe(
        slug="lingbot-world-fast",
        model="lingbot-world-fast",
        task="i2v_camera",
        schedule="lingbot_fast",
        shift=10.0,
        step_indices=(0, 179, 358, 679),
        decoder="wan_vae",
        pixel_height=464,
        pixel_width=832,
        total_blocks=20,
        sink_frames=0,
        window_frames=None,
        seed=42,
        weights={
            "dit": HubFiles("robbyant/lingbot-world-fast", ("*.safetensors", "*.json"), ""),
            "text_encoder": HubFiles("robbyant/lingbot-world-base-cam",
                                     ("models_t5_umt5-xxl-enc-bf16.pth", "google/*"),
                                     "models_t5_umt5-xxl-enc-bf16.pth", allow_pickle=True),
            "vae": HubFiles("robbyant/lingbot-world-base-cam", ("Wan2.1_VAE.pth",), "Wan2.1_VAE.pth",
                            allow_pickle=True),
        },
    )
