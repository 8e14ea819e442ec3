"""`wm-jax run` on the real-checkpoint path, end to end on tiny shapes and a stand-in model hub.

Two recipes derived from the shipped ones (their hub files, task, decoder, schedule and cache layout
kept; tiny model sizes): LingBot-World Fast (I2V + camera, Wan VAE encoder and decoder, safetensors DiT
with its config.json, umT5 and VAE as torch pickles) and Self-Forcing with TAEHV (T2V, the DiT inside a
Self-Forcing training `.pt`). Only `huggingface_hub.snapshot_download` is replaced: it filters a
repo's files with the real pattern matcher and links them into one snapshot folder per repo that fills
up across calls, as the hub cache does. Everything else runs for real: `wm_jax.io.hub.download`, the
converters into `--checkpoint DIR/{dit,vae,decoder,text_encoder}`, the loaders, the umT5 tokenizer and
encoder, the streaming rollout and the mp4 / stats writers.
"""

from __future__ import annotations

import gc
import json
import os
import weakref
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")

from huggingface_hub.errors import LocalEntryNotFoundError  # noqa: E402
from huggingface_hub.utils import filter_repo_objects  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from converters import umt5 as umt5_conv  # noqa: E402
from converters import wan_dit  # noqa: E402
from converters import wan_vae as wan_vae_conv  # noqa: E402
from wm_jax.io import checkpoint as ckpt  # noqa: E402
from wm_jax.io.hub import HubError, download  # noqa: E402
from wm_jax.io.safetensors_io import CheckpointError  # noqa: E402
from wm_jax.models.text_encoding import TextEncoder  # noqa: E402
from wm_jax.models.umt5 import UMT5Config  # noqa: E402
from wm_jax.models.wan_vae import WanVAEConfig  # noqa: E402
from wm_jax.streaming import run as run_module  # noqa: E402
from wm_jax.streaming.components import load_components, model_config  # noqa: E402
from wm_jax.streaming.engine import WorldRollout  # noqa: E402
from tests.conftest import plan_of  # noqa: E402
from wm_jax.streaming.recipes import load_recipe  # noqa: E402
from wm_jax.streaming.run import SHIPPED_EXAMPLE, RunOptions, run  # noqa: E402
from tests.wan_testlib import (TINY, make_tokenizer_folder, random_original_state, random_rule_state,  # noqa: E402
                               random_taehv_state)

LINGBOT, SELF_FORCING = "lingbot-world-fast", "self-forcing-wan2.1-t2v-1.3b-taehv"
LINGBOT_V2, V2_REPO = "lingbot-world-v2-fast", "robbyant/lingbot-world-v2-14b-causal-fast"
PROMPT = "a red fox jumps over the lazy dog"
T5_FILE, VAE_FILE = "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth"
TOKENIZER_DIR = "google/umt5-xxl"
TINY_T5 = UMT5Config(vocab_size=128, dim=TINY["text_dim"], dim_attn=64, dim_ffn=128, num_heads=2, num_layers=2,
                     num_buckets=32)
SHAPE = dict(pixel_height=64, pixel_width=96, total_blocks=2)


def tiny_recipes() -> dict:
    """The shipped recipes at tiny sizes; `weights`, task, decoder, schedule and cache layout unchanged.

    LingBot's DiT has head_dim 64 (4 heads of a 256-wide model): the shape-based inference would say 2
    heads (head_dim 128), so only the repo's config.json gets it right.
    """
    lingbot = load_recipe(LINGBOT).replace(
        model=dict(TINY, num_heads=4, in_dim=36, out_dim=16, camera_channels=384), vae_config=dict(dim=8),
        **SHAPE)
    self_forcing = load_recipe(SELF_FORCING).replace(model=dict(TINY), prompt=PROMPT, **SHAPE)
    # v2 sizes the video from the image at max_area pixels: a tiny area here (the aspect rule is kept)
    v2 = load_recipe(LINGBOT_V2).replace(model=lingbot.model, vae_config=dict(dim=8), total_blocks=2,
                                         max_area=64 * 96)
    return {LINGBOT: lingbot, SELF_FORCING: self_forcing, LINGBOT_V2: v2}


