"""Sub-command ``solve``: the exact solver (default) or the spec's Kaczmarz method."""
from __future__ import annotations

import numpy as np



def add_operator_options(parser) -> None:
    """``--operator``, ``--norm``, ``--amp``: where A comes from.  Local."""
    from ..operators.base import OPERATOR_CHOICES

    g = parser.add_argument_group("operator")
    g.add_argument("--operator", default="auto", choices=OPERATOR_CHOICES,
                   help="where A comes from: its two factors (no hypercube needed), /HyperCube/models as "
                        "stored, or auto (the factors when exact for this file; default %(default)s)")
    g.add_argument("--norm", dest="norm_mode", default=None, help="model | data: the normalisation of factored "
                   "models when the file has no hypercube (default: the hypercube's, else model)")
    g.add_argument("--amp", dest="amp_mode", default=None, help="sum | trapz: LOSVD amplitude of factored models "
                   "when the file has no hypercube (default: the hypercube's, else sum)")


def operator_options(args) -> dict:
    """The operator keywords of parsed arguments.  Local."""
    return {"operator": args.operator, "norm_mode": args.norm_mode, "amp_mode": args.amp_mode}


def register(sub) -> None:
    """Add the ``solve`` sub-parser; every default is the solver function's own.  Local."""
    from ..config.options import default_of
    from ..pipeline.runner import PipelineRunner
    from ..solvers.exact import solve_exact
    from ..solvers.kaczmarz.solver import solve_kaczmarz
    from ..solvers.orbit import ORBIT_MODES, ORBIT_TOTALS

    def exact(name):
        return default_of(solve_exact, name)

    def kz(name):
        return default_of(solve_kaczmarz, name)

    p = sub.add_parser("solve", help="solve for /X_global (exact NNLS by default; --method kaczmarz)")
    p.add_argument("file")
    p.add_argument("--method", default=default_of(PipelineRunner.solve, "method"),
                   help="exact | kaczmarz (default %(default)s)")
    g = p.add_argument_group("exact")
    g.add_argument("--ridge", type=float, default=exact("ridge"), help="rho of rho/2 ||x||^2 (default CUBEFIT_NNLS_L2)")
    g.add_argument("--regul", type=float, default=exact("regul"),
                   help="smoothness strength over the population grid (default %(default)s)")
    g.add_argument("--regul-order", type=int, default=exact("regul_order"), help="1 or 2 (differences), default %(default)s")
    g.add_argument("--exact-method", default=exact("exact_method"), help="auto | gram | working-set (default %(default)s)")
    g.add_argument("--no-cache", action="store_true", help="recompute the Gram matrix even if /Solve holds it")
    g.add_argument("--no-verify", action="store_true", help="skip the separate chi2 residual pass")
    g.add_argument("--add-degree", type=int, default=exact("add_degree"), metavar="D",
                   help="additive Legendre polynomials up to degree D per spectrum, eliminated exactly "
                        "(pPXF's degree; -1 or left out: none); stored at /Solve/add_poly")
    g.add_argument("--mult-degree", type=int, default=exact("mult_degree"), metavar="D",
                   help="multiplicative Legendre polynomials of degrees 1..D per spectrum (pPXF's mdegree; "
                        "0 or left out: none), by exact alternating steps; stored at /Solve/mult_poly")
    p.add_argument("--orbit-weights", default=None, metavar="DATASET|FILE|a,b,c",
                   help="target fractions of the component totals")
    p.add_argument("--orbit-mode", default=exact("orbit_mode"), choices=ORBIT_MODES,
                   help="strict: the component totals are equality constraints (exact: certified with their "
                        "multipliers; kaczmarz: each block rescaled to its target after every tile); penalty: "
                        "a quadratic penalty (exact) or a nudge (kaczmarz) of strength --orbit-strength; auto: "
                        "penalty when --orbit-strength is given, else strict (default %(default)s)")
    p.add_argument("--orbit-totals", default=exact("orbit_totals"), choices=ORBIT_TOTALS,
                   help="strict targets as fractions of the total (normalised to sum 1) or as absolute "
                        "component totals in the units of x (default %(default)s)")
    p.add_argument("--orbit-strength", type=float, default=None,
                   help="penalty mode; exact: mu of the orbit-weight penalty (required); kaczmarz: "
                        "fraction of the way to the targets per tile (default 0.1)")
    p.add_argument("--no-weights", action="store_true", help="ignore lambda-weights")
    add_operator_options(p)
    k = p.add_argument_group("kaczmarz")
    k.add_argument("--epochs", type=int, default=kz("epochs"), help="passes over all S-tiles (default %(default)s)")
    k.add_argument("--lr", type=float, default=kz("lr"), help="base learning rate (default %(default)s)")
    k.add_argument("--warm-start", default=kz("warm_start"), help="zeros | exact | resume | jacobi (default %(default)s)")
    k.add_argument("--c-bands", type=int, default=kz("c_bands"), help="component bands per S-group (default min(ranks, C))")
    k.add_argument("--decorrelate", type=float, default=kz("decorrelate"),
                   help="de-correlation nudge strength in [0, 1] (default %(default)s)")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help="exact: then N bootstrap replicates with the defaults of `uncertainty` (0: none)")
    p.add_argument("--blas-threads", type=int, default=None)
    p.set_defaults(handler=cmd_solve)


