"""CausVid (tianweiy/CausVid) autoregressive 3-step: Wan2.1 T2V 1.3B, 3-frame chunks, Wan VAE.

Upstream `configs/wan_causal_dmd.yaml` with the released `autoregressive_checkpoint/model.pt` (`generator`):
steps [1000, 757, 522] fed unwarped (`warp_denoising_step: false`), σ looked up in the shift-8 table
(the wrapper hard-codes shift 8), a t = 0 commit pass per chunk, all 21 latent frames kept.
"""

from configs.causal_forcing_wan21_t2v_1_3b_chunkwise import PROMPT, wan21_t2v_files
from wm_jax.streaming.recipes import HubFiles, Recipe

REPO = "tianweiy/CausVid"


def dit_file(path: str) -> HubFiles:
    return HubFiles(REPO, (path,), path, allow_pickle=True)


def get_config() -> Recipe:
    return Recipe(
        slug="causvid-wan2.1-t2v-1.3b",
        model="self-forcing-1.3b",
        task="t2v",
        schedule="self_forcing",
        shift=8.0,
        steps=(1000, 757, 522),
        warp=False,
        chunk_frames=3,
        decoder="wan_vae",
        pixel_height=480,
        pixel_width=832,
        total_blocks=7,
        sink_frames=0,
        window_frames=21,
        seed=42,
        prompt=PROMPT,
        weights={"dit": dit_file("autoregressive_checkpoint/model.pt"), **wan21_t2v_files()},
    )
