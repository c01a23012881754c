"""Reusing the group sparsities of an earlier run's ``pruning_report.json``.

The official code's way to give SparseGPT an ECoFLaP + Wanda allocation, or to score on one dataset and prune with
another: any report written by ``ecoflap_pl.reporting.write_report`` (or ``PruningResult.to_dict``) will do, as long
as it was made for the same candidate weights grouped the same way.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ecoflap_pl.pruning.allocation.registry import Allocation, AllocationRequest, register_allocation
from ecoflap_pl.pruning.config import PruningConfig


def read_allocation_report(path: str | Path) -> dict[str, Any]:
    """The JSON of a pruning report, checked to hold ``config``, ``groups`` (group -> weight names) and
    ``group_sparsity`` (the same groups -> a sparsity in [0, 1)).

    Raises:
        FileNotFoundError, ValueError: a missing file, not JSON, or not a pruning report (or an edited, damaged one).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"`allocation_report` {str(path)!r} is not a file. HINT: point it at the pruning_report.json of an "
            "earlier run (written next to its logs, or in its save_to directory)."
        )
    hint = "HINT: use the pruning_report.json that an earlier run wrote, unedited."
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"`allocation_report` {str(path)!r} is not JSON ({error}). {hint}") from error
    missing = [key for key in ("groups", "group_sparsity", "config") if not isinstance(data, dict) or key not in data]
    if missing:
        raise ValueError(f"`allocation_report` {str(path)!r} is not a pruning report: it lacks {missing}. {hint}")
    problem = _report_problem(data)
    if problem:
        raise ValueError(f"`allocation_report` {str(path)!r} is not a valid pruning report: {problem}. {hint}")
    return data


def _report_problem(data: dict[str, Any]) -> str | None:
    """What is wrong with the ``config``, ``groups`` and ``group_sparsity`` entries of a report, if anything."""
    if not isinstance(data["config"], dict):
        return f"`config` must be a mapping, got {type(data['config']).__name__}"
    groups, sparsity = data["groups"], data["group_sparsity"]
    if not isinstance(groups, dict) or not all(
        isinstance(names, list) and all(isinstance(name, str) for name in names) for names in groups.values()
    ):
        return "`groups` must map each group to a list of weight names"
    if not isinstance(sparsity, dict) or set(sparsity) != set(groups):
        shown = sorted(set(groups) ^ set(sparsity))[:3] if isinstance(sparsity, dict) else type(sparsity).__name__
        return f"`group_sparsity` must give a sparsity for each of its {len(groups)} groups and no other ({shown})"
    bad = {
        group: value
        for group, value in sparsity.items()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1
    }
    if bad:
        shown = ", ".join(f"{group}: {value!r}" for group, value in list(bad.items())[:3])
        return f"every group sparsity must be a number in [0, 1), got {shown}"
    return None


def check_report_fits(
    data: dict[str, Any],
    config: PruningConfig,
    groups: Mapping[str, tuple[str, ...]],
    sizes: Mapping[str, int],
    *,
    complete: bool = True,
) -> None:
    """Refuse a report (:func:`read_allocation_report`) made for other groups than ``groups``, or for another overall
    sparsity than ``config.sparsity``.

    Args:
        data: the report.
        config: this run's configuration (``granularity``, ``sparsity``, ``allocation_report``).
        groups: this run's groups (group -> weight names).
        sizes: parameters per group, at least for the report's groups.
        complete: whether ``groups`` are exactly the groups pruned; ``False`` when they may hold more (found
            before the calibration forward, which leaves out stacks that never run): the report's groups must then
            be among them.

    Raises:
        ValueError: other granularity, groups or weights per group, or another overall sparsity.
    """
    granularity = data["config"].get("granularity")
    reported = {group: tuple(names) for group, names in data["groups"].items()}
    fits = all(groups.get(group) == names for group, names in reported.items())
    if granularity != config.granularity or not fits or (complete and set(groups) != set(reported)):
        only_report = sorted(set(reported) - set(groups))[:3]
        only_here = sorted(set(groups) - set(reported))[:3]
        raise ValueError(
            f"`allocation_report` {config.allocation_report!r} was made for other groups (granularity "
            f"{granularity!r}, {len(reported)} groups; e.g. only there: {only_report}, only here: {only_here}) than "
            f"this run (granularity {config.granularity!r}, {len(groups)} groups). HINT: reuse a report of the same "
            "model with the same include/exclude and granularity."
        )
    sparsity = {group: float(data["group_sparsity"][group]) for group in reported}
    total = sum(sizes[group] for group in reported)
    achieved = sum(sparsity[group] * sizes[group] for group in reported) / total
    if abs(achieved - config.sparsity) * total > len(sparsity):
        raise ValueError(
            f"`allocation_report` {config.allocation_report!r} allocates an overall sparsity of {achieved:.4f}, but "
            f"`sparsity` is {config.sparsity!r}. HINT: set sparsity: {data['config'].get('sparsity')} to reuse it."
        )


@register_allocation("from_report", reads_scores=False)
def report_allocation(request: AllocationRequest) -> Allocation:
    """The per-group sparsities of ``allocation_report``, refused when its groups are not this run's.

    Raises:
        ValueError: other granularity, other groups or other weights per group, or another overall sparsity.
    """
    config = request.config
    assert config.allocation_report is not None
    data = read_allocation_report(config.allocation_report)
    check_report_fits(data, config, request.groups, request.sizes)
    return Allocation({group: float(data["group_sparsity"][group]) for group in request.groups})
