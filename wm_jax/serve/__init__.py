"""Live worlds: `wm-jax serve` (the server, its page, sessions) and the controls that steer the camera."""
