"""Procedural worlds for training camera-conditioned world models: a JAX-rendered endless 3D world
(`scene`), the live controls' motion model (`player`) and player-like camera trajectories
(`trajectories`). Layer: above `wm_jax.io`; imports only io / errors (and JAX, numpy)."""

from wm_jax.worlds.player import MOVE_SPEED, PITCH_LIMIT_DEG, TURN_SPEED_DEG, Player
from wm_jax.worlds.scene import EYE_HEIGHT, distance, render
from wm_jax.worlds.trajectories import (CLEARANCE, MAX_STEP, MAX_TURN_DEG, body_clearance, clear_start,
                                        player_trajectory, scripted_trajectory)

__all__ = ["CLEARANCE", "EYE_HEIGHT", "MAX_STEP", "MAX_TURN_DEG", "MOVE_SPEED", "PITCH_LIMIT_DEG", "Player",
           "TURN_SPEED_DEG", "body_clearance", "clear_start", "distance", "player_trajectory", "render",
           "scripted_trajectory"]
