"""diffusers-wan peer adapter, run through `run_peer` (child process) on the CPU with a tiny Wan config.

The installed diffusers when present; a stand-in diffusers tree in tmp_path for the checkout path (it must win
over the installed package), a forward that fails mid-run, and a torch.compile that fails. torch.compile itself
is not run here (about 30 s for the tiny model on a 2-core CPU); the GPU benchmark exercises it.
"""

import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from wm_jax.bench.peers import check_checkout, run_peer  # noqa: E402
from wm_jax.bench.peers.job import PeerJob  # noqa: E402
from wm_jax.models.config import WanConfig  # noqa: E402

TINY = WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32)

STANDIN = '''
import torch

STANDIN = True  # marker: this is the test's stand-in, not diffusers
FAIL_ON_CALL = {fail_on_call}
if {break_compile}:
    def _broken_compile(*args, **kwargs):
        raise RuntimeError("stand-in: no C compiler here")
    torch.compile = _broken_compile


class WanTransformer3DModel(torch.nn.Module):
    calls = 0

    def __init__(self, patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                 out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                 rope_max_seq_len=1024, pos_embed_seq_len=None):
        super().__init__()
        self.proj = torch.nn.Linear(in_channels, out_channels)
        self.text = torch.nn.Linear(text_dim, out_channels)

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image=None,
                return_dict=True, attention_kwargs=None):
        type(self).calls += 1
        if type(self).calls == FAIL_ON_CALL:
            raise RuntimeError(f"stand-in failure on call {{type(self).calls}}")
        x = self.proj(hidden_states.movedim(1, -1)) + self.text(encoder_hidden_states).mean(1)[:, None, None, None]
        out = x.movedim(-1, 1)
        return (out,) if not return_dict else {{"sample": out}}
'''


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny ops: thread start-up dominates on small CI machines


def _job(upstream_dir=None, **overrides) -> PeerJob:
    fields = dict(peer="diffusers-wan", upstream_dir=upstream_dir, model=TINY.to_dict(), pixel_height=32,
                  pixel_width=48, latent_height=4, latent_width=6, latent_channels=16, chunk_frames=3,
                  tokens_per_frame=6, total_blocks=1, timesteps=[1000.0], context_timestep=0.0, shift=5.0,
                  sink_frames=0, ring_frames=None, text_tokens=7, dtype="float32", seed=0, device="cpu",
                  forward_frames=3, forward_warmup=1, forward_iters=3, compile=False)
    fields.update(overrides)
    return PeerJob(**fields)


def _standin(root: Path, fail_on_call: int = 0, break_compile: bool = False) -> Path:
    """A diffusers-shaped tree with only the module the adapter imports."""
    package = root / "src" / "diffusers"
    (package / "models" / "transformers").mkdir(parents=True)
    (package / "__init__.py").write_text('__version__ = "0.0.standin"\n')
    (package / "models" / "__init__.py").write_text("")
    (package / "models" / "transformers" / "__init__.py").write_text("")
    (package / "models" / "transformers" / "transformer_wan.py").write_text(
        textwrap.dedent(STANDIN.format(fail_on_call=fail_on_call, break_compile=break_compile)))
    return root


def test_checkout_wins_over_installed(tmp_path):
    """The stand-in is imported, not the installed diffusers; its torch.compile fails, which keeps the eager
    figures and exits cleanly with `compile_error`."""
    root = _standin(tmp_path / "diffusers", break_compile=True)
    assert check_checkout("diffusers-wan", str(root)).path == str(root.resolve())
    result = run_peer(_job(str(root), compile=True), timeout_s=60)
    assert result["error"] is None and result["returncode"] == 0, result.get("output_tail")
    module_file = root.resolve() / "src" / "diffusers" / "models" / "transformers" / "transformer_wan.py"
    assert f"diffusers 0.0.standin (checkout): {module_file}" in result["notes"]
    assert result["config"]["diffusers_file"] == str(module_file)
    assert result["config"]["num_params"] == 16 * 16 + 16 + 32 * 16 + 16
    assert len(result["forward"]["eager"]["ms"]) == 3
    assert "no C compiler" in result["compile_error"]
    assert not result["forward"].get("compiled", {}).get("ms")
    assert any(n.startswith("torch.compile failed") for n in result["notes"])


def test_failure_keeps_earlier_calls(tmp_path):
    root = _standin(tmp_path / "diffusers", fail_on_call=3)  # call 1: warmup, call 2: first timed call
    result = run_peer(_job(str(root)), timeout_s=60)
    assert result["returncode"] == 1
    assert "stand-in failure on call 3" in result["error"]
    assert len(result["forward"]["eager"]["ms"]) == 1


def test_installed_diffusers_eager():
    pytest.importorskip("diffusers")
    result = run_peer(_job(), timeout_s=120)
    assert result["error"] is None and result["returncode"] == 0, result.get("output_tail")
    ms = result["forward"]["eager"]["ms"]
    assert len(ms) == 3 and all(t > 0 for t in ms)
    assert "compiled" not in result["forward"]
    config = result["config"]
    assert config["kwargs"]["num_attention_heads"] == 2 and config["kwargs"]["attention_head_dim"] == 32
    assert config["kwargs"]["ffn_dim"] == 128 and config["kwargs"]["text_dim"] == 32
    assert config["num_params"] == TINY.num_params()  # diffusers' model has exactly our parameter count
    assert config["tokens"] == 3 * 2 * 3 and config["dtype"] == "float32"
    assert any(n.startswith("diffusers ") and "(installed)" in n for n in result["notes"])
    assert any("backend native" in n for n in result["notes"])
    assert any("scaled_dot_product" in n for n in result["notes"] if n.startswith("eager SDPA ops"))


def test_config_mapping():
    from wm_jax.bench.peers.diffusers_wan import diffusers_kwargs

    i2v = diffusers_kwargs(TINY.replace(in_dim=36, image_dim=1280))
    assert i2v["in_channels"] == 36 and i2v["image_dim"] == 1280 and i2v["added_kv_proj_dim"] == 64
    assert "pos_embed_seq_len" not in i2v
    with pytest.raises(ValueError, match="camera"):
        diffusers_kwargs(TINY.replace(in_dim=36, camera_channels=384))
