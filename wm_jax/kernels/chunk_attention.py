"""wm_jax's own chunk-vs-cache attention kernel (Pallas Mosaic GPU, Hopper).

One kernel computes what a streaming denoising pass needs: the current chunk's queries attend,
bidirectionally, to the chunk's own keys/values AND to the valid prefix of one layer of the stacked
KV cache, read in place — no layer slice, no concatenation, no mask tensor, no second kernel to merge
two partial softmaxes. Layout is BTNH throughout:

  q, k, v           [B, L, N, d]            the chunk (keys already rotated), bf16 / fp16
  cache_k, cache_v  [layers, B, T, N, d]    every layer's cache, same dtype
  layer, valid      int32 scalars           the layer to read and its valid token count (≤ T)
  -> out            [B, L, N, d]            softmax(q·[k; cache]ᵀ/√d)·[v; cache] in q's dtype

Schedule (FlashAttention-3 style, one CTA per (query tile, head, batch)):
- three warpgroups: two compute warpgroups own 64 query rows each; one memory warpgroup streams key /
  value blocks into a ring of `stages` shared-memory slots with TMA, own blocks first, then cache
  blocks. The total step count is a run-time value (it depends on `valid`); every warpgroup derives it
  from the same two scalars, so their barrier traffic matches.
- Q·Kᵀ and P·V run on warpgroup MMA (bf16 in, fp32 accumulate); the online softmax is in fp32 in
  registers with exp2 and the 1/√d scale folded into one constant. A schedule barrier makes the two
  compute warpgroups take the tensor cores in turn, so one's softmax hides under the other's MMAs.
- Ragged sizes without padding by callers: TMA zero-fills rows past the end of a tensor and clips
  stores there, so the last query tile may hang over L; only the one key block that ends inside the
  own keys and the one that ends inside the valid cache are masked (an iota compare), every other
  block runs unmasked. Own keys come first, so the running max is finite before any masked block and
  every masked block keeps at least one key.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

_LOG2_E = math.log2(math.e)
_COMPUTE_WARPGROUPS = 2
_MEMORY_WARPGROUP = 2  # the thread index of the TMA warpgroup


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Tile sizes: `block_q` query rows per compute warpgroup (a CTA covers 2·block_q), `block_kv` keys
    per pipeline step, `stages` shared-memory slots per K and per V."""
    block_q: int = 64
    block_kv: int = 128
    stages: int = 2
    pingpong: bool = True  # the schedule barrier that makes the compute warpgroups alternate on the MMAs
    heads_major: bool = True  # launch order: True = the heads of one query tile run side by side (H200:
    #                           +2-10 % over False = a head's query tiles side by side)


HEAD_DIMS = (64, 128)  # 256 would need 2·64·256 + 4·128·256 bf16 = 320 KB of shared memory (228 KB per SM)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def is_hopper(device: jax.Device) -> bool:
    """A Hopper-class GPU (compute capability 9.x: H100, H200, H800, GH200, H20)."""
    if device.platform not in ("gpu", "cuda"):
        return False
    capability = str(getattr(device, "compute_capability", ""))
    if capability:
        return capability.startswith("9")
    return any(name in device.device_kind for name in ("H100", "H200", "H800", "H20"))


def unsupported_reason(q: jax.Array, cache_k: jax.Array) -> str | None:
    """Why this kernel cannot serve these operands (None when it can): bf16/fp16, head_dim in `HEAD_DIMS`,
    the cache in q's dtype with a buffer of whole 8-row TMA tiles, a CUDA runtime that compiles it right
    (the device itself is checked by `is_hopper`)."""
    if jnp.dtype(q.dtype) not in DTYPES:
        return f"dtype {q.dtype} (the kernel takes bfloat16 or float16)"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim {q.shape[-1]} (the kernel takes {HEAD_DIMS})"
    if cache_k.dtype != q.dtype:
        return f"cache dtype {cache_k.dtype} differs from the queries' {q.dtype}"
    if cache_k.shape[2] % 8 and cache_k.shape[2] >= KernelConfig.block_kv:
        return (f"cache buffer of {cache_k.shape[2]} tokens per layer (TMA tiles need a multiple of 8; "
                "CacheLayout.buffer_tokens sizes it so)")
    if _MISCOMPILING_CUDA[0] <= _cuda_runtime_version() < _MISCOMPILING_CUDA[1]:
        return "CUDA 12.8.0 up to 12.9.1, whose ptxas miscompiles masked Mosaic GPU attention loops"
    return None


