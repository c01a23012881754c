"""Allocation strategies: scores or statistics -> one sparsity per group, chosen by ``PruningConfig.allocation``.

Importing the package registers the built-in strategies: ``ecoflap``, ``uniform``, ``owl``, ``from_report`` and
``auto``. A new strategy is one function decorated with :func:`register_allocation`.
"""

from ecoflap_pl.pruning.allocation.auto import auto_allocation
from ecoflap_pl.pruning.allocation.ecoflap import allocate_sparsity, ecoflap_allocation
from ecoflap_pl.pruning.allocation.from_report import check_report_fits, read_allocation_report, report_allocation
from ecoflap_pl.pruning.allocation.owl import dense_outlier_ratios, outlier_counts, owl_allocation, owl_sparsity
from ecoflap_pl.pruning.allocation.registry import (
    Allocation,
    AllocationRequest,
    AllocationStrategy,
    CandidateAllocation,
    allocation_names,
    allocation_reads_scores,
    get_allocation,
    register_allocation,
)
from ecoflap_pl.pruning.allocation.uniform import uniform_allocation

__all__ = [
    "Allocation",
    "AllocationRequest",
    "AllocationStrategy",
    "CandidateAllocation",
    "allocate_sparsity",
    "allocation_names",
    "allocation_reads_scores",
    "auto_allocation",
    "check_report_fits",
    "dense_outlier_ratios",
    "ecoflap_allocation",
    "get_allocation",
    "outlier_counts",
    "owl_allocation",
    "owl_sparsity",
    "read_allocation_report",
    "register_allocation",
    "report_allocation",
    "uniform_allocation",
]
