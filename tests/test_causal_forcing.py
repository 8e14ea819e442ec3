"""Causal-Forcing (issue 13): recipes, per-block schedules, the I2V first latent, the converter, `wm-jax run`.

The numbers are pinned by the golden case `causal_forcing_rollout` (tests/test_golden_parity.py); here the
engine is checked against the same replay the golden case runs, and the recipes run end to end against a
stand-in hub that holds upstream-layout training checkpoints (`generator` / `generator_ema`, `model.` and
`model._fsdp_wrapped_module.` prefixes) at tiny sizes.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

from safetensors.numpy import save_file  # noqa: E402

import converters  # noqa: E402
from converters import umt5 as umt5_conv  # noqa: E402
from converters import wan_dit  # noqa: E402
from converters import wan_vae as wan_vae_conv  # noqa: E402
from tests.conftest import plan_of  # noqa: E402
from tests.test_streaming_checkpoints import TINY_T5, FakeHub, video_frames  # noqa: E402
from tests.wan_testlib import (TINY, make_tokenizer_folder, original_key_shapes, random_original_state,  # noqa: E402
                               random_rule_state)
from wm_jax.errors import OptionError  # noqa: E402
from wm_jax.io import checkpoint as ckpt  # noqa: E402
from wm_jax.io.safetensors_io import CheckpointError  # noqa: E402
from wm_jax.io.tensor_sources import ArraySource, open_source  # noqa: E402
from wm_jax.models.config import WanConfig  # noqa: E402
from wm_jax.models.wan_vae import WanVAEConfig  # noqa: E402
from wm_jax.parity import ParityError, compare, load_case  # noqa: E402
from wm_jax.parity.rollout import replay_blocks  # noqa: E402
from wm_jax.streaming import components  # noqa: E402
from wm_jax.streaming import run as run_module  # noqa: E402
from wm_jax.streaming.decoders import Decoder  # noqa: E402
from wm_jax.streaming.engine import WorldRollout  # noqa: E402
from wm_jax.streaming.recipes import load_recipe  # noqa: E402
from wm_jax.streaming.run import SHIPPED_EXAMPLE, RunOptions, run  # noqa: E402
from wm_jax.streaming.step import chunk_noise  # noqa: E402

CF = "causal-forcing-wan2.1-t2v-1.3b"
CHUNKWISE, FRAMEWISE, TWO_STEP, ONE_STEP = (f"{CF}-chunkwise", f"{CF}-framewise", f"{CF}-framewise-2step",
                                            f"{CF}-framewise-1step")
I2V = "causal-forcing-wan2.1-i2v-1.3b-framewise"
CF_REPO, WAN_REPO = "zhuhz22/Causal-Forcing", "Wan-AI/Wan2.1-T2V-1.3B"
T5_FILE, VAE_FILE = "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth"
PROMPT = "a red fox jumps over the lazy dog"
TINY_SHAPE = dict(model=dict(TINY), vae_config=dict(dim=8), pixel_height=32, pixel_width=32)
# Engine tests: a smaller DiT still (one layer, one head: quicker to compile), no VAE.
SMALL = dict(dim=128, ffn_dim=256, num_heads=1, num_layers=1, text_dim=32, freq_dim=256)
ENGINE_SHAPE = dict(TINY_SHAPE, model=SMALL)
WARPED_4 = [1000.0, 937.5, 833.3333, 625.0]  # [1000, 750, 500, 250] at shift 5 (FAMILIES.md, golden config)


# ---------------------------------------------------------------------------------------------------
# Recipes.
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("slug, chunk, first, rest, task, dit", [
    (CHUNKWISE, 3, None, WARPED_4, "t2v", "chunkwise/causal_forcing.pt"),
    (FRAMEWISE, 1, None, WARPED_4, "t2v", "framewise/causal_forcing.pt"),
    (TWO_STEP, 1, WARPED_4, [1000.0, 833.3333], "t2v", "causal-forcing++/framewise-2step.pt"),
    (ONE_STEP, 1, WARPED_4, [1000.0], "t2v", "causal-forcing++/framewise-1step.pt"),
    (I2V, 1, None, WARPED_4, "i2v_first_latent", "framewise/causal_forcing.pt"),
])
def test_recipes_follow_upstream_configs(slug, chunk, first, rest, task, dit):
    recipe = load_recipe(slug)
    schedules = recipe.block_schedules()
    assert (recipe.chunk_frames, recipe.task, recipe.shift, recipe.model) == (chunk, task, 5.0, "self-forcing-1.3b")
    np.testing.assert_allclose(schedules.rest.t, rest, atol=1e-3)
    assert (schedules.first is None) == (first is None)
    if first is not None:
        np.testing.assert_allclose(schedules.first.t, first, atol=1e-3)
        assert [schedules.for_block(b).num_steps for b in range(3)] == [4, len(rest), len(rest)]
    np.testing.assert_allclose(schedules.rest.flow_scale, schedules.rest.t / 1000, rtol=1e-6)  # warped: t = 1000σ
    assert recipe.total_blocks * chunk == 21  # upstream's 21 latent frames (81 video frames)
    assert recipe.weights["dit"].repo == CF_REPO and recipe.weights["dit"].path == dit
    assert recipe.weights["dit"].allow_patterns == (dit,) and recipe.weights["dit"].allow_pickle
    assert {recipe.weights[n].repo for n in ("text_encoder", "vae")} == {WAN_REPO}
    plan = plan_of(recipe)
    assert plan.cache.capacity_frames + chunk == 21  # upstream's 32760-token cache: 21 latent frames
    assert plan.prefix_frames == (1 if task == "i2v_first_latent" else 0)


def test_image_latent_needs_a_one_frame_first_chunk_and_a_generated_block():
    recipe = load_recipe(I2V).replace(**TINY_SHAPE)
    with pytest.raises(ValueError, match=f"recipe {I2V}: .* needs a 1-frame first chunk .*first_chunk_frames 1, "
                                         "not 3"):
        plan_of(recipe.replace(chunk_frames=3))
    assert plan_of(recipe.replace(chunk_frames=3, first_chunk_frames=1)).prefix_chunks == 1  # causal Wan2.2's
    with pytest.raises(OptionError, match=r"total_blocks 1: expected at least 2 chunks \(chunk 0 holds the "
                                          r"given latents\)"):
        plan_of(recipe.replace(total_blocks=1))


# ---------------------------------------------------------------------------------------------------
# The engine on tiny random weights, against the replay the golden case checks.
# ---------------------------------------------------------------------------------------------------


def _relative_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def count_compiles() -> list[str]:
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: compiles.append(name) if name == "/jax/core/compile/backend_compile_duration" else None)
    return compiles


def latent_decoder(pixel_height: int, pixel_width: int) -> Decoder:
    """Stands in for the Wan VAE decoder in engine tests (no VAE to compile): a causal VAE's frame counts
    (1 + 4(F - 1) for the first chunk, then 4F), each frame the chunk's first latent frame upsampled."""

    def step(z, first):
        frames = 4 * z.shape[1] - (3 if bool(first) else 0)
        image = jnp.clip(jax.image.resize(z[:, :1, ..., :3], (z.shape[0], 1, pixel_height, pixel_width, 3), "nearest"),
                         -1.0, 1.0)
        return jnp.repeat(image, frames, axis=1), jnp.asarray(False)

    return Decoder("latents", lambda b, h, w: jnp.asarray(True), step, (-1.0, 1.0), {})


