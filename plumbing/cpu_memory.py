"""The O(V) passes on the CPU: a few vocabulary rows at a time, and freed buffers reused.

At Qwen's vocabulary (V = 151936) a round of speculative decoding scores (b, k+1, V) target
probabilities, e.g. 32 x 6 x 151936 floats = 117 MB. Every O(V) pass over all of them at once makes
temporaries of that size, far out of cache and above glibc's largest mmap threshold, so each is
page-faulted in afresh. `by_rows` runs a row-wise pass a few rows at a time; `reuse_freed_memory`
keeps the freed blocks in the heap. Neither changes a value.
"""
import functools

PASS_ELEMENTS = 1 << 20  # elements per pass of the O(V) work: about 7 rows of 151936 (see by_rows)


def by_rows(fn, *tensors):
    """fn(*tensors) for a ROW-WISE fn (output row i depends on input row i alone), run on the CPU a
    few vocabulary rows at a time: tensors (N, ..., V) are split along dim 0 into pieces of at most
    PASS_ELEMENTS elements (at least one slice), and the pieces' outputs fill one output (N, ...).

    Why: every O(V) pass over a round's whole (b, k+1, V) block makes temporaries of that size,
    above glibc's largest mmap threshold (32 MiB, see reuse_freed_memory), so each is page-faulted
    in afresh, and far out of cache. Pieces of a few rows keep every temporary small and reused. The
    arithmetic per row is the same; a sum over V may round its last bit differently with another
    number of rows beside it (torch splits reductions by shape). On other devices, and for inputs of
    at most PASS_ELEMENTS, one call."""
    x = tensors[0]
    if x.device.type != "cpu" or x.dim() < 2 or x.shape[0] == 0:
        return fn(*tensors)
    step = max(1, PASS_ELEMENTS // x[0].numel())  # dim-0 slices per piece
    if step >= x.shape[0]:
        return fn(*tensors)
    out = None
    for start in range(0, x.shape[0], step):
        piece = fn(*(t[start:start + step] for t in tensors))  # (step, ...)
        if out is None:
            out = piece.new_empty((x.shape[0], *piece.shape[1:]))  # (N, ...)
        out[start:start + step] = piece
    return out


@functools.cache
def reuse_freed_memory() -> bool:
    """Keep freed CPU buffers for reuse (glibc only; called once by both generators). glibc hands
    every freed block above its mmap threshold back to the kernel, so each O(V) temporary of a
    sampling step (4 rows x 151936 float64 = 4.6 MiB) is page-faulted in afresh; at the real
    vocabulary that tripled the cost of processing + sampling one token on 2 CPU cores (~10 ms -> ~3
    ms for 4 rows, see docs/benchmarks.md). Raising the mmap threshold to its maximum (32 MiB) and
    the trim threshold keeps such blocks in the heap. Process-wide, results unchanged; elsewhere a
    no-op. Returns whether it applied."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:                     # not glibc (e.g. musl): nothing to tune
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return (bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20))
            and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)))