RECIPES = tiny_recipes()


# ---------------------------------------------------------------------------------------------------
# Upstream-layout files and the stand-in hub.
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """repo -> {path in the repo: local file}, the files in the layout and format the real repos use."""
    root = tmp_path_factory.mktemp("upstream")
    lingbot, self_forcing = RECIPES[LINGBOT], RECIPES[SELF_FORCING]

    def write(name, save):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save(path)
        return path

    as_torch = lambda state, dtype=None: {k: torch.from_numpy(v).to(dtype or torch.float32) for k, v in state.items()}
    cfg = model_config(lingbot)
    dit = write("lingbot/diffusion_pytorch_model.safetensors",
                lambda p: save_file(random_original_state(cfg, seed=1), str(p)))
    dit_config = write("lingbot/config.json", lambda p: p.write_text(json.dumps(
        {"_class_name": "WanModel", "dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "num_heads": cfg.num_heads,
         "num_layers": cfg.num_layers, "in_dim": cfg.in_dim, "out_dim": cfg.out_dim, "text_len": 512,
         "eps": 1e-6})))
    t5 = write(T5_FILE, lambda p: torch.save(as_torch(random_rule_state(
        umt5_conv.RULES, umt5_conv.expected_params(TINY_T5), seed=2), torch.bfloat16), p))  # bf16 like upstream
    tokenizer = make_tokenizer_folder(root / "tokenizer")
    vae_module = wan_vae_conv.abstract_module(WanVAEConfig(**lingbot.vae_config))
    vae = write(VAE_FILE, lambda p: torch.save(as_torch(random_rule_state(
        wan_vae_conv.rules_for(vae_module), ckpt.param_spec(vae_module), seed=3)), p))
    sf_cfg = model_config(self_forcing)
    prefixed = lambda seed: {f"model.{k}": v for k, v in as_torch(random_original_state(sf_cfg, seed)).items()}
    sf_dit = write("self_forcing_dmd.pt", lambda p: torch.save(
        {"generator": prefixed(4), "generator_ema": prefixed(5), "critic": {"model.x": torch.zeros(1)}}, p))
    taehv = write("taew2_1.pth", lambda p: torch.save(as_torch(random_taehv_state(6, 16), torch.float16), p))
    readme = write("README.md", lambda p: p.write_text("model card\n"))

    v2_shards = root / "v2" / "transformers"  # the v2 repo's layout: sharded original keys + index + config
    v2_state = random_original_state(cfg, seed=7)
    keys = list(v2_state)
    weight_map = {}
    for s in range(2):
        name = f"diffusion_pytorch_model-{s + 1:05d}-of-00002.safetensors"
        write(f"v2/transformers/{name}", lambda p, s=s: save_file({k: v2_state[k] for k in keys[s::2]}, str(p)))
        weight_map.update({k: name for k in keys[s::2]})
    write("v2/transformers/diffusion_pytorch_model.safetensors.index.json",
          lambda p: p.write_text(json.dumps({"metadata": {}, "weight_map": weight_map})))
    write("v2/transformers/config.json", lambda p: p.write_text(dit_config.read_text()))
    tokenizer_files = {f"{TOKENIZER_DIR}/{f.name}": f for f in tokenizer.iterdir()}
    text_repo = {T5_FILE: t5, **tokenizer_files, "README.md": readme}
    return {
        "robbyant/lingbot-world-fast": {"diffusion_pytorch_model.safetensors": dit, "config.json": dit_config,
                                        "README.md": readme},
        "robbyant/lingbot-world-base-cam": {**text_repo, VAE_FILE: vae},
        "gdhe17/Self-Forcing": {"checkpoints/self_forcing_dmd.pt": sf_dit, "README.md": readme},
        "Wan-AI/Wan2.1-T2V-1.3B": {**text_repo, VAE_FILE: vae},
        "madebyollin/taehv": {"taew2_1.pth": taehv, "taew2_2.pth": taehv, "README.md": readme},
        V2_REPO: {**text_repo, VAE_FILE: vae, **{f"transformers/{p.name}": p for p in v2_shards.iterdir()}},
    }


