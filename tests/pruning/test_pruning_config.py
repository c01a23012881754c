import math
from pathlib import Path

import pytest

from ecoflap_pl import PruningConfig
from ecoflap_pl.callbacks import ECoFLaPPruning
from ecoflap_pl.pruning.field_types import SettingTypeError


def test_defaults_follow_the_paper():
    config = PruningConfig(sparsity=0.5)
    assert config.max_sparsity == pytest.approx(0.6)
    assert (config.importance, config.score, config.aggregate, config.granularity) == (
        "zeroth_order",
        "grad_only",
        "sum",
        "block",
    )
    assert (config.method, config.comparison, config.coarse_samples, config.fine_samples) == (
        "wanda",
        "per_row",
        32,
        128,
    )
    assert config.eps == 1e-3 and config.exclude == ("*qformer*",)


def test_names_are_normalised_once():
    config = PruningConfig(
        sparsity=0.5, importance="Uniform", method="SparseGPT", structure=" 2 : 4 ", include="*.weight"
    )
    assert config.method == "sparsegpt" and config.structure == "2:4" and config.n_m == (2, 4)
    assert config.include == ("*.weight",) and config.importance == "uniform"
    assert PruningConfig(importance="Zeroth-Order").importance == "zeroth_order"
    assert PruningConfig(sparsity=0.5, method="magnitude").comparison == "per_matrix"
    assert PruningConfig(sparsity=0.95).max_sparsity == pytest.approx(0.99)


def test_round_trip():
    config = PruningConfig(sparsity=0.4, importance="first_order", score="grad_mag_abs", exclude=("*fc1*",))
    assert PruningConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, r"`sparsity` must be in \[0, 1\)"),
        ({"sparsity": -0.1}, r"`sparsity` must be in \[0, 1\)"),
        ({"sparsity": 0.5, "max_sparsity": 0.4}, r"`max_sparsity` must be in \[sparsity, 1\)"),
        ({"sparsity": 0.5, "max_sparsity": 1.0}, r"`max_sparsity` must be in"),
        (
            {"importance": "hessian"},
            r"`importance` must be one of \['zeroth_order', 'first_order', 'gradient_norm', 'uniform'\]",
        ),
        ({"score": "grad"}, r"`score` must be one of"),
        ({"aggregate": "max"}, r"`aggregate` must be one of"),
        ({"granularity": "head"}, r"`granularity` must be one of"),
        ({"method": "obs"}, r"`method` must be one of \['wanda', 'sparsegpt', 'magnitude'\]"),
        ({"comparison": "per_column"}, r"`comparison` must be one of"),
        ({"probe_granularity": "per_layer"}, r"`probe_granularity` must be one of"),
        ({"structure": "2-4"}, r"`structure` must be 'unstructured' or 'N:M'"),
        ({"structure": "4:2", "sparsity": 0.5, "importance": "uniform"}, r"0 < N < M"),
        ({"structure": "2:4", "sparsity": 0.6, "importance": "uniform"}, r"sparsity 0.5.*HINT: set sparsity: 0.5"),
        ({"structure": "2:4", "sparsity": 0.5}, r"`importance` must be 'uniform'"),
        ({"coarse_samples": 0}, r"`coarse_samples` must be a positive integer"),
        ({"fine_samples": -2.0}, r"`fine_samples` must be a positive integer, got -2\."),
        ({"probes": 0}, r"`probes` must be a positive integer"),
        ({"eps": 0.0}, r"`eps` must be > 0"),
        ({"sparsegpt_damping": -1.0}, r"`sparsegpt_damping` must be > 0"),
        ({"include": ()}, r"`include` must name at least one pattern"),
        ({"exclude": ("",)}, r"`exclude` must be a list of non-empty glob patterns"),
        ({"allocation": "greedy"}, r"`allocation` must be one of \[.*'ecoflap'.*'owl'.*\].*HINT"),
        ({"allocation": "from_report"}, r"`allocation_report` must be set exactly when.*HINT"),
        ({"allocation_report": "report.json"}, r"`allocation_report` must be set exactly when.*'ecoflap'"),
        ({"owl_m": 0.0}, r"`owl_m` must be > 0"),
        ({"owl_lambda": -0.1}, r"`owl_lambda` must be in \[0, 1 - sparsity\)"),
        ({"allocation": "owl", "sparsity": 0.9, "owl_lambda": 0.1}, r"`owl_lambda` must be in .* = \[0, 0.1\)"),
        ({"auto_holdout_samples": 0}, r"`auto_holdout_samples` must be a positive integer"),
        ({"structure": "2:4", "sparsity": 0.5, "allocation": "owl"}, r"`allocation` 'uniform'\), got .*'owl'"),
        (
            {
                "structure": "2:4",
                "sparsity": 0.5,
                "importance": "uniform",
                "method": "sparsegpt",
                "sparsegpt_block_size": 6,
            },
            r"`sparsegpt_block_size` must be a multiple of M=4",
        ),
    ],
)
def test_errors_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"Unknown PruningConfig keys \['sparsity_ratio'\]"):
        PruningConfig.from_dict({"sparsity_ratio": 0.5})