class ImageLatent(nnx.Module):
    """Stands in for the Wan VAE encoder in engine tests: an image [B, 1, H, W, 3] -> one latent frame (the
    8x8 pixel means, channels tiled)."""

    def __init__(self, channels: int):
        self.channels = channels

    def encode(self, video):
        b, t, h, w, _ = video.shape
        means = video.reshape(b, t, h // 8, 8, w // 8, 8, 3).mean((3, 5))
        return jnp.tile(means, (1, 1, 1, 1, -(-self.channels // 3)))[..., :self.channels]


@pytest.fixture(scope="module")
def t2v_dit():
    """A small random T2V DiT (`SMALL`, upstream key layout through the converter), its prompt features."""
    model = wan_dit.load_source(ArraySource(random_original_state(WanConfig(**SMALL), seed=21)))
    text = np.random.default_rng(2).standard_normal((1, 5, SMALL["text_dim"])).astype(np.float32)
    return model, text


def test_first_block_list_compiles_one_program_per_pass_count_and_matches_the_replay(t2v_dit):
    dit, text = t2v_dit
    recipe = load_recipe(ONE_STEP).replace(total_blocks=4, **ENGINE_SHAPE)
    plan = plan_of(recipe)
    rollout = WorldRollout(recipe, plan, dit, latent_decoder(32, 32), seed=3)
    rollout.start(text)
    compiles = count_compiles()
    latents, programs = [], []
    for index in range(recipe.total_blocks):
        if index == 2:
            compiles.clear()  # chunk 0 compiled both denoise programs, chunk 1 the stand-in decoder's 4 frames
        frames, stats = rollout.next_chunk()
        assert frames.shape == (1 if index == 0 else 4, 32, 32, 3)
        latents.append(rollout.last_latents)
        programs.append(sorted(rollout._denoise.programs))
    assert compiles == [], f"recompiled while streaming: {len(compiles)} compilations"
    assert programs == [[(1, 1), (4, 1)]] * 4  # (passes, frames): block 0 runs 4, then 1; both AOT from chunk 0

    schedules = recipe.block_schedules()
    noise = [chunk_noise(jax.random.key(3), c, schedules.for_block(c).num_steps, plan.chunk_shape)
             for c in range(recipe.total_blocks)]
    replay = replay_blocks(dit, schedules, text, noise, chunk_frames=1, sink_frames=0, ring_frames=20, num_devices=1)
    for c, (ours, ref) in enumerate(zip(latents, replay)):
        assert _relative_l2(ours, ref[0]) <= 1e-6, f"block {c}"
    with pytest.raises(ValueError, match="block 2 runs 1 passes on a chunk"):
        rollout.state.chunk_index = 2
        rollout.next_chunk(noise=np.zeros((4, *plan.chunk_shape), np.float32))


def test_i2v_commits_the_image_latent_as_frame_0_and_generates_from_frame_1(t2v_dit):
    dit, text = t2v_dit
    recipe = load_recipe(I2V).replace(total_blocks=3, **ENGINE_SHAPE)
    plan, encoder = plan_of(recipe), ImageLatent(16)
    with pytest.raises(ValueError, match="needs the Wan VAE encoder"):
        WorldRollout(recipe, plan, dit, latent_decoder(32, 32), seed=3)
    rollout = WorldRollout(recipe, plan, dit, latent_decoder(32, 32), seed=3, vae_encoder=encoder)
    with pytest.raises(OptionError, match="needs a conditioning image"):
        rollout.start(text)
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    rollout.start(text, image=image)
    given = np.asarray(encoder.encode(jnp.asarray(image, jnp.float32)[None, None] / 127.5 - 1.0))
    frames, stats = rollout.next_chunk()
    assert frames.shape == (1, 32, 32, 3)  # the image's latent decodes to the first video frame
    np.testing.assert_allclose(rollout.last_latents, given[0], atol=1e-6)
    latents = []
    for _ in range(recipe.total_blocks - 1):
        frames, _ = rollout.next_chunk()
        assert frames.shape == (4, 32, 32, 3)
        latents.append(rollout.last_latents)
    assert sorted(rollout._denoise.programs) == [(4, 1)] and int(rollout.state.cache.committed_frames) == 3

    # the same numbers as the replay the golden case checks: the image committed first, block b = chunk b + 1
    noise = [chunk_noise(jax.random.key(3), c, 4, plan.chunk_shape) for c in range(1, recipe.total_blocks)]
    replay = replay_blocks(dit, recipe.block_schedules(), text, noise, chunk_frames=1, sink_frames=0,
                           ring_frames=20, given=given, num_devices=1)
    for b, (ours, ref) in enumerate(zip(latents, replay)):
        assert _relative_l2(ours, ref[0]) <= 1e-6, f"block {b}"


# ---------------------------------------------------------------------------------------------------
# The golden runner can fail: a wrong setting is caught, noise that does not fit the lists is refused.
# ---------------------------------------------------------------------------------------------------


def test_golden_runner_tells_an_image_that_was_never_committed(golden_dir):
    """The i2v run without its initial latent generates from position 0 with an empty cache (the case's
    README: 1.2e-1 upstream); only that run is replayed."""
    from wm_jax.parity import causal_forcing_rollout as runner

    case, config, inputs = load_case(golden_dir / "causal_forcing_rollout")
    run_config = config["runs"]["i2v"]
    outputs = runner.run(case, {**config, "runs": {"i2v": {**run_config, "initial_latent_frames": 0}}}, inputs)
    with np.load(case / "outputs.npz") as golden:
        errors = compare(outputs, {k: golden[k] for k in golden.files if k.startswith(run_config["outputs_prefix"])})
    assert len(errors) == 6 and min(errors.values()) > 1e-3, errors


def test_golden_runner_refuses_noise_that_does_not_fit_the_block_lists(golden_dir):
    from wm_jax.parity import causal_forcing_rollout as runner

    case, config, inputs = load_case(golden_dir / "causal_forcing_rollout")
    run_config = {**config["runs"]["pp2step"], "denoising_step_list_first_chunk_config": None,
                  "denoising_step_list_first_chunk_warped": None}
    with pytest.raises(ParityError, match=r"run pp2step: 9 re-noise draws; blocks of \[2, 2, 2, 2, 2, 2, 2\] "
                                          r"passes need 7"):
        runner.run(case, {**config, "runs": {"pp2step": run_config}}, inputs)


# ---------------------------------------------------------------------------------------------------
# Converter: either training entry, both prefixes, every key matched; frame-wise vs chunk-wise.
# ---------------------------------------------------------------------------------------------------

CFG = WanConfig(**TINY)


def _as_torch(state: dict, prefix: str) -> dict:
    return {f"{prefix}{k}": torch.from_numpy(v) for k, v in state.items()}


def _ema_dict(state: dict) -> dict:
    """Causal-Forcing's EMA layout: most keys `model._fsdp_wrapped_module.` + the Wan key, some `model.`."""
    keys = sorted(state)
    return {**_as_torch({k: state[k] for k in keys[::2]}, "model._fsdp_wrapped_module."),
            **_as_torch({k: state[k] for k in keys[1::2]}, "model.")}


@pytest.fixture(scope="module")
def state():
    return random_original_state(CFG, seed=7)


@pytest.mark.parametrize("entry", ["generator", "generator_ema"])
def test_training_checkpoint_converts_from_either_entry(state, entry, tmp_path):
    path = tmp_path / "framewise" / "causal_forcing.pt"
    path.parent.mkdir()
    torch.save({entry: _ema_dict(state) if entry == "generator_ema" else _as_torch(state, "model.")}, path)
    manifest = converters.convert_path(path, tmp_path / "dit", allow_pickle=True)
    assert manifest["num_tensors"] == len(state) and manifest["ignored_keys"] == []
    assert (manifest["frames_per_block"], manifest["frames_per_block_from"]) == (1, "file name "
                                                                                   "framewise/causal_forcing.pt")
    model = wan_dit.load(tmp_path / "dit")
    np.testing.assert_array_equal(np.asarray(model.head.linear.bias[...]), state["head.head.bias"])
    np.testing.assert_array_equal(np.asarray(model.blocks.ffn.fc1.bias[...])[1], state["blocks.1.ffn.0.bias"])


def test_checkpoint_without_a_generator_names_its_top_level_keys(state, tmp_path):
    pickle = tmp_path / "model.pt"
    torch.save({"critic": _as_torch(state, "model."), "optimizer": {"step": torch.zeros(1)}}, pickle)
    with pytest.raises(CheckpointError, match=r"none of the entries \['generator_ema', 'generator'\] found; "
                                              r"top-level keys: \['critic', 'optimizer'\]"):
        converters.convert_path(pickle, tmp_path / "a", allow_pickle=True)
    flat = tmp_path / "export.safetensors"  # a flattened export under a prefix no trainer writes
    save_file({f"ema_shadow.model.{k}": v for k, v in state.items()}, str(flat))
    with pytest.raises(CheckpointError, match=r"no Wan DiT under a generator_ema, generator or model\. prefix .*"
                                              r"top-level keys found: \['ema_shadow'\]"):
        converters.convert_path(flat, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.update({"model._fsdp_wrapped_module.blocks.0._fsdp_wrapped_module.ffn.0.weight":
                           torch.zeros(1)}), r"unexpected"),
    (lambda sd: sd.pop("model._fsdp_wrapped_module.head.head.bias"), r"missing.*head\.head\.bias"),
], ids=["extra key", "missing key"])
def test_every_key_must_match(state, change, message, tmp_path):
    sd = _ema_dict(state)
    change(sd)
    torch.save({"generator_ema": sd}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=f"(?s){message}"):
        wan_dit.load_source(open_source(tmp_path / "model.pt", allow_pickle=True,
                                        prefer_entries=converters.PREFERRED_ENTRIES))


@pytest.mark.parametrize("where, frames_per_block, recipe", [
    ("framewise/causal_forcing.pt", 1, CHUNKWISE),
    ("causal-forcing++/framewise-2step.pt", 1, CHUNKWISE),
    ("chunkwise/causal_forcing.pt", 3, FRAMEWISE),
    ("run7/model.pt + run7/train.yaml", 1, CHUNKWISE),  # a training config beside the weights
])
def test_frame_wise_checkpoint_and_chunk_wise_recipe_refuse_each_other(state, where, frames_per_block, recipe,
                                                                       tmp_path):
    path = tmp_path / where.split(" + ")[0]
    path.parent.mkdir(parents=True)
    torch.save({"generator": _as_torch(state, "model.")}, path)
    if " + " in where:
        (tmp_path / where.split(" + ")[1]).write_text("denoising_step_list:\n- 1000\nnum_frame_per_block: 1\n")
    converters.convert_path(path, tmp_path / "dit", allow_pickle=True)
    assert ckpt.read_manifest(tmp_path / "dit")["frames_per_block"] == frames_per_block
    chunk = load_recipe(recipe).chunk_frames
    kind = "frame-wise, 1 latent frame per block" if frames_per_block == 1 else "chunk-wise, 3 latent frames"
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}.* is a {kind}.*; recipe {recipe} streams "):
        wan_dit.check_frames_per_block(tmp_path / "dit", chunk, recipe)
    wan_dit.check_frames_per_block(tmp_path / "dit", frames_per_block, "a matching recipe")


def test_checkpoint_that_does_not_tell_its_blocks_serves_any_recipe(state, tmp_path):
    torch.save({"generator": _as_torch(state, "model.")}, tmp_path / "self_forcing_dmd.pt")
    manifest = converters.convert_path(tmp_path / "self_forcing_dmd.pt", tmp_path / "dit", allow_pickle=True)
    assert "frames_per_block" not in manifest
    for chunk in (1, 3):
        wan_dit.check_frames_per_block(tmp_path / "dit", chunk, "any")


# ---------------------------------------------------------------------------------------------------
# `wm-jax run` against a stand-in hub (the real download, conversion, loading and streaming code).
# ---------------------------------------------------------------------------------------------------


def tiny(slug: str, **changes):
    """A shipped recipe at tiny sizes: its hub files, task, schedule, chunking and cache kept."""
    recipe = load_recipe(slug)
    return recipe.replace(**TINY_SHAPE, total_blocks=recipe.prefix_frames + 2, prompt=PROMPT, **changes)


def upstream_repos(root: Path) -> dict[str, dict[str, Path]]:
    """repo -> {path in the repo: local file}: Causal-Forcing's and CausVid's training checkpoints in their
    layouts (tiny DiTs, one seed per file) and Wan2.1's umT5 (+ tokenizer) and VAE pickles."""
    cfg = WanConfig(**TINY)

    def save(name: str, obj) -> Path:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(obj, path)
        return path

    generator = lambda seed: {"generator": _as_torch(random_original_state(cfg, seed), "model.")}
    ema = lambda seed: {"generator_ema": _ema_dict(random_original_state(cfg, seed))}
    to_torch = lambda st, dtype=torch.float32: {k: torch.from_numpy(v).to(dtype) for k, v in st.items()}
    t5 = save(T5_FILE, to_torch(random_rule_state(umt5_conv.RULES, umt5_conv.expected_params(TINY_T5), 2),
                                torch.bfloat16))
    vae_module = wan_vae_conv.abstract_module(WanVAEConfig(dim=8, num_res_blocks=1))  # quick to compile
    vae = save(VAE_FILE, to_torch(random_rule_state(wan_vae_conv.rules_for(vae_module),
                                                    ckpt.param_spec(vae_module), 3)))
    tokenizer = make_tokenizer_folder(root / "tokenizer")
    return {
        CF_REPO: {"chunkwise/causal_forcing.pt": save("cf/chunkwise/causal_forcing.pt", generator(11)),
                  "framewise/causal_forcing.pt": save("cf/framewise/causal_forcing.pt", ema(12)),
                  "causal-forcing++/framewise-2step.pt": save("cf/causal-forcing++/framewise-2step.pt", ema(13)),
                  "causal-forcing++/framewise-1step.pt": save("cf/causal-forcing++/framewise-1step.pt", ema(14))},
        "tianweiy/CausVid": {
            "autoregressive_checkpoint/model.pt": save("cv/autoregressive_checkpoint/model.pt", generator(15)),
            "autoregressive_checkpoint_warp_4step_cfg2/model.pt": save(
                "cv/autoregressive_checkpoint_warp_4step_cfg2/model.pt", generator(16))},
        WAN_REPO: {T5_FILE: t5, VAE_FILE: vae, **{f"google/umt5-xxl/{f.name}": f for f in tokenizer.iterdir()}},
    }


@pytest.fixture(scope="session")
def stand_in_hub(tmp_path_factory) -> dict:
    """The upstream files, and a checkpoint folder with the shared umT5 and VAE downloaded from them and
    converted (each recipe's test then downloads and converts its own DiT only)."""
    root = tmp_path_factory.mktemp("causal_upstream")
    repos = upstream_repos(root)
    shared = root / "shared_ckpt"
    fake = FakeHub(repos, root / "hf-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
        for name in ("text_encoder", "vae"):
            components.ensure_component(name, shared / name, load_recipe(FRAMEWISE).weights[name], allow_pickle=True)
    return {"repos": repos, "shared": shared}


def hub_for(stand_in_hub, recipes: dict, tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub({repo: dict(files) for repo, files in stand_in_hub["repos"].items()}, tmp_path / "hf-cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(run_module, "load_recipe", lambda slug: recipes[slug])
    return fake


def with_shared_components(stand_in_hub, checkpoint: Path) -> Path:
    checkpoint.mkdir()
    for name in ("text_encoder", "vae"):
        (checkpoint / name).symlink_to(stand_in_hub["shared"] / name, target_is_directory=True)
    return checkpoint


def run_from_hub(recipe, stand_in_hub, tmp_path, monkeypatch, *, stream: bool, **options):
    """`recipe` from the stand-in hub into a fresh checkpoint folder (the shared umT5 and VAE linked in):
    streamed by `wm-jax run` (returns the report and the denoise pass counts compiled), or with `stream`
    False only downloaded, converted and loaded (returns the components)."""
    hub = hub_for(stand_in_hub, {recipe.slug: recipe}, tmp_path, monkeypatch)
    checkpoint = with_shared_components(stand_in_hub, tmp_path / "ckpt")
    if not stream:
        parts = components.load_components(recipe, plan_of(recipe), checkpoint, compute_dtype=jnp.float32,
                                           allow_pickle=True)
        return hub, parts
    compiled = []
    real_compile = WorldRollout._compile

    def compile_and_record(self, inputs):
        real_compile(self, inputs)
        compiled.append(sorted(self._denoise.programs))

    monkeypatch.setattr(WorldRollout, "_compile", compile_and_record)
    report = run(RunOptions(slug=recipe.slug, checkpoint=str(checkpoint), output_dir=str(tmp_path / "out"),
                            allow_pickle=True, **options))
    return hub, (report, compiled)


# Streaming runs are ~10-15 s each on a 2-core CPU: the chunk-wise recipe and Causal-Forcing++ (two denoise
# programs) stream; frame-wise 4-step and ++ 1-step run the same code with other recipe data (the 1-pass
# program streams in the engine test above), so here they are downloaded, converted and loaded.
@pytest.mark.parametrize("slug, stream, denoise_programs", [
    (CHUNKWISE, True, [(4, 3)]), (TWO_STEP, True, [(2, 1), (4, 1)]), (FRAMEWISE, False, None), (ONE_STEP, False, None)])
def test_causal_forcing_recipe_from_the_hub(slug, stream, denoise_programs, stand_in_hub, tmp_path, monkeypatch):
    recipe = tiny(slug)
    hub, result = run_from_hub(recipe, stand_in_hub, tmp_path, monkeypatch, stream=stream)
    dit = recipe.weights["dit"]
    assert hub.calls == [(CF_REPO, (dit.path,))] and hub.unmatched == []
    manifest = ckpt.read_manifest(tmp_path / "ckpt" / "dit", kind="wan_dit")
    assert manifest["frames_per_block"] == recipe.chunk_frames
    assert manifest["num_tensors"] == len(original_key_shapes(CFG))
    if not stream:
        entry = torch.load(stand_in_hub["repos"][CF_REPO][dit.path])["generator_ema"]
        np.testing.assert_array_equal(np.asarray(result.dit.head.linear.bias[...]),
                                      entry["model._fsdp_wrapped_module.head.head.bias"].numpy())
        return
    report, compiled = result
    frames = 1 + 4 * (2 * recipe.chunk_frames - 1)  # 2 chunks: 1 + 4(F - 1) video frames, then 4F
    assert report["num_frames"] == frames == video_frames(tmp_path / "out" / f"{slug}.mp4")
    assert compiled == [denoise_programs]


def test_causal_forcing_i2v_recipe_from_the_hub(stand_in_hub, tmp_path, monkeypatch):
    recipe = tiny(I2V)
    hub, (report, compiled) = run_from_hub(recipe, stand_in_hub, tmp_path, monkeypatch, stream=True,
                                           example_data=True, example_idx=SHIPPED_EXAMPLE, prompt=PROMPT)
    assert hub.calls == [(CF_REPO, ("framewise/causal_forcing.pt",))]
    assert compiled == [[(4, 1)]]
    assert report["num_frames"] == 9 == video_frames(tmp_path / "out" / f"{I2V}.mp4")  # the image, 2 generated


def test_frame_wise_checkpoint_in_a_chunk_wise_run_is_refused_before_compiling(stand_in_hub, tmp_path, monkeypatch):
    recipe = tiny(CHUNKWISE)
    hub_for(stand_in_hub, {CHUNKWISE: recipe}, tmp_path, monkeypatch)
    checkpoint = with_shared_components(stand_in_hub, tmp_path / "ckpt")
    converters.convert_path(stand_in_hub["repos"][CF_REPO]["framewise/causal_forcing.pt"], checkpoint / "dit",
                            allow_pickle=True)
    compiles = count_compiles()
    with pytest.raises(CheckpointError, match=r"framewise/causal_forcing\.pt .*is a frame-wise, 1 latent frame per "
                                              rf"block model .*; recipe {CHUNKWISE} streams chunk-wise, 3 latent"):
        run(RunOptions(slug=CHUNKWISE, checkpoint=str(checkpoint), output_dir=str(tmp_path / "out"),
                       allow_pickle=True))
    assert compiles == []