_MISCOMPILING_CUDA = (12080, 12091)  # jax's own Mosaic attention refuses masking on these runtimes


def _cuda_runtime_version() -> int:
    """The CUDA runtime's version as jax reports it (12080 = 12.8.0), 0 where unknown (no CUDA jaxlib)."""
    try:
        from jax._src.lib import cuda_versions

        return int(cuda_versions.cuda_runtime_get_version()) if cuda_versions is not None else 0
    except Exception:  # noqa: BLE001  (a private module: unreadable means unknown, never a failed attention call)
        return 0


def chunk_cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, cache_k: jax.Array, cache_v: jax.Array,
                          layer: jax.Array, valid: jax.Array, *, config: KernelConfig = KernelConfig(),
                          interpret: bool = False) -> jax.Array:
    """Attention of the chunk over [own keys ; layer `layer`'s first `valid` cache tokens] (module doc).

    interpret=True runs the kernel in Pallas' GPU interpreter (CPU tests): the same warpgroups, TMA
    ring, barriers, step counts and masks, but the interpreter has no warpgroup MMA on a transposed
    shared-memory operand nor accumulator re-initialisation, so there Q·Kᵀ and P·V are plain dots.
    """
    b, length, heads, head_dim = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape} must share one shape [B, L, N, d]")
    if cache_k.shape != cache_v.shape or cache_k.ndim != 5 or cache_k.shape[1:2] + cache_k.shape[3:] != (
            b, heads, head_dim):
        raise ValueError(f"cache {cache_k.shape} / {cache_v.shape} must be [layers, {b}, T, {heads}, {head_dim}]")
    if length == 0:
        raise ValueError("the chunk has no tokens (q [B, 0, N, d])")
    block_q, block_kv = config.block_q, config.block_kv
    # TMA boxes may hang over a tensor's end but not exceed its extent: tiny operands are padded (rows
    # past the end are masked like any ragged tail; only test-sized shapes take this copy). The
    # interpreter does not clip a store that hangs over the end as TMA does: there the queries are
    # padded to whole tiles.
    own_rows = max(pl.cdiv(length, 8) * 8, 2 * block_q, block_kv)  # whole 8-row TMA tiles
    if interpret:
        own_rows = pl.cdiv(own_rows, 2 * block_q) * 2 * block_q
    if own_rows != length:
        pad = ((0, 0), (0, own_rows - length), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    buffer = cache_k.shape[2]
    valid = jnp.clip(valid, 0, buffer)  # never count rows past the buffer (or the padding below) as keys
    if buffer < block_kv:
        pad = ((0, 0), (0, 0), (0, block_kv - buffer), (0, 0), (0, 0))
        cache_k, cache_v = jnp.pad(cache_k, pad), jnp.pad(cache_v, pad)
    elif buffer % 8:
        raise ValueError(unsupported_reason(q, cache_k))
    out = _call(q, k, v, cache_k, cache_v, jnp.stack([layer, valid]).astype(jnp.int32), length=length,
                config=config, interpret=interpret)
    return out[:, :length] if own_rows != length else out


def _call(q, k, v, cache_k, cache_v, scalars, *, length: int, config: KernelConfig, interpret: bool):
    b, _, heads, head_dim = q.shape
    block_q, block_kv, stages = config.block_q, config.block_kv, config.stages
    q_tiles = pl.cdiv(length, 2 * block_q)
    dtype = q.dtype
    own_full, own_tail = divmod(length, block_kv)
    own_steps = own_full + (own_tail > 0)
    logit_scale = _LOG2_E / math.sqrt(head_dim)  # softmax in base 2: exp(x/√d) = 2^(x·log2e/√d)

    def body(scalars_ref, q_ref, k_ref, v_ref, cache_k_ref, cache_v_ref, out_ref, q_smem, k_smem, v_smem,
             k_ready, v_ready, q_ready, k_free, v_free, schedule):
        tile, head, batch = lax.axis_index("q_tiles"), lax.axis_index("heads"), lax.axis_index("batch")
        warpgroup = lax.axis_index("warpgroup")
        layer, valid = scalars_ref[0], scalars_ref[1]
        cache_full = lax.div(valid, jnp.int32(block_kv))
        cache_tail = valid - cache_full * block_kv
        total_steps = own_steps + cache_full + (cache_tail > 0).astype(jnp.int32)

        def in_layout(x, layout):  # register layouts are a lowering hint the interpreter does not take
            return x if interpret else plgpu.layout_cast(x, layout)

        def take_tensor_cores():
            if config.pingpong:
                plgpu.barrier_arrive(schedule)
                plgpu.barrier_wait(schedule)

        @pl.when(warpgroup < _COMPUTE_WARPGROUPS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            rows_smem = q_smem.at[warpgroup]
            first_row = tile * (2 * block_q) + warpgroup * block_q
            plgpu.copy_gmem_to_smem(q_ref.at[batch, pl.ds(first_row, block_q), head], rows_smem,
                                    q_ready.at[warpgroup])
            plgpu.barrier_wait(q_ready.at[warpgroup])
            running_max = in_layout(jnp.full((block_q,), -jnp.inf, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            denominator = in_layout(jnp.full((block_q,), 0.0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
            acc = in_layout(jnp.full((block_q, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)
            plgpu.barrier_wait(k_ready.at[0])
            pl.when(warpgroup == 1)(take_tensor_cores)

            def step(index, carry, keys_in_block=None):
                acc, running_max, denominator = carry
                slot = lax.rem(index, jnp.int32(stages))

                if interpret:
                    logits = jnp.dot(rows_smem[...], k_smem[slot].T, preferred_element_type=jnp.float32)
                    take_tensor_cores()
                else:
                    def scores(scores_ref):
                        plgpu.wgmma(scores_ref, rows_smem, k_smem.at[slot].transpose((1, 0)))
                        take_tensor_cores()
                        return scores_ref[...]
                    logits = pl.run_scoped(scores, plgpu.ACC((block_q, block_kv), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                if keys_in_block is not None:
                    key = (lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 1) if interpret else
                           plgpu.broadcasted_iota(jnp.int32, (block_q, block_kv), 1, layout=plgpu.Layout.WGMMA))
                    logits = jnp.where(key < keys_in_block, logits, -jnp.inf)
                new_max = jnp.maximum(running_max, logits.max(axis=1) * logit_scale)
                rescale = jnp.exp2(running_max - new_max)
                probs = jnp.exp2(logits * logit_scale - lax.broadcast_in_dim(new_max, logits.shape, [0]))
                acc = acc * lax.broadcast_in_dim(rescale, acc.shape, [0])
                denominator = denominator * rescale + probs.sum(axis=1)
                probs_lo = probs.astype(dtype)
                acc, denominator, new_max, probs_lo = lax.optimization_barrier(
                    (acc, denominator, new_max, probs_lo))
                if config.pingpong:
                    plgpu.barrier_arrive(schedule)
                plgpu.barrier_wait(v_ready.at[slot])
                if config.pingpong:
                    plgpu.barrier_wait(schedule)

                def wait_next_keys():
                    following = index + 1

                    @pl.when(following < total_steps)
                    def _():
                        plgpu.barrier_wait(k_ready.at[lax.rem(following, jnp.int32(stages))])

                if interpret:
                    acc = acc + jnp.dot(probs_lo, v_smem[slot], preferred_element_type=jnp.float32)
                    wait_next_keys()
                else:
                    def values(acc_ref):
                        plgpu.wgmma(acc_ref, probs_lo, v_smem.at[slot])
                        wait_next_keys()
                    acc = pl.run_state(values)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, new_max, denominator

            carry = (acc, running_max, denominator)
            carry = lax.fori_loop(0, own_full, step, carry)
            if own_tail:
                carry = lax.fori_loop(own_full, own_steps, lambda i, c: step(i, c, keys_in_block=own_tail), carry)
            carry = lax.fori_loop(own_steps, own_steps + cache_full, step, carry)
            carry = lax.fori_loop(own_steps + cache_full, total_steps,
                                  lambda i, c: step(i, c, keys_in_block=cache_tail), carry)
            acc, _, denominator = carry
            pl.when(warpgroup == 0)(take_tensor_cores)
            rows_smem[...] = (acc / lax.broadcast_in_dim(denominator, acc.shape, [0])).astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(rows_smem, out_ref.at[batch, pl.ds(first_row, block_q), head])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(warpgroup == _MEMORY_WARPGROUP)
        def _memory():
            plgpu.set_max_registers(40, action="decrease")

            def fetch(index, slot, source_ref, cache_ref, target_smem, ready):
                @pl.when(index < own_steps)
                def _own():
                    plgpu.copy_gmem_to_smem(source_ref.at[batch, pl.ds(index * block_kv, block_kv), head],
                                            target_smem.at[slot], ready.at[slot])

                @pl.when(index >= own_steps)
                def _cached():
                    start = (index - own_steps) * block_kv
                    plgpu.copy_gmem_to_smem(cache_ref.at[layer, batch, pl.ds(start, block_kv), head],
                                            target_smem.at[slot], ready.at[slot])

            @pl.loop(0, stages)
            def _prefetch(index):
                @pl.when(index < total_steps)
                def _():
                    fetch(index, index, k_ref, cache_k_ref, k_smem, k_ready)
                    fetch(index, index, v_ref, cache_v_ref, v_smem, v_ready)

            @pl.loop(0, jnp.maximum(total_steps - stages, 0))
            def _stream(index):
                slot = lax.rem(index, jnp.int32(stages))
                plgpu.barrier_wait(k_free.at[slot])
                fetch(index + stages, slot, k_ref, cache_k_ref, k_smem, k_ready)
                plgpu.barrier_wait(v_free.at[slot])
                fetch(index + stages, slot, v_ref, cache_v_ref, v_smem, v_ready)

            @pl.loop(jnp.maximum(total_steps - stages, 0), total_steps)
            def _drain(index):  # observe the last releases too: every wait matches one completion
                slot = lax.rem(index, jnp.int32(stages))
                plgpu.barrier_wait(k_free.at[slot])
                plgpu.barrier_wait(v_free.at[slot])

    def chunk_attention_kernel(scalars_ref, q_ref, k_ref, v_ref, cache_k_ref, cache_v_ref, out_ref):
        transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        pl.run_scoped(
            lambda *scratch: body(scalars_ref, q_ref, k_ref, v_ref, cache_k_ref, cache_v_ref, out_ref, *scratch),
            plgpu.SMEM((_COMPUTE_WARPGROUPS, block_q, head_dim), dtype, transforms=transforms),
            plgpu.SMEM((stages, block_kv, head_dim), dtype, transforms=transforms),
            plgpu.SMEM((stages, block_kv, head_dim), dtype, transforms=transforms),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=_COMPUTE_WARPGROUPS),
            plgpu.Barrier(num_arrivals=_COMPUTE_WARPGROUPS, num_barriers=stages),
            plgpu.Barrier(num_arrivals=_COMPUTE_WARPGROUPS, num_barriers=stages),
            plgpu.Barrier(num_arrivals=_COMPUTE_WARPGROUPS),
            collective_axes="warpgroup",
        )

    extra = {}
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams  # noqa: PLC0415
        # TMA zero-fills reads past a tensor's end; the interpreter does the same only when told to
        extra["interpret"] = InterpretGPUParams(out_of_bounds_reads="uninitialized", uninitialized_memory="zero")
    return plgpu.kernel(
        chunk_attention_kernel,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        grid=(heads, q_tiles, b) if config.heads_major else (q_tiles, heads, b),
        grid_names=("heads", "q_tiles", "batch") if config.heads_major else ("q_tiles", "heads", "batch"),
        num_threads=_COMPUTE_WARPGROUPS + 1,
        thread_name="warpgroup",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **extra,
    )(scalars, q, k, v, cache_k, cache_v)
