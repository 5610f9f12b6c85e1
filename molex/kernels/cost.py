"""Cost model of the expert op: what each backend's ``cost`` function is written in.

A backend's time ~ ``flops / F + elems / BW + ops * launch + syncs * sync`` with per-device-class
constants (:class:`Hardware`: ``F`` sustained GEMM FLOP/s, ``BW`` memory bandwidth in elements/s,
``launch`` the fixed cost of one op, ``sync`` the cost of one host synchronisation). Each backend
module states its own FLOPs, elements moved, ops and syncs for a :class:`Workload` (``T`` tokens,
``k`` active of ``E`` experts of rank ``r``, ``d = in + out``, ``N = T k`` slots) and registers that
function with the backend; :mod:`molex.kernels.select` picks the cheapest available one. Only
relative values matter; backward costs about twice the forward for every backend, so the forward
ratios carry over to training.

**Crossover.** ``dense`` does ``E / k`` times the useful FLOPs but in two large, well-shaped
GEMMs with no sort, no gather and no sync; the grouped backends do only the useful FLOPs but move
``T k`` gathered input rows and ``T k`` output rows. While ``E r`` is a few dozen the skinny
``[T, E r]`` GEMMs are memory bound (their time is reading ``x`` and writing the output, which
every backend pays) and ``dense`` wins; once ``E r`` reaches the thousands (fused hubs of 32-64
adapters of rank 16-64) the wasted ``(E - k) / E`` FLOPs dominate and the grouped backends win.
On the 2-core CPU (``benchmarks/bench_sweep.py --quick``, see ``benchmarks/RESULTS.md``) the
crossover depends on ``T``: while the ``[T k, d]`` slot buffers fit in the 32 MiB L3
(``T k <= 4096`` at ``d = 2048``, fp32) grouped already wins from ``E r = 128`` (``E = 8,
r = 16``); once they spill (``T = 4096, k = 2``) the gathers run ~3x slower and dense is 3.6x
faster than grouped at ``E r = 64``. ``per_seq`` beats both for per-sequence decisions when
sequences are long (the weight gather is amortised over ``S`` tokens). ``triton`` and
``megablocks`` are considered on CUDA only (the Triton interpreter on CPU is for tests).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HARDWARE", "Hardware", "Workload"]


@dataclass(frozen=True)
class Hardware:
    """Constants of one device class.

    ``flops``: FLOP/s; ``elems``: element bandwidth (elements/s); ``launch`` / ``sync``: seconds per
    op and per host sync; ``cache``: last-level cache size (bytes); ``spill``: how much slower
    gathered / scattered slot buffers move once they spill out of it (random row access defeats
    the prefetcher).
    """

    flops: float
    elems: float
    launch: float
    sync: float
    cache: int
    spill: float

    def seconds(self, flops: float, elems: float, ops: int, syncs: int) -> float:
        return flops / self.flops + elems / self.elems + ops * self.launch + syncs * self.sync


#: CPU values calibrated on a 2-core AMD EPYC (32 MiB L3) with ``benchmarks/bench_sweep.py --quick
#: --threads 1`` (fp32); CUDA values assumed for an H100/H200-class device (figures reported for it, bf16
#: matmul ~790 TFLOP/s, ~4.3 TB/s copy; not yet measured by molex).
HARDWARE = {
    "cpu": Hardware(flops=6.0e10, elems=2.0e9, launch=2.0e-5, sync=0.0, cache=32 << 20, spill=3.0),
    "cuda": Hardware(flops=5.0e14, elems=1.0e12, launch=5.0e-6, sync=2.0e-5, cache=50 << 20, spill=1.0),
}


@dataclass(frozen=True)
class Workload:
    """The sizes of one expert-op call, and the quantities every backend's cost is written in.

    ``num_sequences``: sequences of a per-sequence decision (``None`` for a per-token decision).
    ``element_size``: bytes per element of ``x`` (decides whether the slot buffers fit in cache).
    ``shared_a``: the experts share one down-projection (``A [1, r, in]``).
    """

    tokens: int
    in_features: int
    out_features: int
    num_experts: int
    rank: int
    top_k: int
    device_type: str
    num_sequences: int | None = None
    element_size: int = 4
    shared_a: bool = False

    @property
    def on_cuda(self) -> bool:
        return self.device_type == "cuda"

    @property
    def hardware(self) -> Hardware:
        return HARDWARE["cuda" if self.on_cuda else "cpu"]

    @property
    def d(self) -> int:
        """``in + out``."""
        return self.in_features + self.out_features

    @property
    def slots(self) -> int:
        """``N = T k`` (token, expert) slots."""
        return self.tokens * self.top_k

    @property
    def active_flops(self) -> float:
        """``2 T k r d``: the FLOPs of the chosen experts only."""
        return 2.0 * self.tokens * self.top_k * self.rank * self.d

    @property
    def weights(self) -> int:
        """``E r d``: elements of all experts' weights (``r in + E r out`` with a shared ``A``)."""
        if self.shared_a:
            return self.rank * self.in_features + self.num_experts * self.rank * self.out_features
        return self.num_experts * self.rank * self.d

    @property
    def spill(self) -> float:
        """Slowdown of the ``[T k, in]`` / ``[T k, out]`` slot buffers (1 while they fit in cache)."""
        hw = self.hardware
        size = self.slots * max(self.in_features, self.out_features) * self.element_size
        return hw.spill if size > hw.cache else 1.0
