"""The scaling study's fits (benchmarks/scaling.py), on runs made up from a known law: the
parabola finds a minimum placed between grid points, an edge optimum is called one, the power
law recovers its exponent, and sweeps (tagged runs) stay out of the fits."""

import importlib.util
import math
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "scaling.py"


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("bench_scaling", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def made_up(budget: float, optimum: float, params: list[float], vocab=4096, tag=""):
    """Runs on bpb = 1.2 + 0.3 (log10 N - log10 optimum)^2, tokens = budget / (6 N)."""
    return [{"vocab": vocab, "budget": budget, "shape": f"n{n:.0f}", "tag": tag,
             "non_embedding_params": n, "tokens": budget / (6 * n),
             "final_val_bpb": 1.2 + 0.3 * (math.log10(n) - math.log10(optimum)) ** 2}
            for n in params]


def test_the_parabola_finds_an_optimum_between_grid_points(scaling):
    runs = made_up(1e13, 3.3e5, [1e5, 2e5, 4e5, 8e5, 1.6e6])
    fit = scaling.isoflop_fit(runs)
    assert fit["inside_grid"] and fit["runs"] == 5
    assert fit["optimal_params"] == pytest.approx(3.3e5, rel=1e-6)
    assert fit["optimal_bpb"] == pytest.approx(1.2, abs=1e-9)
    assert fit["optimal_tokens"] == pytest.approx(1e13 / (6 * 3.3e5), rel=1e-6)
    assert fit["best_run_params"] == 4e5  # the grid point nearest in log: 4e5, not 2e5


def test_the_parabola_is_fitted_near_the_best_run_only(scaling):
    near = made_up(1e13, 3.3e5, [1e5, 2e5, 4e5, 8e5, 1.6e6])
    far = {"vocab": 4096, "budget": 1e13, "shape": "far", "tag": "", "tokens": 1e5,
           "non_embedding_params": 1e8, "final_val_bpb": 9.0}  # off any parabola of the rest
    fit = scaling.isoflop_fit(near + [far])
    assert fit["runs"] == 5 and fit["optimal_params"] == pytest.approx(3.3e5, rel=1e-6)


def test_an_optimum_past_the_grid_is_called_an_edge(scaling):
    edge = scaling.isoflop_fit(made_up(1e13, 5e4, [1e5, 2e5, 4e5, 8e5]))
    assert edge["best_run_params"] == 1e5
    assert not edge["inside_grid"]
    assert scaling.isoflop_fit(made_up(1e13, 5e4, [1e5, 2e5])) is None  # 3 points needed


def test_the_power_law_recovers_its_exponent_and_tags_stay_out(scaling):
    budgets = [2.5e12, 5e12, 1e13, 2e13]
    runs = []
    for b in budgets:  # optimum N = 1e5 * (b / 2.5e12) ** 0.5
        opt = 1e5 * (b / 2.5e12) ** 0.5
        runs += made_up(b, opt, [opt / 4, opt / 2, opt * 1.5, opt * 3, opt * 6])
    # a sweep at one budget whose curve would pull the fit elsewhere
    runs += made_up(1e13, 1e7, [1e5, 1e6, 1e7], tag="lr-0.05")
    out = scaling.fits(runs)["4096"]
    assert set(out["budgets"]) == {f"{b:.3g}" for b in budgets}
    assert out["params_law"]["exponent"] == pytest.approx(0.5, abs=1e-6)
    assert out["tokens_law"]["exponent"] == pytest.approx(0.5, abs=1e-6)  # C = 6 N D
    assert out["budgets"]["1e+13"]["runs"] == 5
    assert scaling.power_law([1e13], [1e5]) is None
