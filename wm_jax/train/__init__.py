"""Training: the procedural world -> a shipped tiny world model (`wm-jax train <config>`)."""
