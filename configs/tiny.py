"""tiny: random weights end to end, a small LingBot-shaped camera model and a small Wan VAE.

Runs the whole image+camera -> video pipeline (I2V encode, 4 denoise passes, commit, decode, mp4)
on a laptop CPU in seconds, with the project's shipped example scene. Text features are seeded
random vectors derived from the prompt (there is no text encoder at this size).
"""

from wm_jax.streaming.recipes import Recipe


def get_config() -> Recipe:
    return Recipe(
        slug="tiny",
        model=dict(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=36, out_dim=16, text_dim=64,
                   camera_channels=384),
        task="i2v_camera",
        schedule="lingbot_fast",
        shift=10.0,
        decoder="wan_vae",
        vae_config=dict(dim=8),
        pixel_height=64,
        pixel_width=96,
        total_blocks=3,
        sink_frames=3,
        window_frames=6,
        seed=42,
        prompt="a small random world",
        random_weights=True,
    )
