"""The values a pruning run returns: group scores (reusable across sparsities) and the full result."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ecoflap_pl.pruning.allocation import CandidateAllocation, allocate_sparsity
from ecoflap_pl.pruning.config import PruningConfig
from ecoflap_pl.pruning.monitor import StageStats


@dataclass(frozen=True)
class GroupScores:
    """Coarse-step output: one importance score per group. It does not depend on the target sparsity.

    Attributes:
        scores: group -> importance ``S_g``.
        sizes: group -> parameter count ``N_g``.
        groups: group -> parameter names, in forward order.
        towers: tower (stack name) -> its groups.
        settings: the config fields that produced the scores (importance, score, aggregate, granularity, ...).
        stats: cost of the coarse step.
    """

    scores: dict[str, float]
    sizes: dict[str, int]
    groups: dict[str, tuple[str, ...]]
    towers: dict[str, tuple[str, ...]]
    settings: dict[str, Any]
    stats: StageStats = field(default_factory=StageStats)

    def allocate(self, sparsity: float, max_sparsity: float, prune_per_model: bool = False) -> dict[str, float]:
        """Per-group sparsity for one target; inside each tower separately with ``prune_per_model``."""
        if not prune_per_model:
            return allocate_sparsity(self.scores, self.sizes, sparsity, max_sparsity)
        allocation: dict[str, float] = {}
        for groups in self.towers.values():
            allocation.update(
                allocate_sparsity(
                    {g: self.scores[g] for g in groups}, {g: self.sizes[g] for g in groups}, sparsity, max_sparsity
                )
            )
        return allocation

    def to_dict(self) -> dict[str, Any]:
        return {
            "scores": dict(self.scores),
            "sizes": dict(self.sizes),
            "groups": {g: list(names) for g, names in self.groups.items()},
            "towers": {t: list(groups) for t, groups in self.towers.items()},
            "settings": dict(self.settings),
            "stats": self.stats.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GroupScores:
        return cls(
            scores={g: float(s) for g, s in data["scores"].items()},
            sizes={g: int(n) for g, n in data["sizes"].items()},
            groups={g: tuple(names) for g, names in data["groups"].items()},
            towers={t: tuple(groups) for t, groups in data["towers"].items()},
            # JSON turns the include/exclude tuples into lists; give them back the config's form so reuse matches.
            settings={k: tuple(v) if isinstance(v, list) else v for k, v in data["settings"].items()},
            stats=StageStats(**data.get("stats", {})),
        )


@dataclass(frozen=True)
class PruningResult:
    """Everything one ``prune`` call decided and measured.

    Attributes:
        config: the configuration of the run.
        groups: group -> parameter names.
        towers: tower (stack name, e.g. ``"vision_model.encoder.layers"``) -> its groups.
        group_scores: group -> coarse importance (empty for ``importance="uniform"``).
        group_sparsity: group -> allocated sparsity.
        target_sparsity: parameter name -> sparsity asked of the fine step.
        achieved_sparsity: parameter name -> fraction of the tensor's entries that are pruned.
        sizes: parameter name -> number of entries.
        stages: stage name (``"discovery"``, ``"coarse"``, ``"fine"``; ``"outliers"`` for OWL's dense pass and
            ``"auto"`` for its search) -> its cost.
        masks: parameter name -> bool mask (``True`` = kept); not part of ``to_dict``.
        skipped_stacks: stacks found in the model that the calibration loss never ran (left dense).
        excluded_stacks: stacks that ran but hold no candidate weight: ``include`` / ``exclude`` left every Linear of
            their blocks out (BLIP-2's Q-Former under the default ``exclude``); left dense.
        prior_sparsity: fraction of the candidate weights that were already zero before this run (a model pruned
            before); they are counted as pruned in the masks and in ``achieved_sparsity``.
        group_outlier_ratios: group -> OWL outlier ratio of the dense model (``owl`` and ``auto`` runs).
        candidates: every allocation ``auto`` tried, with its held-out loss, in the order tried.
        chosen_candidate: the name of the candidate ``auto`` kept.
    """

    config: PruningConfig
    groups: dict[str, tuple[str, ...]]
    towers: dict[str, tuple[str, ...]]
    group_scores: dict[str, float]
    group_sparsity: dict[str, float]
    target_sparsity: dict[str, float]
    achieved_sparsity: dict[str, float]
    sizes: dict[str, int]
    stages: dict[str, StageStats]
    masks: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)
    skipped_stacks: tuple[str, ...] = ()
    excluded_stacks: tuple[str, ...] = ()
    prior_sparsity: float = 0.0
    group_outlier_ratios: dict[str, float] = field(default_factory=dict)
    candidates: tuple[CandidateAllocation, ...] = ()
    chosen_candidate: str | None = None

    @property
    def search_cost_ratio(self) -> float | None:
        """``auto``'s wall time over that of a plain run (discovery, coarse and fine steps); None without a search.

        The search (``"auto"``: every candidate's fine step and held-out loss) and OWL's dense pass
        (``"outliers"``) are the extra cost."""
        if not self.candidates:
            return None
        plain = sum(stats.seconds for stage, stats in self.stages.items() if stage in ("discovery", "coarse", "fine"))
        total = sum(stats.seconds for stats in self.stages.values())
        return total / plain if plain > 0 else None

    @property
    def overall_sparsity(self) -> float:
        """Achieved fraction of zeros over every candidate weight."""
        total = sum(self.sizes.values())
        return sum(self.achieved_sparsity[n] * self.sizes[n] for n in self.sizes) / total if total else 0.0

    def tower_sparsity(self) -> dict[str, float]:
        """Tower -> achieved fraction of zeros over its candidate weights."""
        result = {}
        for tower, groups in self.towers.items():
            names = [name for group in groups for name in self.groups[group]]
            total = sum(self.sizes[n] for n in names)
            result[tower] = sum(self.achieved_sparsity[n] * self.sizes[n] for n in names) / total
        return result

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "overall_sparsity": self.overall_sparsity,
            "tower_sparsity": self.tower_sparsity(),
            "groups": {g: list(names) for g, names in self.groups.items()},
            "towers": {t: list(groups) for t, groups in self.towers.items()},
            "group_scores": dict(self.group_scores),
            "group_sparsity": dict(self.group_sparsity),
            "target_sparsity": dict(self.target_sparsity),
            "achieved_sparsity": dict(self.achieved_sparsity),
            "sizes": dict(self.sizes),
            "stages": {stage: stats.to_dict() for stage, stats in self.stages.items()},
            "skipped_stacks": list(self.skipped_stacks),
            "excluded_stacks": list(self.excluded_stacks),
            "prior_sparsity": self.prior_sparsity,
            "group_outlier_ratios": dict(self.group_outlier_ratios),
            "candidates": [candidate.to_dict() for candidate in self.candidates],
            "chosen_candidate": self.chosen_candidate,
            "search_cost_ratio": self.search_cost_ratio,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], masks: dict[str, torch.Tensor] | None = None) -> PruningResult:
        return cls(
            config=PruningConfig.from_dict(data["config"]),
            groups={g: tuple(names) for g, names in data["groups"].items()},
            towers={t: tuple(groups) for t, groups in data["towers"].items()},
            group_scores={g: float(s) for g, s in data["group_scores"].items()},
            group_sparsity={g: float(s) for g, s in data["group_sparsity"].items()},
            target_sparsity={n: float(s) for n, s in data["target_sparsity"].items()},
            achieved_sparsity={n: float(s) for n, s in data["achieved_sparsity"].items()},
            sizes={n: int(s) for n, s in data["sizes"].items()},
            stages={stage: StageStats(**stats) for stage, stats in data["stages"].items()},
            masks=dict(masks or {}),
            skipped_stacks=tuple(data.get("skipped_stacks", ())),
            excluded_stacks=tuple(data.get("excluded_stacks", ())),
            prior_sparsity=float(data.get("prior_sparsity", 0.0)),
            group_outlier_ratios={g: float(d) for g, d in data.get("group_outlier_ratios", {}).items()},
            candidates=tuple(CandidateAllocation.from_dict(c) for c in data.get("candidates", ())),
            chosen_candidate=data.get("chosen_candidate"),
        )