class FakeHub:
    """`huggingface_hub.snapshot_download` over local repos: the real pattern filter, one snapshot folder per
    repo (files linked in, accumulating across calls), a matching-nothing request returns the folder as the
    real one does, and with HF_HUB_OFFLINE set a repo never fetched raises what the real one raises."""

    def __init__(self, repos: dict[str, dict[str, Path]], cache: Path):
        self.repos, self.cache = repos, cache
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        self.unmatched: list[tuple[str, str]] = []  # (repo, pattern) that selected no file of the repo

    def snapshot(self, repo_id: str) -> Path:
        return self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)

    def snapshot_download(self, repo_id, *, allow_patterns=None, cache_dir=None, revision=None, **kwargs):
        self.calls.append((repo_id, tuple(allow_patterns or ())))
        folder = self.snapshot(repo_id)
        if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
            if folder.is_dir():
                return str(folder)
            raise LocalEntryNotFoundError(
                "Cannot find an appropriate cached snapshot folder for the specified revision on the local disk and "
                "outgoing traffic has been disabled. To enable repo look-ups and downloads online, set "
                "'HF_HUB_OFFLINE=0' as environment variable.")
        if repo_id not in self.repos:
            raise LocalEntryNotFoundError(f"{repo_id}: not on the stand-in hub")
        files = self.repos[repo_id]
        for pattern in allow_patterns or ():
            if not list(filter_repo_objects(files, allow_patterns=[pattern])):
                self.unmatched.append((repo_id, pattern))
        for name in filter_repo_objects(files, allow_patterns=allow_patterns):
            target = folder / name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(files[name])
        return str(folder)

    def downloaded(self, repo_id: str) -> set[str]:
        folder = self.snapshot(repo_id)
        return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def hub(upstream, tmp_path, monkeypatch) -> FakeHub:
    fake = FakeHub({repo: dict(files) for repo, files in upstream.items()}, tmp_path / "hf-cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(run_module, "load_recipe", lambda slug: RECIPES[slug])
    return fake


class TextProbe:
    """What the umT5 encoder did: the prompts its model ran on (a cached prompt would not count), and how
    many encoders were still alive when each rollout started streaming."""

    def __init__(self):
        self.prompts: list[str] = []
        self.encoders: list[weakref.ref] = []
        self.alive_at_start: list[int] = []


@pytest.fixture
def text_probe(monkeypatch) -> TextProbe:
    probe = TextProbe()
    real_encode, real_start = TextEncoder.encode, WorldRollout.start

    def encode(self, batch):
        before = self.encoder_calls
        out = real_encode(self, batch)
        if self.encoder_calls > before:
            probe.prompts.extend([batch] if isinstance(batch, str) else batch)
        probe.encoders.append(weakref.ref(self))
        assert all(f.dtype == np.float32 and f.shape[1] == TINY_T5.dim for f in out)
        return out

    def start(self, *args, **kwargs):
        gc.collect()
        probe.alive_at_start.append(sum(ref() is not None for ref in probe.encoders))
        return real_start(self, *args, **kwargs)

    monkeypatch.setattr(TextEncoder, "encode", encode)
    monkeypatch.setattr(WorldRollout, "start", start)
    return probe


def video_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


def check_outputs(report: dict, out: Path, slug: str, frames: int) -> dict:
    stats = json.loads((out / f"stats_{slug}.json").read_text())
    assert stats["num_frames"] == report["num_frames"] == frames
    assert [c["index"] for c in stats["chunks"]] == [0, 1]
    assert stats["config"]["components"]["text"] == "umT5"
    assert stats["config"]["prompt"] == PROMPT
    assert video_frames(out / f"{slug}.mp4") == frames
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    return stats


def check_checkpoint(folder: Path, kinds: dict[str, str]) -> dict[str, dict]:
    assert sorted(p.name for p in folder.iterdir()) == sorted(kinds)  # no partial folders left
    manifests = {name: ckpt.read_manifest(folder / name, kind=kind) for name, kind in kinds.items()}
    tokenizer = folder / "text_encoder" / "tokenizer"  # self-contained: no tokenizer download at run time
    assert (tokenizer / "tokenizer.json").is_file() and (tokenizer / "tokenizer_config.json").is_file()
    t5 = manifests["text_encoder"]["config"]
    assert (t5["dim"], t5["num_layers"], t5["vocab_size"], t5["param_dtype"]) == (64, 2, 128, "bfloat16")
    return manifests


# ---------------------------------------------------------------------------------------------------
# The two recipes, end to end.
# ---------------------------------------------------------------------------------------------------


def test_lingbot_camera_recipe_downloads_converts_and_streams(hub, text_probe, tmp_path):
    options = RunOptions(slug=LINGBOT, checkpoint=str(tmp_path / "ckpt"), output_dir=str(tmp_path / "out"),
                         allow_pickle=True, example_data=True, example_idx=SHIPPED_EXAMPLE, prompt=PROMPT)
    report = run(options)

    assert hub.calls == [("robbyant/lingbot-world-fast", ("*.safetensors", "*.json")),
                         ("robbyant/lingbot-world-base-cam", (VAE_FILE,)),
                         ("robbyant/lingbot-world-base-cam", (T5_FILE, "google/*"))]
    assert hub.unmatched == []
    assert hub.downloaded("robbyant/lingbot-world-fast") == {"diffusion_pytorch_model.safetensors", "config.json"}
    assert hub.downloaded("robbyant/lingbot-world-base-cam") == {
        VAE_FILE, T5_FILE, *(f"{TOKENIZER_DIR}/{n}" for n in ("tokenizer.json", "tokenizer_config.json",
                                                               "special_tokens_map.json"))}
    manifests = check_checkpoint(tmp_path / "ckpt", {"dit": "wan_dit", "vae": "wan_vae", "text_encoder": "umt5"})
    dit = manifests["dit"]["config"]
    assert (dit["num_heads"], dit["in_dim"], dit["camera_channels"], dit["text_dim"]) == (4, 36, 384, 64)
    assert manifests["vae"]["config"]["dim"] == 8
    assert text_probe.prompts == [PROMPT]
    assert text_probe.alive_at_start == [0]  # the umT5 weights are freed before streaming
    stats = check_outputs(report, tmp_path / "out", LINGBOT, frames=21)  # 6 latent frames -> 1 + 4·5
    assert stats["config"]["components"]["weights"] == str(tmp_path / "ckpt")
    assert stats["config"]["task"] == "i2v_camera" and stats["config"]["world_scale_used"] == 1.2712

    # Already converted: a second run downloads nothing and converts nothing.
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "ckpt").glob("*/wm_jax.json")}
    again = run(RunOptions(**{**options.__dict__, "output_dir": str(tmp_path / "out2")}))
    assert len(hub.calls) == 3
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ckpt").glob("*/wm_jax.json")} == stamps
    assert again["num_frames"] == 21 and text_probe.prompts == [PROMPT, PROMPT]


