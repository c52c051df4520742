"""What every benchmark prints first: the CPU, NumPy's BLAS and the kernel family it runs
(threadpoolctl, a benchmark-only dependency), the thread counts and the load, because every
figure here depends on them (the same code ran 0.5x and 2x PyTorch on two CPUs).

    from machine import describe; print(describe())
"""
import os


def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "BLAS: unknown (pip install threadpoolctl to name it)"
    import numpy  # noqa: F401  (loads the BLAS threadpoolctl reports)
    blas = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    if not blas:
        return "BLAS: none found"
    b = blas[0]
    return (f"BLAS: {b.get('internal_api')} {b.get('version')}, kernels "
            f"{b.get('architecture', '?')}, {b.get('num_threads')} threads "
            f"(OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'unset')})")


def describe() -> str:
    from randygpt.ops.fused.choose import cpu_model
    import llvmlite.binding as llvm
    features = llvm.get_host_cpu_features()
    vectors = "AVX-512" if features.get("avx512f") else "AVX2" if features.get("avx2") else "SSE"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"CPU: {cpu_model()} ({os.cpu_count()} cores, LLVM target "
            f"{llvm.get_host_cpu_name()}, {vectors}); {blas_info()}; load average {load} "
            "(other processes' work slows every figure)")
