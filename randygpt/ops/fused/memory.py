"""Recycled memory for the large arrays the fused ops return."""
import math
import weakref

import numpy as np


class BufferPool:
    """A training step allocates the same big arrays every time. Fresh ones over 32 MiB
    (glibc's largest heap size: config B's (B, T, 4C) activations are 64 MiB) come straight
    from the kernel as untouched pages, and faulting them in cost ~10% of a B step. Here a
    block of memory goes back to a free list, by size, when the last array viewing it dies,
    and the next request of that size takes it. (Each request gets a new `_Lease` as its
    arrays' base: NumPy collapses view chains to the memory's owner, so the lease is what
    every view keeps alive, and its finalizer runs only after the last of them is gone.)
    Arrays under `min_bytes` are plain np.empty."""

    class _Lease:
        def __init__(self, block, shape, dtype):
            self.block = block
            self.__array_interface__ = dict(block.__array_interface__, shape=tuple(shape),
                                            typestr=dtype.str, strides=None)

    def __init__(self, min_bytes=1 << 20):
        self.min_bytes = min_bytes
        self.free: dict[int, list] = {}

    def empty(self, shape, dtype):
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes < self.min_bytes:
            return np.empty(shape, dtype)
        stack = self.free.setdefault(nbytes, [])
        block = stack.pop() if stack else np.empty(nbytes, np.uint8)
        lease = self._Lease(block, shape, dtype)
        weakref.finalize(lease, stack.append, block)
        return np.asarray(lease)


# The pool every fused backend with buffer_pool=True draws from: a block is leased to one
# array at a time, so backends can share it (two pools would keep two sets of free blocks).
SHARED = BufferPool()
