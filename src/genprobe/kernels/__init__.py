"""Infinite-width kernels: the NNGP/NTK layer recursions (:mod:`.infinite`), order-to-chaos
quantities (:mod:`.chaos`) and NTK phase diagrams over (σ_w², depth) (:mod:`.phase`)."""

from .chaos import OrderToChaos, chi1, critical_sigma_w2, fixed_point_variance, order_to_chaos
from .infinite import InfiniteKernels, infinite, infinite_by_depth
from .phase import NTKPhaseResult, ntk_phase

__all__ = ["InfiniteKernels", "NTKPhaseResult", "OrderToChaos", "chi1", "critical_sigma_w2",
           "fixed_point_variance", "infinite", "infinite_by_depth", "ntk_phase", "order_to_chaos"]
