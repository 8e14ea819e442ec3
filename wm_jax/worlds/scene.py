"""A procedural, endless 3D world, rendered by sphere tracing in pure JAX (jittable, vmappable over seeds).

World frame (the live controls' one, `wm_jax.worlds.player`): x right, y DOWN (gravity is +y), z forward
for the identity pose. The ground is the plane y = EYE_HEIGHT, so a camera at y = 0 stands on it.

The xz-plane is cut into square cells of CELL_SIZE units. An integer hash of (cell index, seed) gives each
cell at most one object: a sphere, a box (turned about the vertical), a capsule pillar or a tree (trunk +
canopy); about a third of the cells stay empty. Every object keeps CELL_MARGIN units away from its cell's
sides and is at most MAX_OBJECT_HEIGHT tall, so a point's distance to the objects of *other* cells is at
least (its distance to its own cell's side + CELL_MARGIN) and at least its height above MAX_OBJECT_HEIGHT.
The scene distance evaluates only the point's own cell and takes that bound for the rest: a conservative
signed distance, so sphere tracing never steps through an object.

Per seed: the colour palette of the objects, the two tones of the 1-unit ground checker, the sky tint,
the sun's direction and the shape of the hazy hills on the horizon. Shading: Lambert from the sun with a
soft shadow ray, plus ambient; the checker's contrast fades where a pixel covers more than a checker
square, and fog blends everything into the horizon colour with distance.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

EYE_HEIGHT = 1.2  # world units from the camera (y = 0) down to the ground plane (y = EYE_HEIGHT)
CELL_SIZE = 5.0  # side of the square cells of the xz-plane, one object at most per cell
CELL_MARGIN = 0.5  # every object stays this far inside its cell
MAX_OBJECT_HEIGHT = 4.0  # no object reaches higher above the ground
MARCH_STEPS = 64  # sphere-tracing steps per camera ray
SHADOW_STEPS = 12  # steps of the soft shadow ray toward the sun
FAR = 60.0  # objects beyond this distance are not traced (fog has hidden them)
FOG_DISTANCE = 24.0  # fog = 1 - exp(-(distance / FOG_DISTANCE)^2)
AMBIENT = 0.38  # share of light that is not direct sunlight
PALETTE_SIZE = 6

EMPTY, SPHERE, BOX, PILLAR, TREE = range(5)
KIND_THRESHOLDS = (0.3, 0.55, 0.75, 0.87)  # hash uniform below each -> EMPTY, SPHERE, BOX, PILLAR; else TREE
FAR_AWAY = 1e3  # the distance reported for an absent shape


# ---------------------------------------------------------------------------------------------------
# Hashing: deterministic uniforms from integers.
# ---------------------------------------------------------------------------------------------------


def _avalanche(x: jax.Array) -> jax.Array:
    """uint32 -> uint32, every input bit flipping about half of the output bits."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _uniforms(key: jax.Array, count: int) -> list[jax.Array]:
    """`count` float32 arrays in [0, 1), shaped like the uint32 `key`, each from a further hash of it."""
    values = []
    for _ in range(count):
        key = _avalanche(key + jnp.uint32(0x9E3779B9))
        values.append((key >> 8).astype(jnp.float32) * (1.0 / (1 << 24)))
    return values


def _seed_key(seed) -> jax.Array:
    """An int seed (Python int in [0, 2^31) or traced int32 / uint32 scalar) -> a hashed uint32 key."""
    seed = jnp.asarray(seed)
    if seed.dtype != jnp.uint32:
        seed = lax.bitcast_convert_type(seed.astype(jnp.int32), jnp.uint32)
    return _avalanche(seed ^ jnp.uint32(0x5BD1E995))


