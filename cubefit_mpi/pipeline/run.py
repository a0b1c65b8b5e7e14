"""Stage ``run``: the whole pipeline from a configuration file, resumable.

``cubefit_mpi run cubefit.yaml`` executes ingest → build → weights → solve → recon → plots (the
steps listed in the file, always in that order).  After each step a digest of its options, of
everything upstream (the input files' checksums for ingest) and of the content of every dataset
it reads (:func:`step_reads`, e.g. ``/DataCube``, ``/Mask``, ``/LOSVD``, the templates) is stored
as an attribute of the group ``/Pipeline``; a rerun skips every step whose digest is unchanged and
whose outputs are complete (an in-place edit of an input therefore re-runs the steps that read it), so a run killed half-way resumes where it stopped (the builder also resumes inside
its step).  Knobs of the file's ``knobs:`` section are exported before the first step.
"""
from __future__ import annotations

import json
import logging
import os
import time

from ..config.errors import InputError
from ..io import layout as lay
from ..io.h5file import open_h5
from ..numerics.digest import array_digest
from ..parallel.collectives import agree
from ..parallel.comm import get_comm
from .config import STEPS

_LOG = logging.getLogger("cubefit_mpi.run")
PIPELINE = "/Pipeline"


def _digest(*parts) -> str:
    import numpy as np

    return array_digest(np.frombuffer(json.dumps(parts, sort_keys=True, default=str).encode(), dtype=np.uint8))


def _stored_digest(path: str, step: str, comm) -> str | None:
    if not os.path.exists(path):
        return None
    with open_h5(path, "r", comm) as f:
        if PIPELINE in f and f"{step}.digest" in f[PIPELINE].attrs:
            return str(f[PIPELINE].attrs[f"{step}.digest"])
    return None


def _record(path: str, step: str, digest: str, seconds: float, comm) -> None:
    with open_h5(path, "r+", comm) as f:
        group = f.require_group(PIPELINE)
        group.attrs[f"{step}.digest"] = digest
        group.attrs[f"{step}.seconds"] = float(seconds)
        group.attrs[f"{step}.finished"] = agree(time.strftime("%Y-%m-%dT%H:%M:%S"), comm)


def _outputs_complete(path: str, step: str, cfg: dict, comm) -> bool:
    if step == "plots":
        return os.path.isdir(cfg["plots"]["outdir"]) and any(
            name.endswith(".png") for name in os.listdir(cfg["plots"]["outdir"]))
    with open_h5(path, "r", comm) as f:
        if step == "ingest":
            return all(name in f for name in (lay.TEMPLATES, lay.LOSVD, lay.DATACUBE, lay.R_T))
        if step == "build":
            return lay.MODELS in f and bool(f[lay.HYPERCUBE].attrs.get("complete", False))
        if step == "weights":
            return lay.LAMBDA_WEIGHTS in f
        if step == "solve":
            return lay.X_GLOBAL in f
        if step == "recon":
            return cfg["recon"]["dataset"] in f
    return False


def step_reads(step: str, cfg: dict) -> tuple[str, ...]:
    """The datasets whose content a step's result depends on (an in-place edit re-runs it).  Local."""
    from ..config.knobs import get_knobs

    weights = get_knobs().lambda_weights_dset
    if step == "build":
        data = (lay.DATACUBE, lay.DATA_FLUX) if cfg["build"]["norm_mode"] == "data" else ()
        return (lay.TEMPLATES, lay.TEM_PIX, lay.OBS_PIX, lay.VEL_PIX, lay.LOSVD, lay.R_T) + data
    if step == "weights":
        return (lay.DATACUBE, lay.MASK, lay.OBS_PIX)
    if step == "solve":
        return (lay.MODELS, lay.DATACUBE, lay.MASK, weights, lay.TEMPLATES)
    if step == "recon":
        return (lay.MODELS, lay.X_GLOBAL, lay.DATACUBE, lay.MASK, weights)
    if step == "plots":
        return (lay.X_GLOBAL, cfg["recon"]["dataset"], lay.DATACUBE, lay.MASK)
    return ()


def _step_key(step: str, cfg: dict, upstream: str, comm) -> str:
    """The digest of a step's options, what ran before it and the content of what it reads.  Collective."""
    contents = {}
    reads = step_reads(step, cfg)
    if reads and os.path.exists(cfg["file"]):
        from ..io.content import content_digest

        with open_h5(cfg["file"], "r", comm) as f:
            contents = content_digest(f, reads, comm)
    return agree(_digest(_upstream_key(step, cfg, upstream), contents) if comm.Get_rank() == 0 else None, comm)


