"""Sub-command ``run``: the whole pipeline from a YAML configuration (see ``init-config``)."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("run", help="run ingest -> build -> weights -> solve -> recon -> plots from a YAML "
                                   "configuration; steps already complete and current are skipped")
    p.add_argument("config", help="configuration file (write one with `cubefit_mpi init-config`)")
    p.set_defaults(handler=cmd_run)


def cmd_run(args, comm) -> int:
    from ..parallel.collectives import agree, raise_if_any
    from ..pipeline.config import load_config
    from ..pipeline.run import run_pipeline

    cfg, error = None, None
    if comm.Get_rank() == 0:
        try:
            cfg = load_config(args.config)
        except Exception as exc:          # noqa: BLE001 -- re-raised on every rank just below
            error = exc
    raise_if_any(error, comm)
    cfg = agree(cfg, comm)
    if cfg.get("file") is None:
        report = run_pipeline(cfg, comm)          # refuses the configuration with its own message
    else:
        from ..io.lock import write_lock

        with write_lock(cfg["file"], "run", comm):
            report = run_pipeline(cfg, comm)
    if comm.Get_rank() == 0:
        for step, what, seconds in report:
            print(f"{step:8s} {what:8s} {seconds:8.1f}s")
        print(f"pipeline done: {cfg['file']}")
    return 0
