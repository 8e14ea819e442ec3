"""tiny: a trained toy world that ships with the package — the default first run, offline, on a laptop CPU.

A LingBot-shaped camera-conditioned DiT (3 layers, width 256) and a small Wan-VAE-shaped encoder/decoder,
trained with `wm-jax train configs/train_tiny_world.py` on clips of the procedural world in
`wm_jax/worlds` (weights in `wm_jax/assets/tiny_world/`). The shipped example scene is a view of that
world and a walk through it. Text features are hashed from the prompt; the world was trained to ignore
them. `--random_weights` swaps in seeded random weights of the same shapes (tests).
"""

from wm_jax.streaming.recipes import Recipe


def get_config() -> Recipe:
    return Recipe(
        slug="tiny",
        model=dict(dim=256, ffn_dim=768, num_heads=2, num_layers=3, in_dim=36, out_dim=16, text_dim=64,
                   camera_channels=384),
        task="i2v_camera",
        schedule="lingbot_fast",
        shift=10.0,
        decoder="wan_vae",
        vae_config=dict(dim=12, num_res_blocks=1),
        pixel_height=64,
        pixel_width=112,
        total_blocks=5,
        sink_frames=3,
        window_frames=9,
        seed=42,
        prompt="a walk through a small procedural world",
        shipped_weights="tiny_world",
    )
