"""Layer math: forward/backward pairs. `reference` is the readable NumPy version."""
