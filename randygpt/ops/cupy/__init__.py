"""The cupy backend: the same ops on an NVIDIA GPU, CuPy as the array module.

    cupy.backend(dtype="float32", tf32=False, kernels=None, xp=None) -> Backend

Every op the reference has runs unchanged on CuPy arrays (the reference takes its array
module from its inputs). The hot ops have GPU twins as numba-cuda kernels (kernels.py, where
the choice of numba-cuda over CuPy RawKernel is explained); linear runs its products at the
chosen precision (precision.py):

    dtype="float32"            float32 products (tf32=True: on the tensor cores as TF32)
    dtype="bf16"               bf16 operands, float32 accumulation (cuBLAS gemmEx)

Weights, gradients and AdamW's moments are float32 in every case, and so are checkpoints.

Where the data lives: the model's buffers (weights, gradients, moments, KV cache) are
allocated on the GPU once. Each step's batch of token ids (B x T int64, drawn on the host by
the same RNG as every backend, so that runs match across backends) is copied in from pinned
memory asynchronously (`to_device`). The loss stays a 0-d device array, and the gradient norm
too: the host waits for the GPU only where a value is looked at (an evaluation, a log line,
a checkpoint) and when generation samples a token.

`xp=numpy` builds the same backend with NumPy standing in for CuPy: its Python code (the
precision logic, the transfers, the lazy loss) runs on a machine without a GPU. Its kernels
run there too when numba's CUDA simulator is on (NUMBA_ENABLE_CUDASIM=1); without it that
backend uses the reference twins for the kernel ops (`kernels=False`).
"""
from __future__ import annotations

from functools import partial

from ...errors import UserError
from ..contract import Backend, make_backend
from .precision import PRECISIONS, Matmul, linear_backward, linear_forward

INSTALL = "install it with pip install -e '.[cuda]' on a machine with an NVIDIA GPU"


def backend(dtype: str = "float32", tf32: bool = False, kernels: bool | None = None,
            xp=None, **unknown) -> Backend:
    """The cupy backend with these options (see the module docstring)."""
    if unknown:
        raise UserError(f"the cupy backend has no option {', '.join(unknown)} (it has dtype, "
                        "tf32)", "backend")
    if dtype not in ("float32", "bf16"):
        raise UserError(f"{{field}} {dtype!r} is not one of float32, bf16", "dtype")
    if tf32 and dtype == "bf16":
        raise UserError("{field} applies to float32 products; bf16 products need no TF32",
                        "tf32")
    shim = xp is not None
    xp = xp if shim else _import_cupy()
    precision = "tf32" if tf32 else dtype
    assert precision in PRECISIONS
    matmul = Matmul(precision, xp, cublas=not shim and precision != "float32")
    table = {"linear_forward": partial(linear_forward, matmul=matmul),
             "linear_backward": partial(linear_backward, matmul=matmul)}
    if kernels is None:
        kernels = not shim or _simulated()
    if kernels:
        from . import kernels as k        # numba-cuda compiles lazily, per kernel, at first use
        for name in ("attention_forward", "attention_backward", "squared_relu_forward",
                     "squared_relu_backward", "residual_dropout_forward",
                     "residual_dropout_backward", "cross_entropy_forward",
                     "cross_entropy_backward", "adamw_update"):
            table[name] = getattr(k, name)
    to_device = _host_to_shim if shim else PinnedUpload(xp)
    return make_backend("cupy", table, {"dtype": dtype, "tf32": bool(tf32),
                                        "kernels": bool(kernels), "shim": shim},
                        xp=xp, to_device=to_device, to_host=_to_host)


def _import_cupy():
    """CuPy with a usable GPU, or one line saying what is missing."""
    try:
        import cupy
    except ImportError as e:
        raise UserError(f"{{field}} cupy needs CuPy, which is not installed ({e}); {INSTALL}",
                        "backend") from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:            # CUDARuntimeError: no driver, no device
        raise UserError(f"{{field}} cupy found no usable CUDA GPU ({type(e).__name__}: {e}); "
                        "train on the CPU with the fused backend", "backend") from None
    if n < 1:
        raise UserError("{field} cupy found no CUDA GPU; train on the CPU with the fused "
                        "backend", "backend")
    return cupy


def _simulated() -> bool:
    import os
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _host_to_shim(x):
    import numpy as np
    return np.array(x)                   # a copy, as an upload is


def _to_host(x):
    """A NumPy array (or Python scalar) from a device array; host values pass through."""
    get = getattr(x, "get", None)
    return get() if get is not None and type(x).__module__.startswith("cupy") else x


class PinnedUpload:
    """Host array -> device array, copied asynchronously from pinned memory: a pageable
    upload would make the host wait for the GPU to finish all queued work first. A ring of
    pinned buffers per (shape, dtype); a buffer is refilled only after the copy that last
    read it has completed (its event), RING uploads back, long done in a training loop."""

    RING = 4

    def __init__(self, cupy):
        self.cupy = cupy
        self.slots = {}

    def __call__(self, x):
        import numpy as np
        cp = self.cupy
        if not isinstance(x, np.ndarray):
            return cp.asarray(x)
        key = (x.shape, x.dtype.str)
        ring = self.slots.setdefault(key, [])
        if len(ring) < self.RING:
            ring.append([cp.cuda.alloc_pinned_memory(x.nbytes), None])
        slot = ring.pop(0)
        ring.append(slot)
        memory, event = slot
        if event is not None:
            event.synchronize()           # that buffer's previous copy is done
        host = np.frombuffer(memory, dtype=x.dtype, count=x.size).reshape(x.shape)
        host[...] = x
        out = cp.empty(x.shape, dtype=x.dtype)
        stream = cp.cuda.get_current_stream()
        out.set(host, stream=stream)
        slot[1] = stream.record()
        return out
