"""Sub-commands ``ingest`` and ``init-config``.

``register(sub)`` adds both to the ``add_subparsers`` object of :func:`cubefit_mpi.cli.main.build_parser`
and sets ``handler`` (``fn(args, comm) -> int``); :data:`HANDLERS` maps command names to the
same functions.
"""
from __future__ import annotations

from ..config.errors import InputError


def register(sub) -> None:
    """Add the ``ingest`` and ``init-config`` sub-parsers to ``sub``.  Local."""
    p = sub.add_parser("ingest", help="FITS cube + template library + LOSVDs -> a new cube file "
                       "(log-rebinned, binned, masked, validated)")
    p.add_argument("file", help="output HDF5 file (written as FILE.partial, renamed when valid)")
    p.add_argument("--config", metavar="YAML", help="take options from the ingest section of this "
                   "config file (flags given here win)")
    p.add_argument("--cube", help="MUSE-like FITS cube: DATA (+ STAT) extensions, NAXIS3 = wavelength")
    p.add_argument("--bins", help="bin map (.npy or FITS image, shape NAXIS2 x NAXIS1, -1 = unused)")
    p.add_argument("--templates", help="pPXF-style .npz or a directory of 1-D FITS spectra")
    p.add_argument("--losvd", help=".npz or .h5 with losvd (n_bins, V, C) and vel (V,) km/s")
    p.add_argument("--mask-ranges", metavar="LO:HI,...", help="observed-frame ranges to mask, Å")
    p.add_argument("--velscale", type=float, metavar="KMS", help="km/s per observed pixel "
                   "(default: keep the pixel count; a cube already uniform in ln λ is kept)")
    p.add_argument("--oversample", type=int, metavar="N", help="template pixels per observed pixel (default 2)")
    p.add_argument("--bin-combine", choices=("sum", "mean"), help="combine the spaxels of a bin (default sum)")
    p.add_argument("--flux-density", choices=("angstrom", "lnlambda"),
                   help="spectra per Å (default) or per unit ln λ")
    p.add_argument("--rows-per-read", type=int, metavar="N", help="cube rows per slice (default: 256 MiB budget)")
    p.add_argument("--data-fwhm", type=_number_or_path, metavar="A|FILE",
                   help="the data's resolution: FWHM in Å, or a two-column text file (λ, FWHM in Å); "
                   "the templates are broadened to it (default: no matching)")
    p.add_argument("--template-fwhm", type=_number_or_path, metavar="A|FILE",
                   help="the templates' resolution, FWHM in Å or a file as for --data-fwhm (MILES: 2.51)")
    p.add_argument("--force", action="store_true", help="replace an existing FILE even when it holds a hypercube "
                   "or a solution")
    p.set_defaults(handler=cmd_ingest)

    p = sub.add_parser("init-config", help="print a commented pipeline configuration (YAML) with every option")
    p.add_argument("-o", "--output", metavar="YAML", help="write to this file instead of stdout")
    p.set_defaults(handler=cmd_init_config)


def _number_or_path(text: str):
    """``--data-fwhm`` / ``--template-fwhm``: a number (float) or a file name (kept as given)."""
    try:
        return float(text)
    except ValueError:
        return text


def ingest_options(args):
    """:class:`~cubefit_mpi.stages.ingest.IngestOptions` from parsed arguments (and ``--config``).  Local."""
    from ..config.options import parse_ranges
    from ..pipeline.config import SCHEMA, load_config
    from ..stages.ingest import IngestOptions

    if args.config:
        section = dict(load_config(args.config)["ingest"])
    else:
        section = {key: opt.default for key, opt in SCHEMA["ingest"].items()}
    for key in ("cube", "bins", "templates", "losvd", "velscale", "oversample", "bin_combine",
                "flux_density", "rows_per_read", "data_fwhm", "template_fwhm"):
        value = getattr(args, key)
        if value is not None:
            section[key] = value
    if args.mask_ranges is not None:
        section["mask_ranges"] = parse_ranges(args.mask_ranges, "--mask-ranges")
    for key in ("cube", "templates", "losvd"):
        if not section.get(key):
            raise InputError(f"--{key}: required (or ingest.{key} in --config)")
    if section["oversample"] < 1:
        raise InputError(f"--oversample {section['oversample']}: expected an integer >= 1")
    if section["rows_per_read"] < 0:
        raise InputError(f"--rows-per-read {section['rows_per_read']}: expected an integer >= 0")
    return IngestOptions.from_config(section)


def cmd_ingest(args, comm) -> int:
    """Handler of ``ingest``.  Collective over comm."""
    from ..stages.ingest import run_ingest

    opts = ingest_options(args)
    out = run_ingest(args.file, opts, comm, replace=args.force)
    if comm.Get_rank() == 0:
        d = out["dims"]
        print(f"wrote {args.file}: S={d.S} L={d.L} T={d.T} V={d.V} C={d.C} P={d.P} "
              f"({out['dropped']} spaxels dropped, {sum(out['mask_counts'].values())} pixels masked) "
              f"in {out['seconds']:.1f}s on {comm.Get_size()} rank(s)")
    return 0


def cmd_init_config(args, comm) -> int:
    """Handler of ``init-config``: rank 0 prints (or writes) the commented YAML.  Local."""
    from ..pipeline.config import init_config_text

    if comm is not None and comm.Get_rank() != 0:
        return 0
    text = init_config_text()
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as fh:
                fh.write(text)
        except OSError as exc:
            raise InputError(f"--output {args.output}: cannot write ({exc.strerror})") from None
    else:
        print(text, end="")
    return 0


HANDLERS = {"ingest": cmd_ingest, "init-config": cmd_init_config}