def test_self_forcing_taehv_recipe_downloads_converts_and_streams(hub, text_probe, tmp_path):
    options = RunOptions(slug=SELF_FORCING, checkpoint=str(tmp_path / "ckpt"), output_dir=str(tmp_path / "out"),
                         allow_pickle=True)
    report = run(options)

    assert hub.calls == [("gdhe17/Self-Forcing", ("checkpoints/self_forcing_dmd.pt",)),
                         ("madebyollin/taehv", ("taew2_1.pth",)),
                         ("Wan-AI/Wan2.1-T2V-1.3B", (T5_FILE, "google/*"))]
    assert hub.unmatched == []
    assert VAE_FILE not in hub.downloaded("Wan-AI/Wan2.1-T2V-1.3B")  # the TAEHV recipe has no Wan VAE
    manifests = check_checkpoint(tmp_path / "ckpt", {"dit": "wan_dit", "decoder": "taehv", "text_encoder": "umt5"})
    assert manifests["dit"]["config"]["camera_channels"] in (0, None)
    ema = random_original_state(model_config(RECIPES[SELF_FORCING]), seed=5)  # not `generator`, not the critic
    np.testing.assert_array_equal(np.asarray(wan_dit.load(tmp_path / "ckpt" / "dit").head.linear.bias[...]),
                                  ema["head.head.bias"])
    assert text_probe.prompts == [PROMPT]  # the recipe's prompt
    check_outputs(report, tmp_path / "out", SELF_FORCING, frames=21)  # TAEHV: 3·4 - 3, then 3·4

    run(RunOptions(**{**options.__dict__, "output_dir": str(tmp_path / "out2"), "total_blocks": 1}))
    assert len(hub.calls) == 3


