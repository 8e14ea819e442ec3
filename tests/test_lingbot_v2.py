"""The `lingbot-world-v2-fast` recipe follows upstream's causal-fast settings (FAMILIES.md §4, the
`lingbot_v2_rollout` golden case): plan, cache layout, schedule and checkpoint files."""

import numpy as np

from tests.conftest import plan_of
from wm_jax.streaming.kv_cache import upstream_cache_frames
from wm_jax.streaming.recipes import SLUGS, load_recipe

SLUG = "lingbot-world-v2-fast"
REPO = "robbyant/lingbot-world-v2-14b-causal-fast"


def test_recipe_is_registered_with_upstream_sampling():
    assert SLUG in SLUGS
    recipe = load_recipe(SLUG)
    assert (recipe.task, recipe.model, recipe.decoder, recipe.chunk_frames) == ("i2v_camera", "lingbot-world-fast",
                                                                                "wan_vae", 4)
    schedule = recipe.block_schedules().rest
    assert recipe.block_schedules().first is None
    assert schedule.t.tolist() == [999, 967, 908, 768]  # not v1's [999, 978, 947, 825]
    np.testing.assert_allclose(schedule.flow_scale, [0.9998999, 0.9679494, 0.9089255, 0.7689939], rtol=1e-6)
    np.testing.assert_allclose(schedule.noise_scale[:-1], [0.9677834, 0.90859413, 0.7680442], rtol=1e-6)


def test_plan_holds_sink_6_and_an_18_frame_upstream_window():
    recipe = load_recipe(SLUG)
    plan = plan_of(recipe)
    assert (plan.pixel_height, plan.pixel_width, plan.latent_height, plan.latent_width) == (480, 832, 60, 104)
    assert plan.cache.tokens_per_frame == 1560 and plan.chunk_frames * plan.cache.tokens_per_frame == 6240
    assert plan.condition_channels == 20
    # upstream --local_attn_size 18 --sink_size 6 counts the sink and the current chunk
    assert recipe.cache_frames() == upstream_cache_frames(18, 6, 4) == (6, 8)
    assert (plan.cache.sink_frames, plan.cache.ring_frames) == (6, 8)
    assert plan.cache.capacity_frames + plan.chunk_frames == 18  # kv_size 18·1560 = 28080 tokens
    frames = recipe.total_blocks * recipe.chunk_frames
    assert frames == 88  # run_fast.sh --frame_num 361 -> 91 latent frames, trimmed to whole chunks
    visible = plan.cache.visible_frames(frames)
    f = np.arange(frames)
    for c in range(recipe.total_blocks):
        last = 4 * c + 3  # upstream: chunk c attends f <= 4c+3 with f < 6 or f > 4c+3-12
        expected = (f <= last) & ((f < 6) | (f > last - 12))
        for q in range(4 * c, 4 * c + 4):
            np.testing.assert_array_equal(visible[q], expected, err_msg=f"chunk {c}")
    # the first eviction (chunk 4) drops only frames 6 and 7, the half of chunk 1 outside the sink
    assert np.nonzero(visible[16])[0].tolist() == [0, 1, 2, 3, 4, 5, *range(8, 20)]


def test_weights_come_from_the_v2_repo_transformers_shards():
    weights = load_recipe(SLUG).weights
    assert {hub.repo for hub in weights.values()} == {REPO}
    dit = weights["dit"]
    assert dit.path == "transformers" and not dit.allow_pickle
    assert set(dit.allow_patterns) == {"transformers/*.safetensors", "transformers/*.json"}
    assert weights["vae"].path == "Wan2.1_VAE.pth" and weights["text_encoder"].path == "models_t5_umt5-xxl-enc-bf16.pth"


def test_video_size_follows_the_image_aspect_by_upstreams_float_arithmetic():
    import pytest

    from wm_jax.errors import OptionError
    from wm_jax.streaming.plan import aspect_resolution

    area = load_recipe(SLUG).max_area
    assert area == 480 * 832
    # the 16:9 upstream example images, example 04 (3648x5472), a square and a portrait image
    assert aspect_resolution(720, 1280, area) == (464, 832)
    assert aspect_resolution(3648, 5472, area) == (512, 768)
    assert aspect_resolution(1024, 1024, area) == (624, 624)
    # float64: sqrt(480·832·480/832) = 479.99999999999994, floored to 58 latent rows, as upstream does
    assert aspect_resolution(480, 832, area) == (464, 832)
    message = (r"image is 1x4000: .* gives a 0x\d+ video, no whole token on one side; the nearest valid size is "
               r"16x24960: set pixel_height 16 and pixel_width 24960")
    with pytest.raises(OptionError, match=message) as err:
        aspect_resolution(1, 4000, area)
    assert err.value.option == "image"


def test_run_sizes_the_plan_from_the_image_unless_a_size_is_given(tmp_path):
    from PIL import Image

    from wm_jax.streaming.run import RunOptions, resolve_with_scene

    path = tmp_path / "square.png"
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(path)
    recipe, plan, resolved, (image, _, _, _) = resolve_with_scene(
        RunOptions(slug=SLUG, image=str(path), random_weights=True, num_devices=1))
    assert (plan.pixel_height, plan.pixel_width, plan.latent_height, plan.latent_width) == (624, 624, 78, 78)
    assert (recipe.pixel_height, recipe.pixel_width) == (624, 624) and image.shape == (624, 624, 3)
    assert resolved["video_size_from"] == "the input image's aspect (300x300) at max_area 399360"
    assert resolved["plan"]["pixel"] == [624, 624]
    _, plan, resolved, (image, _, _, _) = resolve_with_scene(
        RunOptions(slug=SLUG, image=str(path), random_weights=True, num_devices=1, pixel_height=480,
                   pixel_width=832))
    assert (plan.pixel_height, plan.pixel_width) == (480, 832) and image.shape == (480, 832, 3)
    assert "video_size_from" not in resolved
    # a recipe without max_area keeps its size and resizes the image to it
    _, plan, _, (image, _, _, _) = resolve_with_scene(RunOptions(slug="tiny", image=str(path), num_devices=1))
    assert (plan.pixel_height, plan.pixel_width) == (64, 112) and image.shape == (64, 112, 3)
