"""Reusing the group sparsities of an earlier run's ``pruning_report.json``.

The official code's way to give SparseGPT an ECoFLaP + Wanda allocation, or to score on one dataset and prune with
another: any report written by ``ecoflap_pl.reporting.write_report`` (or ``PruningResult.to_dict``) will do, as long
as it was made for the same candidate weights grouped the same way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ecoflap_pl.pruning.allocation.registry import Allocation, AllocationRequest, register_allocation


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


@register_allocation("from_report")
def report_allocation(request: AllocationRequest) -> Allocation:
    """The per-group sparsities of ``allocation_report``, refused when its groups are not this run's.

    Raises:
        ValueError: other granularity, other groups or other weights per group, or another overall sparsity.
    """
    config = request.config
    assert config.allocation_report is not None
    data = read_allocation_report(config.allocation_report)
    granularity = data["config"].get("granularity")
    groups = {group: tuple(names) for group, names in data["groups"].items()}
    if granularity != config.granularity or groups != dict(request.groups):
        only_report = sorted(set(groups) - set(request.groups))[:3]
        only_here = sorted(set(request.groups) - set(groups))[:3]
        raise ValueError(
            f"`allocation_report` {config.allocation_report!r} was made for other groups (granularity "
            f"{granularity!r}, {len(groups)} groups; e.g. only there: {only_report}, only here: {only_here}) than "
            f"this run (granularity {config.granularity!r}, {len(request.groups)} groups). HINT: reuse a report of "
            "the same model with the same include/exclude and granularity."
        )
    sparsity = {group: float(data["group_sparsity"][group]) for group in request.groups}
    total = sum(request.sizes.values())
    achieved = sum(sparsity[g] * request.sizes[g] for g in request.groups) / total
    if abs(achieved - config.sparsity) * total > len(sparsity):
        raise ValueError(
            f"`allocation_report` {config.allocation_report!r} allocates an overall sparsity of {achieved:.4f}, but "
            f"`sparsity` is {config.sparsity!r}. HINT: set sparsity: {data['config'].get('sparsity')} to reuse it."
        )
    return Allocation(sparsity)