def test_lingbot_v2_recipe_converts_the_sharded_transformers_folder_and_streams(hub, text_probe, tmp_path):
    """The v2 repo's layout: the DiT as `transformers/` shards + index + config.json (original keys, camera
    layers), umT5 and the VAE as pickles in the same repo; the video size from the example image's aspect."""
    report = run(RunOptions(slug=LINGBOT_V2, checkpoint=str(tmp_path / "ckpt"), output_dir=str(tmp_path / "out"),
                            allow_pickle=True, example_data=True, example_idx=SHIPPED_EXAMPLE, prompt=PROMPT))
    assert hub.calls == [(V2_REPO, ("transformers/*.safetensors", "transformers/*.json")),
                         (V2_REPO, (VAE_FILE,)), (V2_REPO, (T5_FILE, "google/*"))]
    assert hub.unmatched == []
    manifests = check_checkpoint(tmp_path / "ckpt", {"dit": "wan_dit", "vae": "wan_vae", "text_encoder": "umt5"})
    assert manifests["dit"]["num_tensors"] == len(random_original_state(model_config(RECIPES[LINGBOT_V2]), 7))
    assert manifests["dit"]["config"]["num_heads"] == 4  # from transformers/config.json (shapes say 2)
    np.testing.assert_array_equal(np.asarray(wan_dit.load(tmp_path / "ckpt" / "dit").head.linear.bias[...]),
                                  random_original_state(model_config(RECIPES[LINGBOT_V2]), 7)["head.head.bias"])
    stats = check_outputs(report, tmp_path / "out", LINGBOT_V2, frames=1 + 4 * 3 + 4 * 4)  # two 4-frame chunks
    assert stats["config"]["plan"]["chunk_frames"] == 4


# ---------------------------------------------------------------------------------------------------
# Failures: offline, a file missing on the hub, a conversion that dies half way, leftovers.
# ---------------------------------------------------------------------------------------------------


def lingbot_options(tmp_path: Path, **changes) -> RunOptions:
    return RunOptions(**{**dict(slug=LINGBOT, checkpoint=str(tmp_path / "ckpt"), output_dir=str(tmp_path / "out"),
                                allow_pickle=True, example_data=True, example_idx=SHIPPED_EXAMPLE), **changes})