def _upstream_key(step: str, cfg: dict, upstream: str) -> str:
    if step == "ingest":
        from ..io.ingest_readers import file_provenance

        opts = cfg["ingest"]
        inputs = [file_provenance(role, opts[role]) for role in ("cube", "templates", "losvd")]
        if opts.get("bins"):
            inputs.append(file_provenance("bins", opts["bins"]))
        return _digest(step, opts, [(i["name"], i["bytes"], i["sha256"]) for i in inputs])
    return _digest(step, cfg[step], upstream)


def run_pipeline(cfg: dict, comm=None) -> list[tuple[str, str, float]]:
    """Run the configured steps; returns ``[(step, "ran"|"skipped"|"disabled", seconds)]``.  Collective."""
    comm = get_comm(comm)
    for name, value in cfg.get("knobs", {}).items():
        os.environ[name] = value
    path = cfg["file"]
    if path is None:
        raise InputError("file: required (the cube file the steps work on)")
    if "ingest" not in cfg["steps"] and not os.path.exists(path):
        raise InputError(f"file: {path} does not exist and the steps do not include ingest")
    report = []
    upstream = _stored_digest(path, "ingest", comm) or ""
    for step in STEPS:
        if step not in cfg["steps"]:
            continue
        if cfg[step].get("enable", True) is False:
            report.append((step, "disabled", 0.0))
            continue
        key = _step_key(step, cfg, upstream, comm)
        stored = _stored_digest(path, step, comm)
        if stored == key and _outputs_complete(path, step, cfg, comm):
            _LOG.info("step %s: complete and current, skipped", step)
            report.append((step, "skipped", 0.0))
            upstream = key
            continue
        _LOG.info("step %s: running%s", step, "" if stored is None else " (its options or inputs changed)")
        t0 = time.perf_counter()
        _run_step(step, cfg, comm, changed=stored is not None and stored != key)
        seconds = time.perf_counter() - t0
        key = _step_key(step, cfg, upstream, comm)        # what it read, as it left it (build may add /R_T)
        _record(path, step, key, seconds, comm)
        report.append((step, "ran", seconds))
        upstream = key
    return report


def _run_step(step: str, cfg: dict, comm, *, changed: bool = False) -> None:
    """Run one step; ``changed``: it completed before, on other options or inputs.  Collective."""
    path = cfg["file"]
    opts = cfg[step]
    if step == "ingest":
        from ..stages.ingest import IngestOptions, run_ingest

        run_ingest(path, IngestOptions.from_config(opts), comm=comm, replace=True)   # its inputs changed
    elif step == "build":
        from ..io.manager import H5Manager
        from ..stages.build import build_hypercube

        H5Manager(path, comm=comm).ensure_rebin_and_resample(opts["rebin_mode"])
        compression = None if opts["compression"] == "none" else opts["compression"]
        build_hypercube(path, norm_mode=opts["norm_mode"], amp_mode=opts["amp_mode"],
                        S_chunk=opts["s_chunk"] or None, C_chunk=opts["c_chunk"] or None,
                        P_chunk=opts["p_chunk"] or None, compression=compression, comm=comm,
                        force=not opts["resume"] or changed)     # a finished build on other inputs: rebuild
    elif step == "weights":
        from ..stages.weights import ensure_lambda_weights

        ensure_lambda_weights(path, small=opts["small"], large=opts["large"], min_w=opts["min_w"], comm=comm,
                              force=changed)
    elif step == "solve":
        from .runner import PipelineRunner

        common = dict(orbit_weights=opts["orbit_weights"], orbit_strength=opts["orbit_strength"],
                      orbit_mode=opts["orbit_mode"], orbit_totals=opts["orbit_totals"],
                      use_weights=opts["use_weights"], add_degree=opts["add_degree"], mult_degree=opts["mult_degree"])
        runner = PipelineRunner(path, comm=comm)
        if opts["method"] == "exact":
            runner.solve("exact", ridge=opts["ridge"], regul=opts["regul"], regul_order=opts["regul_order"],
                         **common)
        else:
            runner.solve("kaczmarz", epochs=opts["epochs"], lr=opts["lr"], warm_start=opts["warm_start"], **common)
    elif step == "recon":
        from ..stages.recon import reconstruct

        reconstruct(path, out=opts["dataset"], comm=comm)
    elif step == "plots":
        from ..stages.plots import make_plots

        make_plots(path, opts["outdir"], n_spaxels=opts["n"], recon=cfg["recon"]["dataset"], comm=comm)
