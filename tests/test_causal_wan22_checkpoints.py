"""Causal Wan2.2 A14B checkpoints (issue 13): the diffusers two-expert layout FastVideo publishes
(`transformer/` = high-noise expert, `transformer_2/` = low-noise, `scheduler/scheduler_config.json`), converted
and loaded, and both recipes through `wm-jax run` from a stand-in hub.

The experts here are diffusers' own `WanTransformer3DModel`s (written with `save_pretrained`, so the key names,
the config file and the safetensors layout are diffusers'), loaded from random original-layout weights through
diffusers' converter; the round trip checks that our converter maps every key of both back. The scheduler
config carries shift 8 rather than FastVideo/FlashDreams' 5, to show that the run takes the checkpoint's.
The sampler itself is checked against a reference loop in `tests/test_causal_wan22.py`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

from converters import wan_dit  # noqa: E402
from tests.test_causal_forcing import (PROMPT, SHIPPED_EXAMPLE, hub_for, stand_in_hub, tiny,  # noqa: E402, F401
                                       video_frames, with_shared_components)
from tests.wan_testlib import TINY, diffusers_model, random_original_state  # noqa: E402
from wm_jax.io import checkpoint as ckpt  # noqa: E402
from wm_jax.io.safetensors_io import CheckpointError  # noqa: E402
from wm_jax.io.tensor_sources import ArraySource, open_source  # noqa: E402
from wm_jax.models.config import WanConfig  # noqa: E402
from wm_jax.streaming.recipes import load_recipe  # noqa: E402
from wm_jax.streaming.run import RunOptions, run  # noqa: E402
from wm_jax.streaming.schedules import boundary_schedule  # noqa: E402

T2V, I2V = "causal-wan2.2-t2v-a14b", "causal-wan2.2-i2v-a14b"
T2V_REPO, I2V_REPO = "rand0nmr/SFWan2.2-T2V-A14B-Diffusers", "FastVideo/CausalWan2.2-I2V-A14B-Preview-Diffusers"
CFG = WanConfig(**TINY)
SCHEDULER = {"_class_name": "SelfForcingFlowMatchScheduler", "num_inference_steps": 1000, "num_train_timesteps": 1000,
             "shift": 8.0, "sigma_max": 1.0, "sigma_min": 0.0, "extra_one_step": True, "inverse_timesteps": False,
             "reverse_sigmas": False, "training": True}


def _flat(model) -> dict[str, np.ndarray]:
    from flax import nnx

    return {"/".join(map(str, path)): np.asarray(v) for path, v in nnx.to_flat_state(nnx.state(model))}


def diffusers_pipeline_folder(root: Path, seeds=(31, 32), scheduler: dict | None = SCHEDULER,
                              experts=("transformer", "transformer_2")) -> dict[str, dict[str, np.ndarray]]:
    """A FastVideo-style diffusers folder: each expert saved by diffusers itself; returns the original-layout
    weights per expert folder."""
    states = {}
    for name, seed in zip(experts, seeds):
        states[name] = random_original_state(CFG, seed)
        diffusers_model(CFG, states[name]).save_pretrained(root / name)
    if scheduler is not None:
        (root / "scheduler").mkdir(parents=True)
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "WanDMDPipeline", **{name: ["diffusers", "WanTransformer3DModel"] for name in experts},
         "scheduler": ["diffusers", "SelfForcingFlowMatchScheduler"]}))
    return states


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("causal_wan22") / "SFWan2.2-T2V-A14B-Diffusers"
    return root, diffusers_pipeline_folder(root)


def test_diffusers_expert_pair_converts_every_key_of_both_experts(pipeline_folder, tmp_path):
    src, states = pipeline_folder
    assert {p.name for p in (src / "transformer").iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    manifest = wan_dit.convert_experts(src, tmp_path / "dit", open_fn=open_source)
    assert manifest["expert_sources"] == ["transformer", "transformer_2"]
    assert manifest["scheduler"] == {"shift": 8.0, "file": str(src / "scheduler" / "scheduler_config.json")}
    assert manifest["boundary"] == 0.875 and WanConfig.from_dict(manifest["config"]) == CFG
    for name in wan_dit.EXPERT_DIRS:
        assert ckpt.read_manifest(tmp_path / "dit" / name)["ignored_keys"] == []
    pair = wan_dit.load_experts(tmp_path / "dit")
    for expert, name in zip(pair.experts, ("transformer", "transformer_2")):
        reference = _flat(wan_dit.load_source(ArraySource(states[name])))
        ours = _flat(expert)
        assert ours.keys() == reference.keys()
        for key in ours:
            np.testing.assert_array_equal(ours[key], reference[key], err_msg=key)
    assert not np.array_equal(_flat(pair.high_noise)["blocks/ffn/fc1/kernel"],
                              _flat(pair.low_noise)["blocks/ffn/fc1/kernel"])


def test_a_folder_missing_one_expert_names_it(tmp_path):
    diffusers_pipeline_folder(tmp_path / "only_high", seeds=(1,), experts=("transformer",))
    index = json.loads((tmp_path / "only_high" / "model_index.json").read_text())
    assert not wan_dit.is_expert_folder(tmp_path / "only_high")  # a one-transformer pipeline (e.g. Wan2.1)
    for unused in ([None, None], None):  # how diffusers lists a component the pipeline does not have
        (tmp_path / "only_high" / "model_index.json").write_text(json.dumps({**index, "transformer_2": unused}))
        assert not wan_dit.is_expert_folder(tmp_path / "only_high")
    (tmp_path / "only_high" / "model_index.json").write_text(
        json.dumps({**index, "transformer_2": ["diffusers", "WanTransformer3DModel"]}))
    with pytest.raises(CheckpointError, match=r"has transformer/ but no transformer_2/, the low-noise expert"):
        wan_dit.convert_experts(tmp_path / "only_high", tmp_path / "a", open_fn=open_source)
    diffusers_pipeline_folder(tmp_path / "only_low", seeds=(2,), experts=("transformer_2",))
    with pytest.raises(CheckpointError, match=r"has transformer_2/ but no transformer/, the high-noise expert"):
        wan_dit.is_expert_folder(tmp_path / "only_low")
    assert not (tmp_path / "a").exists()
    # a one-transformer diffusers pipeline (Wan2.1) is not a pair, and not an error where a pair is optional
    (tmp_path / "wan21" / "transformer").mkdir(parents=True)
    (tmp_path / "wan21" / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "x"]}))
    assert not wan_dit.is_expert_folder(tmp_path / "wan21")
    with pytest.raises(CheckpointError, match="no transformer_2/, the low-noise expert"):
        wan_dit.expert_sources(tmp_path / "wan21", required=True)


@pytest.mark.parametrize("change, message", [
    ({"_class_name": "UniPCMultistepScheduler"}, "_class_name 'UniPCMultistepScheduler'"),
    ({"sigma_min": None}, r"sigma_min 0.0029\d+ \(the default\); wm_jax builds the table with sigma_min 0.0"),
    ({"extra_one_step": False}, "extra_one_step False;"),
    ({"num_inference_steps": 100}, "num_inference_steps 100;"),
])
def test_a_scheduler_of_another_table_is_refused(change, message, tmp_path):
    config = {k: v for k, v in {**SCHEDULER, **change}.items() if v is not None}
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        wan_dit.read_scheduler(tmp_path)
    assert wan_dit.read_scheduler(tmp_path / "elsewhere") is None


# ---------------------------------------------------------------------------------------------------
# `wm-jax run` from a stand-in hub.
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def expert_repos(pipeline_folder) -> dict[str, dict[str, Path]]:
    src, _ = pipeline_folder
    files = {str(p.relative_to(src)): p for p in src.rglob("*") if p.is_file()}
    return {T2V_REPO: files, I2V_REPO: files}


@pytest.mark.parametrize("slug, repo, frames, options", [
    (T2V, T2V_REPO, 1 + 4 * 3, {}),  # chunk 0: 1 latent frame (1 video frame), then 3 (12 video frames)
    (I2V, I2V_REPO, 1 + 2 * 4 * 3, dict(example_data=True, example_idx=SHIPPED_EXAMPLE)),  # the image, 2 blocks
])
def test_causal_wan22_recipe_from_the_hub(slug, repo, frames, options, stand_in_hub, expert_repos, tmp_path,
                                          monkeypatch):
    recipe = tiny(slug)
    hub = hub_for({**stand_in_hub, "repos": {**stand_in_hub["repos"], **expert_repos}}, {slug: recipe}, tmp_path,
                  monkeypatch)
    checkpoint = with_shared_components(stand_in_hub, tmp_path / "ckpt")
    report = run(RunOptions(slug=slug, checkpoint=str(checkpoint), output_dir=str(tmp_path / "out"), prompt=PROMPT,
                            **options))
    # the scheduler and model index first (checked before the experts download), then everything
    assert hub.calls == [(repo, ("scheduler/*", "model_index.json")), (repo, recipe.weights["dit"].allow_patterns)]
    assert hub.unmatched == []
    manifest = ckpt.read_manifest(checkpoint / "dit", kind=wan_dit.EXPERTS_KIND)
    assert manifest["scheduler"]["shift"] == 8.0
    config = report["config"]
    assert config["shift"] == 8.0 != load_recipe(slug).shift  # the checkpoint's scheduler, not the recipe default
    np.testing.assert_allclose(config["denoising_timesteps"],
                               boundary_schedule(8.0, recipe.steps, 0.875).t, atol=1e-3)
    assert config["plan"]["first_chunk_frames"] == 1 and config["plan"]["chunk_frames"] == 3
    assert report["num_frames"] == frames == video_frames(tmp_path / "out" / f"{slug}.mp4")
    # --shift wins over the checkpoint's
    report = run(RunOptions(slug=slug, checkpoint=str(checkpoint), output_dir=str(tmp_path / "out2"), prompt=PROMPT,
                            shift=5.0, total_blocks=recipe.prefix_frames + 2, **options))
    assert report["config"]["shift"] == 5.0


def test_a_single_dit_folder_is_refused_for_a_two_expert_recipe(stand_in_hub, pipeline_folder, tmp_path):
    src, _ = pipeline_folder
    checkpoint = with_shared_components(stand_in_hub, tmp_path / "ckpt")
    wan_dit.convert(open_source(src / "transformer"), checkpoint / "dit", source_path=src / "transformer")
    with pytest.raises(CheckpointError, match=rf"holds a 'wan_dit' checkpoint; recipe {T2V} needs two experts"):
        run(RunOptions(slug=T2V, checkpoint=str(checkpoint), output_dir=str(tmp_path / "out"), random_weights=False,
                       pixel_height=32, pixel_width=32))


def test_a_bad_scheduler_on_the_hub_is_refused_before_the_experts_download(stand_in_hub, expert_repos, tmp_path,
                                                                          monkeypatch):
    bad = tmp_path / "scheduler_config.json"
    bad.write_text(json.dumps({**SCHEDULER, "extra_one_step": False}))
    repos = {**stand_in_hub["repos"], T2V_REPO: {**expert_repos[T2V_REPO], "scheduler/scheduler_config.json": bad}}
    recipe = tiny(T2V)
    hub = hub_for({**stand_in_hub, "repos": repos}, {T2V: recipe}, tmp_path, monkeypatch)
    checkpoint = with_shared_components(stand_in_hub, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="extra_one_step False; wm_jax builds the table with extra_one_step"):
        run(RunOptions(slug=T2V, checkpoint=str(checkpoint), output_dir=str(tmp_path / "out"), prompt=PROMPT))
    assert hub.calls == [(T2V_REPO, ("scheduler/*", "model_index.json"))]  # the experts were never fetched
    assert not (checkpoint / "dit").exists()


def test_convert_path_takes_an_expert_folder_and_a_boundary_only_there(pipeline_folder, tmp_path):
    import converters

    src, _ = pipeline_folder
    manifest = converters.convert_path(src, tmp_path / "pair", boundary=0.9)
    assert manifest["kind"] == wan_dit.EXPERTS_KIND and manifest["boundary"] == 0.9
    with pytest.raises(CheckpointError, match="a boundary applies to two-expert folders only"):
        converters.convert_path(src / "transformer", tmp_path / "one", boundary=0.9)
    assert converters.convert_path(src / "transformer", tmp_path / "one")["kind"] == wan_dit.KIND