def _hsv(hue, saturation, value) -> jax.Array:
    """HSV (broadcasting arrays, hue in turns) -> RGB [..., 3] in [0, 1]."""
    hue, saturation, value = (jnp.asarray(a, jnp.float32)[..., None] for a in (hue, saturation, value))
    sector = (jnp.array([5.0, 3.0, 1.0]) + hue * 6.0) % 6.0
    return value - value * saturation * jnp.clip(jnp.minimum(sector, 4.0 - sector), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------------
# Per-seed style and per-cell objects.
# ---------------------------------------------------------------------------------------------------


class Style(NamedTuple):
    """The colours and light of one world (all float32; colours RGB in [0, 1])."""
    palette: jax.Array  # [PALETTE_SIZE, 3] object colours
    ground_light: jax.Array  # [3] checker tone one
    ground_dark: jax.Array  # [3] checker tone two
    sky_zenith: jax.Array  # [3]
    sky_horizon: jax.Array  # [3] also the fog colour
    hills: jax.Array  # [3]
    sun: jax.Array  # [3] unit vector toward the sun (y < 0: above the horizon)
    hill_phases: jax.Array  # [2] radians, shift of the hill profile's two waves


def world_style(seed) -> Style:
    """The `Style` of world `seed` (int or traced int32 / uint32 scalar)."""
    u = _uniforms(_seed_key(seed), 14)
    hues = u[0] + jnp.arange(PALETTE_SIZE) / PALETTE_SIZE + 0.06 * (u[1] - 0.5)
    palette = _hsv(hues % 1.0, 0.62 + 0.2 * u[2], jnp.full(PALETTE_SIZE, 0.82 + 0.12 * u[3]))
    ground_hue = 0.05 + 0.35 * u[4]  # earth to grass
    ground_light = _hsv(ground_hue, 0.3 + 0.15 * u[5], 0.68)
    ground_dark = _hsv(ground_hue + 0.03, 0.35 + 0.15 * u[5], 0.42)
    sky_hue = 0.53 + 0.1 * u[6]
    sky_zenith = _hsv(sky_hue, 0.55 + 0.2 * u[7], 0.85)
    sky_horizon = _hsv(sky_hue - 0.02 + 0.06 * u[8], 0.18, 0.96)
    hills = _hsv(0.22 + 0.2 * u[9], 0.35, 0.55)
    sun_azimuth = 2.0 * jnp.pi * u[10]
    sun_elevation = jnp.radians(28.0 + 25.0 * u[11])
    sun = jnp.stack([jnp.cos(sun_elevation) * jnp.sin(sun_azimuth), -jnp.sin(sun_elevation),
                     jnp.cos(sun_elevation) * jnp.cos(sun_azimuth)])
    hill_phases = 2.0 * jnp.pi * jnp.stack([u[12], u[13]])
    return Style(palette, ground_light, ground_dark, sky_zenith, sky_horizon, hills, sun, hill_phases)


class Cell(NamedTuple):
    """The object of the cells holding some points; every field is an array shaped like the points' x."""
    kind: jax.Array  # int32: EMPTY, SPHERE, BOX, PILLAR or TREE
    centre: tuple  # (x, y, z) world position of the main shape (a tree's canopy)
    half: tuple  # (x, y, z) half extents of the main shape's rounded box, before its turn
    rounding: jax.Array  # rounding radius of the main shape's box
    cos_yaw: jax.Array  # the main shape's turn about the vertical
    sin_yaw: jax.Array
    trunk_centre_y: jax.Array  # trees only; the trunk stands under the canopy's centre
    trunk_half_height: jax.Array
    trunk_radius: jax.Array
    colour: jax.Array  # int32 palette index of the main shape


def _select(kind: jax.Array, by_kind: dict) -> jax.Array:
    """The value of `by_kind[kind]` per element (by_kind: SPHERE, BOX, PILLAR, TREE -> arrays)."""
    value = by_kind[SPHERE]
    for k in (BOX, PILLAR, TREE):
        value = jnp.where(kind == k, by_kind[k], value)
    return value


def cell_at(seed_key: jax.Array, x: jax.Array, z: jax.Array) -> Cell:
    """The objects of the cells holding world points (x, z) (float32 arrays of one shape)."""
    ix = jnp.floor(x * (1.0 / CELL_SIZE))
    iz = jnp.floor(z * (1.0 / CELL_SIZE))
    key = _avalanche(lax.bitcast_convert_type(ix.astype(jnp.int32), jnp.uint32) * jnp.uint32(0x8DA6B343)
                     ^ lax.bitcast_convert_type(iz.astype(jnp.int32), jnp.uint32) * jnp.uint32(0xD8163841)
                     ^ seed_key)
    u = _uniforms(key, 8)
    kind = sum((u[0] >= threshold).astype(jnp.int32) for threshold in KIND_THRESHOLDS)

    sphere_r = 0.5 + 0.6 * u[1]
    box_x, box_y, box_z = 0.4 + 0.5 * u[1], 0.4 + 0.8 * u[2], 0.4 + 0.5 * u[3]
    pillar_r, pillar_half_height = 0.3 + 0.25 * u[1], 1.2 + 0.8 * u[2]
    canopy_r, trunk_height = 0.7 + 0.4 * u[1], 1.0 + 0.6 * u[2]
    canopy_half_height = canopy_r * (1.0 + 0.6 * u[3])
    half_x = _select(kind, {SPHERE: sphere_r, BOX: box_x, PILLAR: pillar_r, TREE: canopy_r})
    half_y = _select(kind, {SPHERE: sphere_r, BOX: box_y, PILLAR: pillar_half_height, TREE: canopy_half_height})
    half_z = _select(kind, {SPHERE: sphere_r, BOX: box_z, PILLAR: pillar_r, TREE: canopy_r})
    rounding = _select(kind, {SPHERE: sphere_r, BOX: jnp.full_like(box_x, 0.06), PILLAR: pillar_r,
                              TREE: canopy_r})
    footprint = jnp.where(kind == BOX, jnp.sqrt(box_x * box_x + box_z * box_z), half_x)  # radius on the ground
    slack = CELL_SIZE / 2 - CELL_MARGIN - footprint  # how far the object may move off the cell centre
    centre_x = (ix + 0.5) * CELL_SIZE + slack * (2.0 * u[4] - 1.0)
    centre_z = (iz + 0.5) * CELL_SIZE + slack * (2.0 * u[5] - 1.0)
    lift = jnp.where(kind == TREE, trunk_height, 0.0)  # the bottom of the main shape above the ground
    centre_y = EYE_HEIGHT - lift - half_y
    half_turn_tan = 2.0 * u[6] - 1.0  # tan(yaw / 2): yaw in [-90, 90] degrees
    cos_yaw = (1.0 - half_turn_tan ** 2) / (1.0 + half_turn_tan ** 2)
    sin_yaw = 2.0 * half_turn_tan / (1.0 + half_turn_tan ** 2)
    trunk_half_height = 0.5 * (trunk_height + canopy_r)  # from the ground into the canopy
    colour = jnp.floor(u[7] * PALETTE_SIZE).astype(jnp.int32)
    return Cell(kind, (centre_x, centre_y, centre_z), (half_x, half_y, half_z), rounding, cos_yaw, sin_yaw,
                EYE_HEIGHT - trunk_half_height, trunk_half_height, 0.12 + 0.1 * u[3], colour)


def _rounded_box(offset: tuple, half: tuple, rounding: jax.Array) -> jax.Array:
    """Exact signed distance from `offset` (x, y, z), relative to the box centre, to a box of half extents
    `half` (x, y, z) whose edges are rounded by `rounding` (half = rounding everywhere: a sphere)."""
    excess = [jnp.abs(o) - h + rounding for o, h in zip(offset, half)]
    outside = jnp.sqrt(sum(jnp.square(jnp.maximum(e, 0.0)) for e in excess))
    inside = jnp.minimum(jnp.maximum(jnp.maximum(excess[0], excess[1]), excess[2]), 0.0)
    return outside + inside - rounding


def object_distances(cell: Cell, x: jax.Array, y: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(main shape, trunk) signed distances from world points (x, y, z) to the shapes of `cell`; FAR_AWAY
    for a shape the cell does not have."""
    dx, dy, dz = x - cell.centre[0], y - cell.centre[1], z - cell.centre[2]
    turned = (cell.cos_yaw * dx + cell.sin_yaw * dz, dy, cell.cos_yaw * dz - cell.sin_yaw * dx)
    body = _rounded_box(turned, cell.half, cell.rounding)
    trunk_half = (cell.trunk_radius, cell.trunk_half_height, cell.trunk_radius)
    trunk = _rounded_box((dx, y - cell.trunk_centre_y, dz), trunk_half, cell.trunk_radius)
    return jnp.where(cell.kind == EMPTY, FAR_AWAY, body), jnp.where(cell.kind == TREE, trunk, FAR_AWAY)


def _distances(seed_key: jax.Array, x: jax.Array, y: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """At world points (x, y, z): (the exact signed distance to the own cell's object, FAR_AWAY for none;
    the conservative scene distance, see the module docstring)."""
    body, trunk = object_distances(cell_at(seed_key, x, z), x, y, z)
    own = jnp.minimum(body, trunk)
    to_side = jnp.minimum(CELL_SIZE / 2 - jnp.abs(x - (jnp.floor(x * (1.0 / CELL_SIZE)) + 0.5) * CELL_SIZE),
                          CELL_SIZE / 2 - jnp.abs(z - (jnp.floor(z * (1.0 / CELL_SIZE)) + 0.5) * CELL_SIZE))
    other_cells = jnp.maximum(to_side + CELL_MARGIN, (EYE_HEIGHT - MAX_OBJECT_HEIGHT) - y)
    return own, jnp.minimum(own, other_cells)


def distance(seed, points) -> jax.Array:
    """Signed distance from world points `points` [..., 3] to the nearest object of world `seed` (the
    ground is not an object): negative inside an object; exact below CELL_MARGIN, a lower bound above it.
    Returns float32 [...]. Jittable and vmappable (seed: int or traced int32 / uint32 scalar)."""
    points = jnp.asarray(points, jnp.float32)
    return _distances(_seed_key(seed), points[..., 0], points[..., 1], points[..., 2])[1]


# ---------------------------------------------------------------------------------------------------
# Rendering. Vectors are (x, y, z) tuples of arrays, which XLA fuses into one loop per stage.
# ---------------------------------------------------------------------------------------------------


def _along(origin: tuple, direction: tuple, t: jax.Array) -> tuple:
    return tuple(o + t * d for o, d in zip(origin, direction))


def _dot(a: tuple, b: tuple) -> jax.Array:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _mix(a: jax.Array, b: jax.Array, weight: jax.Array) -> jax.Array:
    """a + weight·(b − a) for colours a, b [..., 3] and weights [...]."""
    return a + weight[..., None] * (b - a)


def _camera_rays(c2w: jax.Array, k: jax.Array, height: int, width: int, supersample: int):
    """World ray origins ((x, y, z), each [N, 1, 1]) and unit directions ((x, y, z), each
    [N, height·s, width·s]) of the s×s sub-pixel samples: sub-pixel (a, b) of pixel (row i, column j)
    goes through image point (j + (b + ½)/s, i + (a + ½)/s)."""
    sub = (jnp.arange(supersample, dtype=jnp.float32) + 0.5) / supersample
    u = (jnp.arange(width, dtype=jnp.float32)[:, None] + sub).reshape(1, 1, -1)  # [1, 1, W·s]
    v = (jnp.arange(height, dtype=jnp.float32)[:, None] + sub).reshape(1, -1, 1)  # [1, H·s, 1]
    fx, fy, cx, cy = (k[:, i, None, None] for i in range(4))
    camera = ((u - cx) / fx, (v - cy) / fy, 1.0)
    rotation = c2w[:, :3, :3, None, None]
    world = [sum(rotation[:, row, col] * camera[col] for col in range(3)) for row in range(3)]
    norm = jnp.sqrt(_dot(world, world))
    origin = tuple(c2w[:, row, 3, None, None] for row in range(3))
    return origin, tuple(w / norm for w in world)


def _sky(style: Style, direction: tuple) -> jax.Array:
    """Sky colour [..., 3] along unit directions (x, y, z): gradient, sun disc and glow, hazy hills."""
    elevation = -direction[1]  # sine of the angle above the horizon
    sky = _mix(style.sky_horizon, style.sky_zenith, jnp.clip(elevation * 2.5, 0.0, 1.0) ** 0.7)
    towards_sun = _dot(direction, tuple(style.sun))
    disc = jnp.clip((towards_sun - 0.9985) / 0.0008, 0.0, 1.0)
    glow = 0.3 * jnp.maximum(towards_sun, 0.0) ** 48
    sky = _mix(sky, jnp.array([1.0, 0.97, 0.85]), glow + disc)
    azimuth = jnp.arctan2(direction[0], direction[2])
    ridge = (0.06 + 0.035 * jnp.sin(3.0 * azimuth + style.hill_phases[0])
             + 0.018 * jnp.sin(7.0 * azimuth + style.hill_phases[1]))
    hill_cover = jnp.clip((ridge - elevation) / 0.006, 0.0, 1.0)
    hill_colour = _mix(style.hills, style.sky_horizon, 0.5 + 3.0 * elevation)
    return _mix(sky, hill_colour, hill_cover)


def _soft_shadow(seed_key: jax.Array, style: Style, points: tuple) -> jax.Array:
    """Sunlight reaching world points (x, y, z) in [0, 1], penumbra from the closest miss of an object
    along the sun ray (steps by the conservative distance, penumbra from the objects' exact distance)."""
    sun = tuple(style.sun)

    def step(_, carry):
        t, light = carry
        objects, conservative = _distances(seed_key, *_along(points, sun, t))
        return t + jnp.clip(conservative, 0.05, 2.0), jnp.minimum(light, 6.0 * objects / t)

    start = jnp.full(points[0].shape, 0.1, jnp.float32)
    _, light = lax.fori_loop(0, SHADOW_STEPS, step, (start, jnp.ones_like(start)))
    return jnp.clip(light, 0.0, 1.0)


def _normal(cell: Cell, points: tuple) -> tuple:
    """Outward unit normals (x, y, z) of `cell`'s shapes near world points (x, y, z): central differences
    on a tetrahedron of four taps."""
    gradient = [0.0, 0.0, 0.0]
    for tap in ((1, -1, -1), (-1, -1, 1), (-1, 1, -1), (1, 1, 1)):
        body, trunk = object_distances(cell, *(p + 1e-3 * s for p, s in zip(points, tap)))
        gradient = [g + s * jnp.minimum(body, trunk) for g, s in zip(gradient, tap)]
    norm = jnp.maximum(jnp.sqrt(_dot(gradient, gradient)), 1e-9)
    return tuple(g / norm for g in gradient)


def _ground(style: Style, x: jax.Array, z: jax.Array, footprint: jax.Array) -> jax.Array:
    """Ground albedo [..., 3] at ground points (x, z): a 1-unit checker whose contrast fades as the pixel
    `footprint` (world units on the ground) approaches a checker square."""
    square = (jnp.floor(x) + jnp.floor(z)) % 2.0
    contrast = jnp.clip(1.5 - 2.0 * footprint, 0.0, 1.0)  # full up to 1/4 unit per pixel, none from 3/4
    mean = 0.5 * (style.ground_light + style.ground_dark)
    return mean + ((square - 0.5) * contrast)[..., None] * (style.ground_light - style.ground_dark)


@functools.partial(jax.jit, static_argnames=("height", "width", "supersample"))
def render(seed, c2w, k, height: int, width: int, *, supersample: int = 2) -> jax.Array:
    """Renders frames of world `seed`.

    Args:
      seed: int in [0, 2^31) or traced int32 / uint32 scalar; each seed is a different world (vmap over
        it to render clips of several worlds in one batch).
      c2w: [N, 4, 4] camera-to-world poses, OpenCV axes (camera x right, y down, z forward), in the world
        frame of this module (y down; the ground is y = EYE_HEIGHT).
      k: [4] or [N, 4] intrinsics (fx, fy, cx, cy) in pixels of the output image; fx and fy may differ.
      height, width: output size in pixels (static).
      supersample: s, static; s×s rays per pixel are averaged (anti-aliasing).
    Returns:
      [N, height, width, 3] float32 RGB in [0, 1].
    """
    seed_key, style = _seed_key(seed), world_style(seed)
    c2w = jnp.asarray(c2w, jnp.float32)
    k = jnp.broadcast_to(jnp.asarray(k, jnp.float32), (c2w.shape[0], 4))
    origin, direction = _camera_rays(c2w, k, height, width, supersample)

    down = direction[1]
    ground_t = jnp.where(down > 1e-6, (EYE_HEIGHT - origin[1]) / jnp.maximum(down, 1e-6), jnp.inf)
    limit = jnp.minimum(ground_t, FAR)

    def march(_, t):
        return jnp.clip(t + _distances(seed_key, *_along(origin, direction, t))[1], 0.0, limit)

    t = lax.fori_loop(0, MARCH_STEPS, march, jnp.zeros_like(down))
    hit = _along(origin, direction, t)
    cell = cell_at(seed_key, hit[0], hit[2])
    body, trunk = object_distances(cell, *hit)
    hit_object = jnp.minimum(body, trunk) < 0.01 + 0.003 * t
    on_ground = ~hit_object & jnp.isfinite(ground_t)

    ground = _along(origin, direction, jnp.where(on_ground, ground_t, 0.0))
    surface = tuple(jnp.where(hit_object, h, g) for h, g in zip(hit, ground))
    object_normal = _normal(cell, hit)
    normal = tuple(jnp.where(hit_object, n, up) for n, up in zip(object_normal, (0.0, -1.0, 0.0)))
    footprint = ground_t / (jnp.minimum(k[:, 0], k[:, 1])[:, None, None] * jnp.maximum(down, 1e-3))
    leaves = _hsv(0.27 + 0.08 * cell.colour / PALETTE_SIZE, 0.6, 0.6)
    object_colour = jnp.where((cell.kind == TREE)[..., None], leaves, style.palette[cell.colour])
    object_colour = jnp.where((trunk < body)[..., None], jnp.array([0.42, 0.28, 0.16]), object_colour)
    albedo = jnp.where(hit_object[..., None], object_colour, _ground(style, ground[0], ground[2], footprint))

    sunlight = jnp.maximum(_dot(normal, tuple(style.sun)), 0.0)
    sunlight = sunlight * _soft_shadow(seed_key, style, tuple(s + 0.04 * n for s, n in zip(surface, normal)))
    lit = albedo * (AMBIENT + (1.0 - AMBIENT) * sunlight)[..., None]

    travelled = jnp.where(hit_object, t, jnp.where(on_ground, ground_t, jnp.inf))
    colour = _mix(lit, style.sky_horizon, 1.0 - jnp.exp(-jnp.square(travelled / FOG_DISTANCE)))
    colour = jnp.where((hit_object | on_ground)[..., None], colour, _sky(style, direction))
    n = c2w.shape[0]
    colour = colour.reshape(n, height, supersample, width, supersample, 3).mean(axis=(2, 4))
    return jnp.clip(colour, 0.0, 1.0)
