"""`PruningConfig`: every knob of an ECoFLaP run, validated once when built."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from ecoflap_pl.pruning.field_types import PathString, check_field_types
from ecoflap_pl.pruning.registry import normalized_name, unknown_name

ImportanceName = Literal["zeroth_order", "first_order", "gradient_norm", "uniform"]
"""The built-in importance estimators (``ecoflap_pl.pruning.importance``) and ``"uniform"`` (no scores); estimators
registered later with ``register_importance`` are accepted too."""
ScoreName = Literal["grad_only", "grad_mag_abs", "grad_mag_square"]
"""The built-in score variants (``ecoflap_pl.pruning.score_variants``); later ``register_score`` ones are accepted."""
MethodName = Literal["wanda", "sparsegpt", "magnitude"]
"""The built-in fine-step methods (``ecoflap_pl.pruning.methods``); methods registered later with
``register_method`` are accepted too."""
AGGREGATES = ("sum", "avg")
GRANULARITIES = ("block", "layer", "model")
COMPARISONS = ("per_row", "per_matrix")
PROBE_GRANULARITIES = ("per_tensor", "per_block")
ACTIVATION_STORAGES = ("auto", "device", "cpu", "recompute")
AllocationName = Literal["ecoflap", "uniform", "owl", "from_report", "auto"]
"""The built-in allocation strategies (``ecoflap_pl.pruning.allocation``), the choices ``--help`` lists; a strategy
registered later with ``register_allocation`` is accepted by name too, from Python and by the ``ecoflap`` command."""
_NM_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
# Never pruned by default (docs/algorithm.md §1): BLIP-2's whole Q-Former. Embeddings, heads and inter-tower
# projections sit outside the discovered block stacks and are never candidates anyway.
DEFAULT_EXCLUDE = ("*qformer*",)


def _choice(name: str, value: str, options: tuple[str, ...]) -> str:
    normalised = normalized_name(value)
    if normalised not in options:
        raise unknown_name(name, value, options)
    return normalised


@dataclass(frozen=True)
class PruningConfig:
    """Configuration of one pruning run (docs/algorithm.md §1-§3).

    Args:
        sparsity: target fraction of zeros over all candidate weights, in [0, 1).
        max_sparsity: cap on any group's sparsity; defaults to ``sparsity + 0.1`` (every official run), capped
            below 1. Must be ``>= sparsity``.
        importance: coarse estimator of the group scores: ``"zeroth_order"`` (forward-only, the paper's default),
            ``"first_order"`` (backprop, streamed), ``"gradient_norm"`` (backprop: exactly the expectation of
            ``"zeroth_order"``'s estimates, no sampling noise) or ``"uniform"`` (no scores; with the default
            ``allocation`` it means ``allocation="uniform"``: every tensor gets ``sparsity``).
        allocation: how group sparsities are chosen (docs/allocation.md): ``"ecoflap"`` (the paper's rule on the
            ``importance`` scores, capped at ``max_sparsity``), ``"uniform"``, ``"owl"`` (outlier-weighted, forward
            only, ``owl_m``/``owl_lambda``), ``"from_report"`` (the group sparsities of ``allocation_report``) or
            ``"auto"`` (tries uniform, the paper's rule at caps ``sparsity`` + 0.05/0.1/0.2 and OWL at λ =
            0.04/0.08/0.12, keeps the lowest loss on ``auto_holdout_samples`` held-out calibration samples).
        owl_m: OWL's outlier multiple ``M``: an entry is an outlier when its Wanda score exceeds ``M`` × its
            block's mean.
        owl_lambda: OWL's band half-width ``λ``: group sparsities stay in ``[sparsity − λ, sparsity + λ]``.
        allocation_report: path of an earlier ``pruning_report.json`` whose ``group_sparsity`` ``from_report``
            reuses (same model, include/exclude and granularity).
        auto_holdout_samples: calibration samples ``auto`` scores its candidates on; taken from the calibration
            batches after those of the coarse and fine steps, never seen by either.
        score: ``"grad_only"`` (s), ``"grad_mag_abs"`` (|W|·s) or ``"grad_mag_square"`` (W²·s²).
        aggregate: ``"sum"`` of the element scores of a group, or ``"avg"`` (divided by its parameter count).
        granularity: one sparsity per transformer ``"block"``, per weight tensor (``"layer"``) or per tower
            (``"model"``).
        method: local pruner of the fine step: ``"wanda"``, ``"sparsegpt"``, ``"magnitude"`` or any method registered
            with ``register_method`` (``ecoflap_pl.pruning.methods``).
        structure: ``"unstructured"`` or an N:M pattern such as ``"2:4"`` (N kept in every M weights).
        comparison: rank within each output row (``"per_row"``) or within the whole matrix (``"per_matrix"``; for
            SparseGPT: across all rows of each column block, as the original SparseGPT). Defaults to the method's
            ``default_comparison``: ``"per_row"`` for Wanda (as Wanda), ``"per_matrix"`` for SparseGPT (as SparseGPT)
            and magnitude. Either way a
            tensor loses exactly ``round(numel · sparsity)`` weights; per row, counts differ by at most one.
        coarse_samples: calibration samples for the coarse step (32 in the official BLIP-2 run).
        fine_samples: calibration samples for the fine step (128).
        eps: zeroth-order perturbation size ε.
        probes: zeroth-order probes (random directions) per batch.
        probe_granularity: one probe per weight tensor (``"per_tensor"``, faithful) or one direction for all
            tensors of a group (``"per_block"``, #groups instead of #tensors forward pairs); for ``gradient_norm``,
            whether the norm is taken per tensor or over the group's tensors together.
        prune_per_model: meet the budget separately inside each tower.
        include: glob patterns of parameter names to consider (default: every candidate).
        exclude: glob patterns of parameter names never pruned (default: the BLIP-2 Q-Former).
        sparsegpt_block_size: SparseGPT column block size.
        sparsegpt_damping: SparseGPT damping as a fraction of the mean Hessian diagonal.
        seed: seed of every random choice (zeroth-order directions).
        activation_storage: zeroth order: where the dense block outputs recorded once per calibration batch for
            prefix reuse are kept: ``"auto"`` (on the devices their blocks ran on while they take at most a quarter
            of the first one's free memory, else on the CPU), ``"device"``, ``"cpu"`` (offloaded), or
            ``"recompute"`` (record nothing: one full forward per probe, weights perturbed in place; the reference
            loop). First order and gradient norm: ``"recompute"`` keeps only each block's inputs between the forward
            and the backward pass and runs every block again during backward (activation checkpointing: the same
            scores, about one more forward of the blocks per batch); the other values keep what autograd saves.
            Fine step: ``"cpu"`` also keeps the recorded block inputs and the propagated hidden states in CPU
            memory (each block's are moved to its device for its replay; for models whose activations do not fit
            the device beside the weights); the other values keep them where the model produced them.
        max_probe_replicas: zeroth order: most probes evaluated in one forward on copies of the calibration batch
            (the number used is chosen from the memory left); 1 evaluates one probe per forward.
        fine_replay_batches: fine step: most calibration batches stacked into one block replay (the number used is
            chosen from the memory left; batches that cannot be stacked, e.g. of different lengths, run alone).
    """

    sparsity: float = 0.5
    max_sparsity: float | None = None
    importance: ImportanceName | str = "zeroth_order"
    allocation: AllocationName | str = "ecoflap"
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    allocation_report: PathString | None = None
    auto_holdout_samples: int = 16
    score: ScoreName | str = "grad_only"
    aggregate: str = "sum"
    granularity: str = "block"
    method: MethodName | str = "wanda"
    structure: str = "unstructured"
    comparison: str | None = None
    coarse_samples: int = 32
    fine_samples: int = 128
    eps: float = 1e-3
    probes: int = 1
    probe_granularity: str = "per_tensor"
    prune_per_model: bool = False
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = field(default=DEFAULT_EXCLUDE)
    sparsegpt_block_size: int = 128
    sparsegpt_damping: float = 0.01
    seed: int = 0
    activation_storage: str = "auto"
    max_probe_replicas: int = 8
    fine_replay_batches: int = 8

    def __post_init__(self) -> None:
        def normalise(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        check_field_types(self)  # every field's type (from its annotation) and finite floats, before any range
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(
                f"`sparsity` must be in [0, 1) (the fraction of zeros), got {self.sparsity!r}. "
                "HINT: 0.5 prunes half of the weights."
            )
        max_sparsity = min(self.sparsity + 0.1, 0.99) if self.max_sparsity is None else self.max_sparsity
        if not self.sparsity <= max_sparsity < 1.0:
            raise ValueError(
                f"`max_sparsity` must be in [sparsity, 1) = [{self.sparsity}, 1), got {self.max_sparsity!r}. "
                "HINT: the official runs use sparsity + 0.1; leave it unset for that default."
            )
        normalise("max_sparsity", max_sparsity)
        self._check_registered()
        normalise("aggregate", _choice("aggregate", self.aggregate, AGGREGATES))
        normalise("granularity", _choice("granularity", self.granularity, GRANULARITIES))
        normalise("probe_granularity", _choice("probe_granularity", self.probe_granularity, PROBE_GRANULARITIES))
        comparison = self._default_comparison() if self.comparison is None else self.comparison
        normalise("comparison", _choice("comparison", comparison, COMPARISONS))
        normalise("activation_storage", _choice("activation_storage", self.activation_storage, ACTIVATION_STORAGES))
        self._check_allocation()
        for name in (
            "coarse_samples",
            "fine_samples",
            "probes",
            "sparsegpt_block_size",
            "auto_holdout_samples",
            "max_probe_replicas",
            "fine_replay_batches",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)!r}.")
        normalise("structure", self._normalised_structure())
        if not self.eps > 0:
            raise ValueError(f"`eps` must be > 0, got {self.eps!r}. HINT: the official runs use 1e-3.")
        if not self.sparsegpt_damping > 0:
            raise ValueError(f"`sparsegpt_damping` must be > 0, got {self.sparsegpt_damping!r}.")
        for name in ("include", "exclude"):
            if not all(getattr(self, name)):
                raise ValueError(f"`{name}` must be a list of non-empty glob patterns, got {getattr(self, name)!r}.")
        if not self.include:
            raise ValueError("`include` must name at least one pattern, got []. HINT: use ['*'] for every candidate.")

    def _normalised_structure(self) -> str:
        structure = self.structure.strip().lower()
        if structure == "unstructured":
            return structure
        match = _NM_PATTERN.match(structure)
        if match is None:
            raise ValueError(f"`structure` must be 'unstructured' or 'N:M' such as '2:4', got {self.structure!r}.")
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            raise ValueError(f"`structure` N:M must have 0 < N < M, got {self.structure!r}.")
        if abs((1 - n / m) - self.sparsity) > 1e-9:
            raise ValueError(
                f"`structure` {n}:{m} keeps {n} of every {m} weights (sparsity {1 - n / m:g}), but `sparsity` is "
                f"{self.sparsity!r}. HINT: set sparsity: {1 - n / m:g}."
            )
        if self.allocation != "uniform":
            raise ValueError(
                f"`structure` {n}:{m} fixes every tensor's sparsity, so `importance` must be 'uniform' (or "
                f"`allocation` 'uniform'), got importance {self.importance!r}, allocation {self.allocation!r}. "
                "HINT: set importance: uniform for N:M runs."
            )
        if self.method == "sparsegpt" and self.sparsegpt_block_size % m:
            raise ValueError(
                f"`sparsegpt_block_size` must be a multiple of M={m} for {n}:{m} SparseGPT, got "
                f"{self.sparsegpt_block_size!r}. HINT: keep the default 128."
            )
        return f"{n}:{m}"

    def _check_registered(self) -> None:
        """Normalise ``importance``, ``score`` and ``method`` and check them against their registries."""
        # Read here, not at import time: the estimators' modules import this one (like the allocation registry).
        from ecoflap_pl.pruning.importance import importance_names
        from ecoflap_pl.pruning.methods import method_names
        from ecoflap_pl.pruning.score_variants import score_names

        hints = {
            "importance": (
                "'zeroth_order' is the paper's forward-only estimator, 'gradient_norm' its exact expectation by "
                "backprop; 'uniform' skips scoring."
            ),
            "score": "the official runs use 'grad_only' (zeroth order) and 'grad_mag_abs' (first order).",
            "method": "register a new fine-step method with @register_method(name, inputs=...).",
        }
        registered = {
            "importance": (*importance_names(), "uniform"),
            "score": score_names(),
            "method": method_names(),
        }
        for name, options in registered.items():
            value = normalized_name(getattr(self, name))
            if value not in options:
                raise unknown_name(name, getattr(self, name), options, hints[name])
            object.__setattr__(self, name, value)

    def _default_comparison(self) -> str:
        from ecoflap_pl.pruning.methods import get_method

        return get_method(self.method).default_comparison

    def _check_allocation(self) -> None:
        from ecoflap_pl.pruning.allocation import allocation_names  # the registry imports this module

        allocation = normalized_name(self.allocation)
        if allocation not in allocation_names():
            hint = "'ecoflap' is the paper's rule, 'auto' picks the best candidate on held-out batches."
            raise unknown_name("allocation", self.allocation, allocation_names(), hint)
        if self.importance == "uniform" and allocation == "ecoflap":
            allocation = "uniform"  # `importance: uniform` (no scores) keeps meaning the uniform baseline
        object.__setattr__(self, "allocation", allocation)
        if not self.owl_m > 0:
            raise ValueError(f"`owl_m` must be > 0, got {self.owl_m!r}. HINT: the OWL paper uses 5.")
        if not (0 <= self.owl_lambda and (allocation != "owl" or self.sparsity + self.owl_lambda < 1)):
            raise ValueError(
                f"`owl_lambda` must be in [0, 1 - sparsity) = [0, {1 - self.sparsity:g}), got {self.owl_lambda!r}. "
                "HINT: the OWL paper uses 0.08 at 70% sparsity."
            )
        if (allocation == "from_report") != (self.allocation_report is not None):
            raise ValueError(
                f"`allocation_report` must be set exactly when `allocation` is 'from_report', got allocation "
                f"{allocation!r} with allocation_report {self.allocation_report!r}. HINT: allocation: from_report "
                "with allocation_report: path/to/pruning_report.json."
            )

    @property
    def scores_groups(self) -> bool:
        """Whether a run has a coarse step: ``importance`` scores the groups (it is not ``"uniform"``) and the
        allocation reads the scores (``uniform``, ``owl`` and ``from_report`` do not)."""
        from ecoflap_pl.pruning.allocation import allocation_reads_scores  # the registry imports this module

        return self.importance != "uniform" and allocation_reads_scores(self.allocation)

    @property
    def calibration_samples(self) -> int:
        """Calibration samples a run reads: the fine step's (and, with a coarse step, the coarse step's) leading ones,
        plus ``auto``'s held-out ones after them."""
        leading = max(self.coarse_samples, self.fine_samples) if self.scores_groups else self.fine_samples
        return leading + (self.auto_holdout_samples if self.allocation == "auto" else 0)

    @property
    def n_m(self) -> tuple[int, int] | None:
        """(N, M) for an N:M structure, else None."""
        if self.structure == "unstructured":
            return None
        n, m = self.structure.split(":")
        return int(n), int(m)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["include"], data["exclude"] = list(self.include), list(self.exclude)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown PruningConfig keys {unknown}. Valid keys: {sorted(known)}.")
        return cls(**data)
