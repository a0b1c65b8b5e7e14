"""Each option has one default (the Python signature's), read by the command line and the YAML
schema; an unknown keyword is a TypeError naming the closest valid one; numbers are checked once."""
import argparse

import pytest

from cubefit_mpi.cli.main import build_parser
from cubefit_mpi.config.errors import InputError
from cubefit_mpi.config.options import check_number, default_of, keyword_checked
from cubefit_mpi.pipeline.config import SCHEMA
from cubefit_mpi.pipeline.runner import PipelineRunner
from cubefit_mpi.solvers.exact import solve_exact
from cubefit_mpi.solvers.kaczmarz.solver import solve_kaczmarz
from cubefit_mpi.stages.build import build_hypercube
from cubefit_mpi.stages.plots import make_plots
from cubefit_mpi.stages.recon import reconstruct
from cubefit_mpi.stages.weights import ensure_lambda_weights

# (function, parameter, command, command-line dest, YAML section, YAML key)
SHARED = [
    (solve_exact, "ridge", "solve", "ridge", "solve", "ridge"),
    (solve_exact, "regul", "solve", "regul", "solve", "regul"),
    (solve_exact, "regul_order", "solve", "regul_order", "solve", "regul_order"),
    (solve_kaczmarz, "epochs", "solve", "epochs", "solve", "epochs"),
    (solve_kaczmarz, "lr", "solve", "lr", "solve", "lr"),
    (solve_kaczmarz, "warm_start", "solve", "warm_start", "solve", "warm_start"),
    (solve_kaczmarz, "orbit_strength", "solve", "orbit_strength", "solve", "orbit_strength"),
    (solve_exact, "orbit_mode", "solve", "orbit_mode", "solve", "orbit_mode"),
    (solve_exact, "orbit_totals", "solve", "orbit_totals", "solve", "orbit_totals"),
    (solve_kaczmarz, "orbit_mode", "solve", "orbit_mode", "solve", "orbit_mode"),
    (PipelineRunner.solve, "method", "solve", "method", "solve", "method"),
    (build_hypercube, "norm_mode", "build", "norm", "build", "norm_mode"),
    (build_hypercube, "amp_mode", "build", "amp", "build", "amp_mode"),
    (build_hypercube, "rebin_mode", "build", "rebin_mode", "build", "rebin_mode"),
    (ensure_lambda_weights, "small", "weights", "small", "weights", "small"),
    (ensure_lambda_weights, "large", "weights", "large", "weights", "large"),
    (ensure_lambda_weights, "min_w", "weights", "min_w", "weights", "min_w"),
    (reconstruct, "out", "recon", "out", "recon", "dataset"),
    (make_plots, "n_spaxels", "plot", "n", "plots", "n"),
]


def _command_defaults(command: str, file_arg: str = "f.h5") -> argparse.Namespace:
    return build_parser().parse_args([command, file_arg])


@pytest.mark.parametrize("fn, param, command, dest, section, key", SHARED,
                         ids=[f"{s[2]}.{s[3]}" for s in SHARED])
def test_command_line_and_yaml_take_the_signature_default(fn, param, command, dest, section, key):
    expected = default_of(fn, param)
    assert getattr(_command_defaults(command), dest) == expected
    assert SCHEMA[section][key].default == expected


def test_the_kaczmarz_defaults_are_the_spec_workflows():
    assert (default_of(solve_kaczmarz, "epochs"), default_of(solve_kaczmarz, "lr")) == (6, 0.6)


@pytest.mark.parametrize("fn, typo, closest", [
    (solve_kaczmarz, "epoch", "epochs"), (solve_exact, "ridg", "ridge"), (build_hypercube, "norm", "norm_mode")])
def test_an_unknown_keyword_names_the_closest_valid_one(fn, typo, closest):
    with pytest.raises(TypeError, match=rf"unknown keyword '{typo}' \(did you mean '{closest}'\?\)"):
        fn("never-opened.h5", **{typo: 1})


def test_the_runner_forwards_options_and_their_typos(monkeypatch):
    seen = {}
    monkeypatch.setattr(PipelineRunner, "solve", lambda self, method, **kw: seen.update(method=method, **kw))
    from mpi4py import MPI

    runner = PipelineRunner("g.h5", comm=MPI.COMM_SELF)
    runner.solve_all_mp_batched(epochs=3, processes=8)
    assert seen == {"method": "kaczmarz", "blas_threads": None, "epochs": 3}


def test_keyword_checked_keeps_the_function_and_its_signature():
    @keyword_checked
    def f(a, *, b=2):
        return a + b

    assert f(1, b=3) == 4 and default_of(f, "b") == 2
    with pytest.raises(TypeError, match="valid keywords: a, b"):
        f(1, c=3)


@pytest.mark.parametrize("value, kwargs, message", [
    ("nan", {}, "expected a finite number"), (float("inf"), {}, "expected a finite number"),
    (-1, {"minimum": 0.0}, "expected a value >= 0"), (0, {"minimum": 0.0, "strict_minimum": True}, "expected a value > 0"),
    (2.5, {"integer": True}, "expected an integer"), ("x", {}, "expected a number")])
def test_check_number_refuses_with_the_option_named(value, kwargs, message):
    with pytest.raises(InputError, match=rf"^--opt={value!r}: {message}"):
        check_number("--opt", value, **kwargs)
    assert check_number("--opt", 3, minimum=0, integer=True) == 3 and check_number("--opt", None) is None
