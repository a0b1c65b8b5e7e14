"""ingest under MPI: the same bytes as alone, errors on every rank, no file left behind.

Run: ``mpiexec -n 2|3 python -m mpi4py -m pytest --with-mpi tests/mpi/test_ingest_mpi.py``.
"""
import os

import h5py
import numpy as np
import pytest
from ingest_fixtures import write_muse_like_inputs
from mpi4py import MPI
from mpi_helpers import assert_all

from cubefit_mpi.config.errors import InputError
from cubefit_mpi.stages.ingest import IngestOptions, run_ingest

pytestmark = pytest.mark.mpi
comm = MPI.COMM_WORLD


def _contents(path):
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj.dtype.str, obj.shape, obj[...].tobytes())
            out["attrs:" + name] = {k: np.asarray(v).tobytes() for k, v in obj.attrs.items()}
        f.visititems(visit)
        out["attrs:/"] = {k: np.asarray(v).tobytes() for k, v in f.attrs.items()}
    return out


def _inputs(path, **kw):
    fx = None
    if comm.rank == 0:
        path.mkdir(exist_ok=True)
        fx = write_muse_like_inputs(path, **kw)
        fx = {k: fx[k] for k in ("cube", "templates", "losvd", "bins", "velscale")}
    return comm.bcast(fx, root=0)


@pytest.mark.parametrize("binning, resolution", [(None, None), ("sum", None), ("mean", None), (None, (3.0, 1.0))])
def test_same_bytes_as_one_rank(mpi_tmp_path, binning, resolution):
    fx = _inputs(mpi_tmp_path / f"in_{binning}", binning=binning)
    data_fwhm, template_fwhm = resolution or (None, None)
    opts = IngestOptions(cube=fx["cube"], templates=fx["templates"], losvd=fx["losvd"], bins=fx["bins"],
                         velscale=fx["velscale"], bin_combine=binning or "sum", mask_ranges=((4900.0, 4905.0),),
                         rows_per_read=1,          # 6 slices: bins cross slice and rank boundaries
                         data_fwhm=data_fwhm, template_fwhm=template_fwhm)
    tag = f"{binning}_{resolution is not None}"
    out = run_ingest(mpi_tmp_path / f"par_{tag}.h5", opts, comm)
    problems = [] if out["dims"].S == (27 if binning is None else 9) else [f"S = {out['dims'].S}"]
    if comm.rank == 0:
        run_ingest(mpi_tmp_path / f"ser_{tag}.h5", opts, MPI.COMM_SELF)
        par, ser = _contents(mpi_tmp_path / f"par_{tag}.h5"), _contents(mpi_tmp_path / f"ser_{tag}.h5")
        if not (par.keys() == ser.keys() and "DataCube" in par and "DataVar" in par):
            problems.append(f"datasets differ: {sorted(par.keys() ^ ser.keys())}")
        if par["attrs:Templates"]["resolution.matched"] != np.asarray(resolution is not None).tobytes():
            problems.append("resolution.matched")
        problems += [f"{name} differs from 1 rank" for name in ser if par.get(name) != ser[name]]
        # the slice size changes the I/O pattern, not the numbers
        run_ingest(mpi_tmp_path / f"big_{tag}.h5", IngestOptions(**{**opts.__dict__, "rows_per_read": 0}),
                   MPI.COMM_SELF)
        big = _contents(mpi_tmp_path / f"big_{tag}.h5")
        problems += [f"{name} depends on rows_per_read" for name in ("DataCube", "DataVar", "Mask", "LOSVD",
                                                                     "Templates") if big[name] != ser[name]]
    assert_all(not problems, "; ".join(problems))


def test_bad_losvd_count_raises_everywhere_and_leaves_nothing(mpi_tmp_path):
    fx = _inputs(mpi_tmp_path / "bad")
    if comm.rank == 0:
        with np.load(fx["losvd"]) as z:
            np.savez(mpi_tmp_path / "bad" / "short.npz", losvd=z["losvd"][:5], vel=z["vel"])
    comm.Barrier()
    opts = IngestOptions(cube=fx["cube"], templates=fx["templates"], losvd=str(mpi_tmp_path / "bad" / "short.npz"),
                         velscale=fx["velscale"])
    out = mpi_tmp_path / "bad.h5"
    with pytest.raises(InputError, match="holds LOSVDs for 5 bins, but the cube gives 27 spectra"):
        run_ingest(out, opts, comm)
    comm.Barrier()
    assert not out.exists() and not os.path.exists(str(out) + ".partial")


def test_error_after_writing_started_removes_partial(mpi_tmp_path):
    fx = _inputs(mpi_tmp_path / "mask")
    opts = IngestOptions(cube=fx["cube"], templates=fx["templates"], losvd=fx["losvd"], velscale=fx["velscale"],
                         mask_ranges=((4000.0, 6000.0),), rows_per_read=1)
    out = mpi_tmp_path / "masked.h5"
    with pytest.raises(InputError, match="every pixel is masked"):
        run_ingest(out, opts, comm)
    comm.Barrier()
    assert not out.exists() and not os.path.exists(str(out) + ".partial")
