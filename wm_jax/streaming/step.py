"""The per-chunk step: denoise k passes against the frozen cache, then commit the clean chunk.

    x ← ε₀
    for pass i:   v ← net(x, t_i; cache read-only);   p ← x − flow_i · v
                  x ← signal_i · p + noise_i · ε_{i+1}                 (fresh noise; unused after the last)
    emit p of the last pass (x0);  commit: net(x0, t = 0) writes the chunk's clean K/V into the cache

For one network p is x0 and the next input is x0 re-noised to the next σ (flow = σ_i, signal = 1 − σ_{i+1},
noise = σ_{i+1}: `wm_jax.streaming.schedules`). A two-expert model (`ExpertPair`, FastVideo's causal
Wan2.2) runs the schedule's high-noise passes on the high-noise expert against its own cache, then the
low-noise passes on the other expert against its cache (the scales hold the boundary rule); both experts
attend to the text K/V the high-noise expert projects, and the commit runs both, each writing its own
cache. Params and cache are then pairs (high, low); every signature stays the same.

`StreamingStep` compiles two programs per (model, plan, chunk length): `denoise` (all k passes, one
`lax.scan` per expert) and `commit` (cache donated, updated in place). The chunk index never changes a
shape: the RoPE offset and the valid cache length are traced values, so the growth phase and the steady
state share both programs. The schedule's per-pass values are an input of `denoise` too, so a program
depends on the number of passes (and their split between experts) only: a recipe whose first block runs a
longer list (Causal-Forcing++) compiles one denoise program per distinct pass count, never one per block.
Called without a schedule, `denoise` runs the step's own.

Both run under `shard_map` over the plan's mesh with every operand in the sharding table's placement
(`wm_jax.parallel.sharding`): for Ulysses, weights, latents, noise and conditioning are whole on every
device, the KV cache holds each device's heads, and inside the model each device carries its share of
the tokens (`wm_jax.parallel.ulysses`).
On one device both are a `shard_map` over a mesh of one, and no exchange is emitted (`SequenceShards`
skips every collective when there is one shard).

Noise is an input, `[k, B, F, H, W, C]` (ε₀, then one re-noise draw per later pass): `chunk_noise`
derives it from one global key per (chunk, pass), and recorded upstream noise replays the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from wm_jax.models.wan import ExpertPair, WanModel
from wm_jax.parallel.mesh import put, replicated
from wm_jax.parallel.sharding import CROSS_KV_AXES, KV_CACHE_AXES, LATENT_AXES, NOISE_AXES, param_shardings
from wm_jax.streaming.kv_cache import KVCache, commit
from wm_jax.streaming.plan import RolloutPlan
from wm_jax.streaming.schedules import StepSchedule

Array = jax.Array


def chunk_noise(key: Array, chunk_index: int | Array, num_passes: int, shape: tuple[int, ...],
                dtype=jnp.float32) -> Array:
    """Noise for one chunk: [num_passes, *shape], pass p drawn from fold_in(fold_in(key, chunk), p).

    Depends only on (key, chunk, pass), not on how many chunks ran before or on the device count.
    """
    chunk_key = jax.random.fold_in(key, chunk_index)
    return jnp.stack([jax.random.normal(jax.random.fold_in(chunk_key, p), shape, dtype) for p in range(num_passes)])


@dataclass(frozen=True)
class ChunkInputs:
    """Per-chunk conditioning besides the noise (channels-last, chunk frames only).

    y: I2V [B, F, H, W, 20] (mask 4 | image latent 16) or None; camera: [B, F, H, W, C_cam] or None.
    """

    y: Array | None = None
    camera: Array | None = None


jax.tree_util.register_dataclass(ChunkInputs, data_fields=["y", "camera"], meta_fields=[])


class StreamingStep:
    """Jitted denoise / commit programs for one model (or expert pair) and rollout plan; `schedule` is the
    default of `denoise(params, cache, cross_kv, noise, inputs, schedule=None)`.

    `params` are placed on the plan's mesh with the sharding table's shardings when the step is built
    (a no-op when they already are, e.g. restored or created there). For an `ExpertPair`, `params` and
    the cache are tuples (high-noise expert's, low-noise expert's).
    """

    def __init__(self, model: WanModel | ExpertPair, schedule: StepSchedule, plan: RolloutPlan):
        self.paired = isinstance(model, ExpertPair)
        experts = model.experts if self.paired else (model,)
        split = [nnx.split(expert) for expert in experts]
        self.graphdefs = tuple(graphdef for graphdef, _ in split)
        self._check_split(schedule)
        self.schedule = schedule
        self.plan = plan
        self.layout = plan.cache
        self.config = experts[0].config
        self.compute_dtype = experts[0].compute_dtype
        mesh, rules = plan.mesh, plan.rules
        self.param_shardings = self._pack([param_shardings(params, rules, mesh) for _, params in split])
        self.params = put(self._pack([params for _, params in split]), self.param_shardings)
        one_cache = KVCache(k=rules.sharding(mesh, KV_CACHE_AXES), v=rules.sharding(mesh, KV_CACHE_AXES),
                            committed_frames=replicated(mesh))
        self.cache_sharding = self._pack([one_cache] * len(experts))
        self.cross_kv_sharding = rules.sharding(mesh, CROSS_KV_AXES)
        self.latent_sharding = rules.sharding(mesh, LATENT_AXES)
        self.noise_sharding = rules.sharding(mesh, NOISE_AXES)
        specs = lambda shardings: jax.tree_util.tree_map(lambda s: s.spec, shardings)
        in_specs = (specs(self.param_shardings), specs(self.cache_sharding), self.cross_kv_sharding.spec)
        passes = jax.shard_map(self._denoise, mesh=mesh, out_specs=self.latent_sharding.spec, check_vma=False,
                               in_specs=(*in_specs, self.noise_sharding.spec, self.latent_sharding.spec,
                                         PartitionSpec()))  # the schedule: whole on every device

        def denoise(params, cache, cross_kv, noise, inputs, schedule=None):
            return passes(params, cache, cross_kv, noise, inputs, self.schedule if schedule is None else schedule)

        commit_ = jax.shard_map(self._commit, mesh=mesh, out_specs=specs(self.cache_sharding), check_vma=False,
                                in_specs=(*in_specs, self.latent_sharding.spec, self.latent_sharding.spec))
        self.denoise = jax.jit(denoise, out_shardings=self.latent_sharding)
        self.commit = jax.jit(commit_, donate_argnums=(1,), out_shardings=self.cache_sharding)
        self._cross_kv = jax.jit(self._compute_cross_kv, out_shardings=self.cross_kv_sharding)
        self._init_cache = jax.jit(self._empty_cache, static_argnums=0, out_shardings=self.cache_sharding)
        self.replicated = replicated(mesh)

    def _check_split(self, schedule: StepSchedule) -> None:
        if len(schedule.expert_passes) != len(self.graphdefs):
            raise ValueError(f"the schedule splits its passes over {len(schedule.expert_passes)} expert(s); the model "
                             f"has {len(self.graphdefs)}")

    def _pack(self, per_expert: list):
        """Per-expert trees -> the step's form: the tree itself for one model, a tuple for a pair."""
        return tuple(per_expert) if self.paired else per_expert[0]

    def per_expert(self, tree) -> tuple:
        """The step's params, cache (or any per-expert tree) -> one tree per expert (high-noise first)."""
        return tuple(tree) if self.paired else (tree,)

    def init_cache(self, dtype=None) -> KVCache | tuple[KVCache, KVCache]:
        """An empty cache (one per expert), created directly in its sharding (each device allocates only its
        heads; the heads padded to a multiple of the device count)."""
        return self._init_cache(jnp.dtype(dtype or self.compute_dtype))

    def _empty_cache(self, dtype):
        cfg, plan = self.config, self.plan
        one = lambda: KVCache.zeros(plan.cache, cfg.num_layers, plan.batch, plan.shards.padded_heads, cfg.head_dim,
                                    dtype)
        return self._pack([one() for _ in self.graphdefs])

    def cross_kv(self, text: np.ndarray | Array, image_tokens: np.ndarray | Array | None = None) -> dict[str, Array]:
        """Cross-attention K/V for a prompt (once per prompt): text [B, Lc, text_dim] real tokens. An expert
        pair shares the high-noise expert's (FastVideo's one cross-attention cache, filled by its first call)."""
        text, image_tokens = self.whole((text, image_tokens))
        return self._cross_kv(self.params, text, image_tokens)

    def whole(self, tree):
        """Host or device values -> replicated on the plan's mesh (inputs of denoise / commit)."""
        return put(tree, self.replicated)

    def _compute_cross_kv(self, params, text, image_tokens):
        model = nnx.merge(self.graphdefs[0], self.per_expert(params)[0])
        return model.cross_kv(model.embed_text(text), image_tokens)

    def _forward(self, expert: int, params, x, t, cross_kv, inputs: ChunkInputs, cache: KVCache):
        model = nnx.merge(self.graphdefs[expert], params)
        if inputs.y is not None:
            x = jnp.concatenate([x, inputs.y.astype(x.dtype)], axis=-1)
        b, f = x.shape[:2]
        return model.forward_with_cross_kv(
            x, jnp.broadcast_to(t, (b, f)), cross_kv, camera=inputs.camera,
            frame_offset=cache.committed_frames, cache=cache.attention_view(self.layout), shards=self.plan.shards)

    def _denoise(self, params, cache, cross_kv, noise: Array, inputs: ChunkInputs, s: StepSchedule) -> Array:
        """noise [k, B, F, H, W, C] -> clean chunk x0 [B, F, H, W, C] (float32), the k passes of schedule `s`,
        each expert's share on that expert. The cache is only read."""
        if noise.shape[0] != s.num_steps:
            raise ValueError(f"noise holds {noise.shape[0]} draws for a schedule of {s.num_steps} passes")
        self._check_split(s)
        eps_next = jnp.roll(noise, -1, axis=0)  # pass i re-noises with draw i+1 (the last one is unused)
        per_pass = (jnp.asarray(s.t), jnp.asarray(s.flow_scale), jnp.asarray(s.signal_scale),
                    jnp.asarray(s.noise_scale), eps_next)
        x, first = noise[0].astype(jnp.float32), 0
        for expert, (expert_params, expert_cache, count) in enumerate(
                zip(self.per_expert(params), self.per_expert(cache), s.expert_passes)):
            if count == 0:
                continue

            def one_pass(x, scanned, expert=expert, expert_params=expert_params, expert_cache=expert_cache):
                t, flow_scale, signal_scale, noise_scale, eps = scanned
                flow, _ = self._forward(expert, expert_params, x, t, cross_kv, inputs, expert_cache)
                prediction = x - flow_scale * flow
                return signal_scale * prediction + noise_scale * eps, prediction

            x, predictions = jax.lax.scan(one_pass, x, jax.tree.map(lambda a: a[first:first + count], per_pass))
            first += count
        return predictions[-1]

    def _commit(self, params, cache, cross_kv, x0: Array, inputs: ChunkInputs):
        """Runs the clean chunk at t = 0 through each expert and writes its K/V (this device's heads) into that
        expert's cache (donated)."""
        t = jnp.zeros((), jnp.float32)
        updated = []
        for expert, (expert_params, expert_cache) in enumerate(zip(self.per_expert(params), self.per_expert(cache))):
            _, (k, v) = self._forward(expert, expert_params, x0, t, cross_kv, inputs, expert_cache)
            updated.append(commit(expert_cache, self.layout, k, v))
        return self._pack(updated)