def test_allocation_defaults_and_the_uniform_importance_alias():
    config = PruningConfig(sparsity=0.5)
    assert (config.allocation, config.owl_m, config.owl_lambda) == ("ecoflap", 5.0, 0.08)
    assert (config.allocation_report, config.auto_holdout_samples) == (None, 16)
    assert PruningConfig(importance="uniform").allocation == "uniform"  # no scores: the uniform baseline
    assert PruningConfig(importance="uniform", allocation="owl").allocation == "owl"
    assert PruningConfig(allocation="AUTO").allocation == "auto"
    assert PruningConfig(method="sparsegpt").comparison == "per_matrix"  # the original SparseGPT
    assert PruningConfig(fine_samples=8, coarse_samples=4).calibration_samples == 8
    assert PruningConfig(fine_samples=8, coarse_samples=32, allocation="owl").calibration_samples == 8  # no scores
    scored = {
        name: PruningConfig(allocation=name, allocation_report="r.json" if name == "from_report" else None)
        for name in ("ecoflap", "auto", "uniform", "owl", "from_report")
    }
    assert {name: config.scores_groups for name, config in scored.items()} == {
        "ecoflap": True,
        "auto": True,
        "uniform": False,
        "owl": False,
        "from_report": False,
    }
    assert PruningConfig(fine_samples=8, allocation="auto", auto_holdout_samples=3).calibration_samples == 35
    config = PruningConfig(allocation="from_report", allocation_report="runs/x/pruning_report.json")
    assert PruningConfig.from_dict(config.to_dict()) == config
    assert PruningConfig(sparsity=0.95).owl_lambda == 0.08  # only checked against the band when OWL runs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"eps": "1e-3"},
            r"`eps` must be a number, got '1e-3' \(str\)\. HINT: pass the value itself, not a string: "
            r"eps=0\.001\.",
        ),
        ({"sparsity": "0.5"}, r"`sparsity` must be a number, got '0\.5' \(str\).*sparsity=0\.5\."),
        ({"sparsity": True}, r"`sparsity` must be a number, got True \(bool\)\. HINT: the default is 0\.5\."),
        ({"max_sparsity": "0.6"}, r"`max_sparsity` must be a number or None, got '0\.6' \(str\)"),
        ({"owl_lambda": None}, r"`owl_lambda` must be a number, got None \(NoneType\)\. HINT: the default is 0\.08"),
        ({"seed": "x"}, r"`seed` must be an integer, got 'x' \(str\)\. HINT: the default is 0\."),
        ({"seed": "7"}, r"`seed` must be an integer, got '7' \(str\)\. HINT: .*: seed=7\."),
        ({"seed": 1.5}, r"`seed` must be an integer, got 1\.5 \(float\)"),
        ({"fine_samples": 2.5}, r"`fine_samples` must be an integer, got 2\.5 \(float\)\. HINT: the default is 128"),
        ({"coarse_samples": True}, r"`coarse_samples` must be an integer, got True \(bool\)"),
        ({"probes": float("inf")}, r"`probes` must be an integer, got inf \(float\)"),
        ({"prune_per_model": 1}, r"`prune_per_model` must be True or False, got 1 \(int\)"),
        ({"prune_per_model": "false"}, r"`prune_per_model` must be True or False.*prune_per_model=False\."),
        ({"method": 3}, r"`method` must be a string, got 3 \(int\)\. HINT: the default is 'wanda'\."),
        ({"allocation": None}, r"`allocation` must be a string, got None"),
        ({"comparison": 1}, r"`comparison` must be a string or None, got 1 \(int\)"),
        ({"structure": 24}, r"`structure` must be a string, got 24 \(int\)"),
        ({"include": [1]}, r"`include` must be a string or a list of strings, got \[1\] \(list\)"),
        ({"exclude": None}, r"`exclude` must be a string or a list of strings, got None"),
        ({"allocation": "from_report", "allocation_report": 3}, r"`allocation_report` must be a path .* or None"),
    ],
)
def test_a_setting_of_the_wrong_type_is_named(kwargs, message):
    with pytest.raises(SettingTypeError, match=message) as raised:
        PruningConfig(**kwargs)
    # a TypeError, and still a ValueError as every refused setting was before
    assert isinstance(raised.value, TypeError) and isinstance(raised.value, ValueError)


@pytest.mark.parametrize("name", ["sparsity", "max_sparsity", "eps", "owl_m", "owl_lambda", "sparsegpt_damping"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused_naming_the_setting(name, value):
    with pytest.raises(ValueError, match=rf"`{name}` must be a finite number.*, got {value!r}\. HINT: the default"):
        PruningConfig(**{name: value})


def test_values_of_a_compatible_type_are_normalised():
    config = PruningConfig(sparsity=0, eps=1, fine_samples=64.0, seed=3.0, include=["*fc*"], exclude=[])
    assert (config.sparsity, config.eps, config.fine_samples, config.seed) == (0.0, 1.0, 64, 3)
    assert type(config.sparsity) is float and type(config.fine_samples) is int and type(config.seed) is int
    assert config.include == ("*fc*",) and config.exclude == ()
    report = Path("runs") / "pruning_report.json"
    config = PruningConfig(allocation="from_report", allocation_report=report)
    assert config.allocation_report == str(report)
    assert PruningConfig.from_dict(config.to_dict()) == config


def test_a_report_with_a_nan_setting_is_refused():
    data = PruningConfig().to_dict() | {"eps": math.nan}
    with pytest.raises(ValueError, match=r"`eps` must be a finite number, got nan"):
        PruningConfig.from_dict(data)


def test_the_callback_takes_one_pattern_as_one_pattern_and_checks_the_types():
    # A string used to become one pattern per character ('*' among them): every candidate selected, silently.
    assert ECoFLaPPruning(include="*fc*", exclude="*head*").config.include == ("*fc*",)
    assert ECoFLaPPruning(include="*fc*", exclude="*head*").config.exclude == ("*head*",)
    with pytest.raises(SettingTypeError, match=r"`include` must be a string or a list of strings, got 5 \(int\)"):
        ECoFLaPPruning(include=5)
    with pytest.raises(SettingTypeError, match=r"`eps` must be a number, got '1e-3'"):
        ECoFLaPPruning(eps="1e-3")
