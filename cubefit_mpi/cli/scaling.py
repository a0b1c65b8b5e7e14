"""Sub-commands of the scaling stage: ``scaling`` (the study and the model) and the hidden
``scaling-worker`` that the study launches under mpiexec/srun."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..config.errors import InputError
from ..perf import model as sm
from ..perf.factored_model import factored_table


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise InputError(f"{option} {text}: expected comma-separated positive integers, e.g. 1,2,4")
    return values


def register(sub) -> None:
    p = sub.add_parser("scaling", help="strong/weak scaling study of build and solve (CSV + plots), and the "
                                       "performance model's predictions")
    p.add_argument("target", nargs="?", default=None,
                   help="an existing cube file (its inputs are copied) or a mock size S,C,P,L")
    p.add_argument("--ranks", default="1,2", help="rank counts (default 1,2)")
    p.add_argument("--what", default="build,solve", help="stages to time: build,solve (default both)")
    p.add_argument("--repeat", type=int, default=3, help="runs per point; medians are kept (default 3)")
    p.add_argument("--weak", action="store_true", help="weak scaling: S×N spaxels at N ranks (mock sizes only)")
    p.add_argument("--out", default="scaling", metavar="DIR", help="output folder (default ./scaling)")
    p.add_argument("--model", action="store_true",
                   help="calibrate the model on the smallest rank count and add its predictions (model_* columns)")
    p.add_argument("--predict", action="store_true",
                   help="print the model's table for --problem on --machine at --nodes (no runs needed)")
    p.add_argument("--machine", default=None, metavar="FILE",
                   help="target machine parameters (JSON or YAML) for --predict; default: an assumed 128-core "
                        "node with this machine's per-core costs")
    p.add_argument("--problem", default=",".join(map(str, sm.REAL_GALAXY)), metavar="S,C,P,L",
                   help="problem size for --predict (default the real galaxy 3000,200,360,1250)")
    p.add_argument("--active-set", type=int, default=2000, metavar="K",
                   help="expected non-zero weights of the solution, for --predict (default 2000)")
    p.add_argument("--nodes", default=",".join(map(str, sm.NODE_COUNTS)), help="node counts for --predict")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds allowed per launched run")
    p.set_defaults(handler=cmd_scaling)

    p = sub.add_parser("scaling-worker")          # no help: hidden; launched by `scaling`
    p.add_argument("file")
    p.add_argument("--what", default="build,solve")
    p.add_argument("--scratch", required=True)
    p.set_defaults(handler=cmd_scaling_worker)


def cmd_scaling(args, comm) -> int:
    from ..perf import study as scaling

    if comm.Get_size() > 1:
        raise InputError(f"scaling: run it as one process (it launches its own runs with mpiexec/srun); "
                         f"got {comm.Get_size()} ranks")
    if args.predict:
        report = predict_report(args.machine, _int_list(args.problem, "--problem"), _int_list(args.nodes, "--nodes"),
                                active_set=args.active_set, out_dir=args.out)
        print(format_table(report))
        if args.target is None:
            return 0
    if args.target is None:
        raise InputError("scaling: expected a cube file or a mock size S,C,P,L (or --predict)")
    what = [w.strip() for w in args.what.split(",") if w.strip()]
    result = scaling.run_study(args.target, _int_list(args.ranks, "--ranks"), what, args.out, repeat=args.repeat,
                               weak=args.weak, model=args.model, timeout=args.timeout)
    print(format_comparison(result["rows"]))
    print(f"wrote {result['csv']} and {len(result['pngs'])} plots in {args.out}")
    return 0


def cmd_scaling_worker(args, comm) -> int:
    from ..perf.worker import RESULT_TAG, worker

    what = [w.strip() for w in args.what.split(",") if w.strip()]
    result = worker(args.file, what, args.scratch, comm)
    if comm.Get_rank() == 0:
        print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# --predict: the model for a target machine
# ---------------------------------------------------------------------------------------------
def load_machine(path: str | None) -> dict:
    """Machine parameters from a JSON or YAML file (a flat mapping), or {}.  Local."""
    if path is None:
        return {}
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise InputError(f"--machine {path}: cannot read ({exc.strerror})") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except Exception as exc:          # noqa: BLE001 (any parse error is the user's to fix)
        raise InputError(f"--machine {path}: not valid {'YAML' if path.endswith(('yaml', 'yml')) else 'JSON'} "
                         f"({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise InputError(f"--machine {path}: expected a mapping of parameter names to numbers")
    return values


def predict_report(machine_file: str | None, dims: list[int], nodes: list[int], *, active_set: int = 2000,
                   out_dir: str | None = None) -> dict:
    """The model's tables for ``dims`` = S,C,P,L at each node count.  Local.

    Parameters missing from the machine file come from :data:`scaling_model.GENERIC_NODE` and,
    for the per-core costs, from :func:`cubefit_mpi.perf.probe.measure_core` on this machine.  Writes
    ``model_table.csv`` in ``out_dir`` when given.
    """
    from ..perf import probe

    if len(dims) != 4:
        raise InputError(f"--problem {','.join(map(str, dims))}: expected S,C,P,L")
    problem = probe.galaxy_problem(*dims, active_set=active_set)
    given = load_machine(machine_file)
    values = {**sm.GENERIC_NODE, **given}
    measured = {} if all(k in given for k in probe.CORE_KEYS) else probe.measure_core(problem)
    values = {**values, **{k: v for k, v in measured.items() if k not in given}}
    try:
        machine = sm.Machine.from_dict(values)
    except ValueError as exc:
        raise InputError(f"--machine {machine_file}: {exc}") from None
    sections = [("build", "1 rank/core", sm.table(problem, machine, nodes, stage="build"))]
    for label, per_node, threads in sm.solve_layouts(problem, machine):
        sections.append(("solve", label, sm.table(problem, machine, nodes, stage="solve", ranks_per_node=per_node,
                                                  threads=threads)))
    sections.append(("solve", "from the factors, no hypercube (--operator factored)",
                     factored_table(problem, machine, nodes)))
    report = {"problem": problem, "machine": machine, "sections": sections, "limits": sm.limits(problem, machine),
              "measured_here": sorted(measured)}
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        path = Path(out_dir) / "model_table.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["stage", "layout", "nodes", "ranks", "method", "passes", "setup", "compute", "io",
                             "comm", "serial", "total", "speedup", "efficiency", "bound"])
            for stage, label, rows in sections:
                for r in rows:
                    writer.writerow([stage, label, r["nodes"], r["ranks"], r["method"], r["passes"]]
                                    + [f"{r[k]:.4g}" for k in ("setup", "compute", "io", "comm", "serial", "total",
                                                               "speedup", "efficiency")] + [r["bound"]])
        report["csv"] = str(path)
    return report


# ---------------------------------------------------------------------------------------------
# text output
# ---------------------------------------------------------------------------------------------
def _fmt_seconds(value: float) -> str:
    if value >= 86400:
        return f"{value / 86400:.1f} d"
    if value >= 3600:
        return f"{value / 3600:.1f} h"
    if value >= 100:
        return f"{value / 60:.1f} min"
    return f"{value:.3g} s"


def format_comparison(rows: list[dict]) -> str:
    """Measured medians (and the model's prediction when present), one line per point."""
    model = any("model_wall" in r for r in rows)
    head = f"{'what':<6} {'ranks':>5} {'wall':>9} {'compute':>9} {'io':>9} {'comm':>9} {'speedup':>8} {'eff':>6}"
    lines = [head + (f" {'model':>9} {'error':>7}" if model else "")]
    for r in rows:
        line = (f"{r['what']:<6} {r['ranks']:>5} {r['wall']:>9.4f} {r['compute_max']:>9.4f} {r['io_max']:>9.4f} "
                f"{r['comm_max']:>9.4f} {r['speedup']:>8.3f} {r['efficiency']:>6.3f}")
        if "model_wall" in r:
            line += f" {r['model_wall']:>9.4f} {100 * r['model_error']:>+6.1f}%"
        lines.append(line + ("  (oversubscribed)" if r.get("oversubscribed") else ""))
    return "\n".join(lines)


def format_table(report: dict) -> str:
    """The model's predictions per stage and layout, and where scaling stops."""
    p, m, lim = report["problem"], report["machine"], report["limits"]
    lines = [f"model: S={p.S} C={p.C} P={p.P} L={p.L} T={p.T} (N={p.N}, k={p.k}, hypercube "
             f"{p.model_bytes / 1e12:.3g} TB, {p.n_units} build units, {p.n_s_tiles} S-tiles) on {m.name}: "
             f"{m.cores_per_node} cores/node, {m.node_memory / 2**30:.0f} GiB/node"]
    if report["measured_here"]:
        lines.append("per-core costs measured on this machine: " + ", ".join(report["measured_here"]))
    for stage, label, rows in report["sections"]:
        lines.append(f"\n{stage} ({label})")
        lines.append(f"{'nodes':>6} {'ranks':>7} {'method':>12} {'passes':>6} {'compute':>9} {'io':>9} {'comm':>9} "
                     f"{'rank0':>9} {'total':>9} {'speedup':>8} {'eff':>5}  bound")
        for r in rows:
            method = r["method"] + ("!" if r["fails"] else "")
            lines.append(f"{r['nodes']:>6} {r['ranks']:>7} {method:>12} {r['passes']:>6} "
                         + " ".join(f"{_fmt_seconds(r[k]):>9}" for k in ("compute", "io", "comm", "serial", "total"))
                         + f" {r['speedup']:>8.1f} {r['efficiency']:>5.2f}  {r['bound']}")
        if rows and rows[-1]["notes"]:
            lines.append("  note: " + "; ".join(rows[-1]["notes"]))
        if any(r["fails"] for r in rows):
            lines.append("  !: the working set does not fit the per-rank memory budget at this layout")
    lines.append(f"\nlimits: build uses at most {lim['build_max_ranks']} ranks ({lim['build_max_nodes']} nodes), "
                 f"the solve's passes at most {lim['solve_max_ranks']} ranks ({lim['solve_max_nodes']} nodes); "
                 f"file-system floors {_fmt_seconds(lim['build_io_floor'])} per build, "
                 f"{_fmt_seconds(lim['pass_io_floor'])} per solve pass; Gram matrix "
                 f"{lim['gram_bytes'] / 2**30:.1f} GiB vs {lim['gram_budget'] / 2**30:.2f} GiB per rank "
                 f"({lim['solve_method']}, {lim['solve_passes']} passes); rank-0 NNLS {_fmt_seconds(lim['nnls_floor'])}")
    if "csv" in report:
        lines.append(f"wrote {report['csv']}")
    return "\n".join(lines)