def test_offline_hub_fails_clearly_and_leaves_nothing(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    message = (r"(?s)cannot download robbyant/lingbot-world-fast.*HF_HUB_OFFLINE is set.*"
               r"hf download robbyant/lingbot-world-fast --include '\*\.safetensors' --include '\*\.json'")
    with pytest.raises(HubError, match=message):
        run(lingbot_options(tmp_path))
    assert not (tmp_path / "ckpt").exists() or not list((tmp_path / "ckpt").iterdir())
    assert not (tmp_path / "out" / f"{LINGBOT}.mp4").exists()


@pytest.mark.parametrize("missing, message, converted", [
    # The hub cache already holds this repo's umT5 files from an earlier run: its snapshot folder is not empty.
    (VAE_FILE, rf"robbyant/lingbot-world-base-cam: no files match \['{VAE_FILE}'\]", ["dit"]),
    # The tokenizer files match the umT5 patterns, the weights file does not exist.
    (T5_FILE, rf"robbyant/lingbot-world-base-cam: .* has no '{T5_FILE}', the text_encoder weights", ["dit", "vae"]),
], ids=["vae", "umt5"])
def test_file_missing_on_hub_names_repo_and_file(hub, tmp_path, missing, message, converted):
    del hub.repos["robbyant/lingbot-world-base-cam"][missing]
    if missing == VAE_FILE:
        download("robbyant/lingbot-world-base-cam", [T5_FILE, "google/*"])
    with pytest.raises(HubError, match=message):
        run(lingbot_options(tmp_path))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == converted  # kept for the next run


def test_failed_conversion_leaves_no_partial_folder_and_resumes(hub, tmp_path, monkeypatch):
    real_write = wan_vae_conv.write_params

    def disk_full(folder, params):
        real_write(folder, params)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(wan_vae_conv, "write_params", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run(lingbot_options(tmp_path))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["dit"]
    monkeypatch.setattr(wan_vae_conv, "write_params", real_write)

    # Without --allow_pickle the VAE pickle is refused before any download.
    with pytest.raises(CheckpointError, match="allow_pickle"):
        run(lingbot_options(tmp_path, allow_pickle=False))
    assert len(hub.calls) == 2  # the DiT once, the VAE once (the failed conversion)

    parts = load_components(RECIPES[LINGBOT], plan_of(RECIPES[LINGBOT]), tmp_path / "ckpt", compute_dtype=jnp.float32,
                            allow_pickle=True)
    assert parts.vae_encoder is not None and parts.description["text"] == "umT5"
    assert [repo for repo, _ in hub.calls[2:]] == ["robbyant/lingbot-world-base-cam"] * 2  # VAE again, then umT5
    check_checkpoint(tmp_path / "ckpt", {"dit": "wan_dit", "vae": "wan_vae", "text_encoder": "umt5"})


def test_leftover_folder_without_manifest_is_named(hub, tmp_path):
    (tmp_path / "ckpt" / "dit").mkdir(parents=True)
    (tmp_path / "ckpt" / "dit" / "stray.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"(?s)ckpt/dit.*no wm_jax\.json.*remove it"):
        run(lingbot_options(tmp_path))
    assert hub.calls == [] and (tmp_path / "ckpt" / "dit" / "stray.bin").is_file()


@pytest.mark.parametrize("slug, changes, message", [
    (LINGBOT, dict(in_dim=16, camera_channels=None), "takes 16 input channels; recipe .* feeds 36"),
    (LINGBOT, dict(camera_channels=None), "has no camera layers"),
    (LINGBOT, dict(text_dim=32), "expects 32-wide text features; the text encoder .* gives 64"),
])
def test_dit_that_cannot_serve_the_recipe_is_refused(slug, changes, message, tmp_path):
    from wm_jax.io.safetensors_io import CheckpointError
    from wm_jax.streaming.components import check_compatible

    recipe = RECIPES[slug]
    good = model_config(recipe)
    check_compatible(recipe, good, good.text_dim, tmp_path)
    with pytest.raises(CheckpointError, match=message):
        check_compatible(recipe, good.replace(**changes), 64, tmp_path)


@pytest.mark.parametrize("changes, message", [
    (dict(num_heads=2), r"attention heads 2 where the rollout plan has 4"),
    (dict(in_dim=16, camera_channels=None), r"condition channels 0 where the rollout plan has 20"),
    (dict(in_dim=100, out_dim=48), r"latent channels 48 where the rollout plan has 16; condition channels 52 where "
                                   r"the rollout plan has 20"),
])
def test_dit_other_than_the_plan_is_refused(changes, message, tmp_path):
    from wm_jax.streaming.components import check_plan

    recipe = RECIPES[LINGBOT]
    good, plan = model_config(recipe), plan_of(recipe)
    check_plan(plan, good, tmp_path / "dit")
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'dit'}: the converted DiT has {message} \(the plan"):
        check_plan(plan, good.replace(**changes), tmp_path / "dit")
