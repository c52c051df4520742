"""What every benchmark prints first: the CPU, NumPy's BLAS and the kernel family it runs
(threadpoolctl, a benchmark-only dependency), the thread counts and the load, because every
figure here depends on them (the same code ran 0.5x and 2x PyTorch on two CPUs).

    from machine import describe; print(describe())

Under a hypervisor the cores may be given to other machines for part of the time ("steal",
/proc/stat): on the 2-core KVM Xeon of this project it was 12-28 % in some seconds and the
same training run measured 7.9k and 17.2k tokens/s an hour apart. So benchmarks print the
steal over their run too (`steal_since`).
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


def cpu_ticks():
    """(steal, total) CPU ticks of all cores since boot, from /proc/stat; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    steal = fields[7] if len(fields) > 7 else 0
    return steal, sum(fields[:8])          # guest time is already inside user time


def steal_since(before) -> float | None:
    """The percentage of CPU time the hypervisor gave to other machines since `before`
    (a cpu_ticks() value), or None where it cannot be read."""
    now = cpu_ticks()
    if before is None or now is None or now[1] <= before[1]:
        return None
    return 100.0 * (now[0] - before[0]) / (now[1] - before[1])


def steal_line(before) -> str:
    pct = steal_since(before)
    if pct is None:
        return "CPU steal: unknown (no /proc/stat)"
    return (f"CPU steal during the run: {pct:.1f} % (time the hypervisor gave these cores to "
            "other machines; every figure above is slower by about that much or more)")
