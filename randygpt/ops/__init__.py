"""Layer math: forward/backward pairs. `contract` lists the ops and their calling convention,
`reference` is the readable NumPy version, `fused/` the numba kernels of the training path."""
