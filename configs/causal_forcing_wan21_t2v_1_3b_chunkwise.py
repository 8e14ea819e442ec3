"""Causal-Forcing (thu-ml/Causal-Forcing) chunk-wise 4-step: Wan2.1 T2V 1.3B, 3-frame chunks, Wan VAE.

Upstream `configs/causal_forcing_dmd_chunkwise.yaml`: steps [1000, 750, 500, 250] warped at shift 5
(t = 1000, 937.5, 833.33, 625), a t = 0 commit pass per chunk, every one of the 21 latent frames kept
(upstream's 32760-token cache). Upstream's README loads this checkpoint's `generator` entry.
"""

from wm_jax.streaming.recipes import HubFiles, Recipe

REPO = "zhuhz22/Causal-Forcing"
PROMPT = "A quiet forest path at dawn, mist between the trees, the camera slowly moving forward."


def wan21_t2v_files() -> dict[str, HubFiles]:
    """umT5 and the Wan VAE from the Wan2.1 T2V 1.3B repo, as upstream loads them."""
    return {
        "text_encoder": HubFiles("Wan-AI/Wan2.1-T2V-1.3B", ("models_t5_umt5-xxl-enc-bf16.pth", "google/*"),
                                 "models_t5_umt5-xxl-enc-bf16.pth", allow_pickle=True),
        "vae": HubFiles("Wan-AI/Wan2.1-T2V-1.3B", ("Wan2.1_VAE.pth",), "Wan2.1_VAE.pth", allow_pickle=True),
    }


def dit_file(path: str) -> HubFiles:
    return HubFiles(REPO, (path,), path, allow_pickle=True)


def get_config() -> Recipe:
    return Recipe(
        slug="causal-forcing-wan2.1-t2v-1.3b-chunkwise",
        model="self-forcing-1.3b",
        task="t2v",
        schedule="self_forcing",
        shift=5.0,
        steps=(1000, 750, 500, 250),
        chunk_frames=3,
        decoder="wan_vae",
        pixel_height=480,
        pixel_width=832,
        total_blocks=7,
        sink_frames=0,
        window_frames=21,
        seed=42,
        prompt=PROMPT,
        weights={"dit": dit_file("chunkwise/causal_forcing.pt"), **wan21_t2v_files()},
    )