def cmd_solve(args, comm) -> int:
    from ..pipeline.runner import PipelineRunner

    if args.bootstrap:
        from ..config.errors import InputError
        from ..config.options import check_number

        check_number("--bootstrap", args.bootstrap, minimum=0, integer=True)
        if args.method != "exact":
            raise InputError(f"--bootstrap: needs --method exact (it reuses the exact fit's normal equations), "
                             f"got --method {args.method}")
        from ..solvers.uncertainty import refuse_polynomials

        refuse_polynomials(args.add_degree, args.mult_degree, "--bootstrap")     # before anything is written
    runner = PipelineRunner(args.file, comm=comm)
    common = dict(orbit_weights=args.orbit_weights, orbit_strength=args.orbit_strength, orbit_mode=args.orbit_mode,
                  orbit_totals=args.orbit_totals,
                  use_weights=not args.no_weights, add_degree=args.add_degree, mult_degree=args.mult_degree,
                  **operator_options(args))
    if args.method == "exact":
        x, stats = runner.solve("exact", blas_threads=args.blas_threads, ridge=args.ridge, regul=args.regul,
                                regul_order=args.regul_order, use_cache=not args.no_cache,
                                verify=not args.no_verify, exact_method=args.exact_method, **common)
    else:
        x, stats = runner.solve(args.method, blas_threads=args.blas_threads, epochs=args.epochs, lr=args.lr,
                                warm_start=args.warm_start, c_bands=args.c_bands, decorrelate=args.decorrelate,
                                **common)
    if comm.Get_rank() == 0:
        totals = np.array2string(np.asarray(stats.get("component_totals", [])), precision=6)
        line = f"solved {args.file}:/X_global ({stats.get('method', args.method)}): chi2={stats.get('chi2', float('nan')):.10g}"
        if "kkt.ok" in stats:
            line += f", KKT certificate {'OK' if stats['kkt.ok'] else 'NOT MET'}"
        if stats.get("poly.mult_degree", 0) > 0:
            line += (f", polynomials (additive degree {stats['poly.add_degree']}, multiplicative degree "
                     f"{stats['poly.mult_degree']}) in {stats['poly.iterations']} iteration(s)"
                     f"{'' if stats['poly.converged'] else ' (NOT converged)'}")
        elif stats.get("poly.add_degree", -1) >= 0:
            line += f", additive polynomials of degree {stats['poly.add_degree']}"
        print(line + f", component totals {totals}, {stats.get('seconds', 0):.1f}s on {comm.Get_size()} rank(s)")
    if args.bootstrap:
        from ..solvers.uncertainty import bootstrap_uncertainty
        from .uncertainty import report_line

        out = bootstrap_uncertainty(args.file, replicates=args.bootstrap, comm=comm)
        if comm.Get_rank() == 0:
            print(report_line(args.file, out))
    return 0
