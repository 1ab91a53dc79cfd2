"""Command line: ``halfvae demo`` (the paper's experiment) and ``halfvae separate`` (your data).

    halfvae demo [--out DIR] [--seeds N] [--first-seed S] [--quick] [--jobs N]
    halfvae separate FILE -k K -o OUT [--plot PNG] [--decoder linear|residual|mlp] [--max-iter N]
                     [--restarts N] [--seed S] [--verbose]
    torchrun --nproc-per-node N -m halfvae_ext.cli separate FILE.npy -k K -o OUT.npy \
        --batch-size B [--max-iter STEPS]   (the latent table split across N processes)

Also ``python -m halfvae_ext.cli ...``. ``separate`` reads a CSV/text file (rows = samples, columns
= observed signals; comma, tab or whitespace separated; an optional header row; blank lines and
``#`` comments skipped) or a .npy array, and writes the K recovered sources (the trained posterior
means of the rows, ``HalfVAEICA.posterior_means_``, each standardized to zero mean and unit
variance; their order and signs are arbitrary, as in any ICA) in the format of OUT's extension
(.npy, .csv, .tsv, .txt), or the input's format if OUT has none of these. Errors are reported as
one line on stderr with a non-zero exit status: 2 for usage errors, including an OUT or PNG that
cannot be written (checked before any work), 1 for errors met while working.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys

import numpy as np

__all__ = ["main", "read_signals", "write_signals"]

_TEXT_EXTS = {".csv": ",", ".tsv": "\t", ".txt": None}


class CLIError(Exception):
    """An error reported to the user as one line, without a traceback."""


class UsageError(CLIError):
    """A mistake in the command line itself (exit status 2), found before any work is done."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise CLIError(f"{self.prog}: {message} (see --help)")


# ----------------------------------------------------------------------------- reading
def _sniff_delimiter(line: str):
    if "," in line:
        return ","
    if "\t" in line:
        return "\t"
    if ";" in line:
        return ";"
    return None  # whitespace


def _split(line: str, delim):
    if delim is None:
        return line.split()
    return [f.strip() for f in next(csv.reader([line], delimiter=delim))]


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


def read_signals(path):
    """Read [n_samples, n_signals] float64 from a .npy or text file.

    Returns ``(X, info)`` with info = {"format": "npy" | "text", "delimiter", "header"}.
    Raises CLIError with a one-line message (file, line and column) on any problem.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CLIError(f"cannot read {path}: no such file")
    if os.path.isdir(path):
        raise CLIError(f"cannot read {path}: it is a directory")
    if path.lower().endswith(".npy"):
        try:
            X = np.load(path, allow_pickle=False)
        except Exception as e:  # ValueError (pickled/object), OSError, corrupt header ...
            raise CLIError(f"cannot read {path} as a .npy array: {e}") from None
        if X.dtype.names is not None or not (np.issubdtype(X.dtype, np.number)
                                             or X.dtype == np.bool_):
            raise CLIError(f"{path}: expected a numeric array, got dtype {X.dtype}")
        if np.iscomplexobj(X):
            raise CLIError(f"{path}: complex values are not supported")
        if X.ndim == 1:
            raise CLIError(f"{path}: expected a 2-D array [samples, signals], got 1-D of length "
                           f"{X.shape[0]} (one signal cannot be separated)")
        if X.ndim != 2:
            raise CLIError(f"{path}: expected a 2-D array [samples, signals], got shape {X.shape}")
        X = X.astype(np.float64)
        bad = np.argwhere(~np.isfinite(X))
        if bad.size:
            r, c = bad[0]
            raise CLIError(f"{path}: row {r}, column {c}: NaN or infinite value "
                           f"({bad.shape[0]} in all); remove or fill them first")
        return X, {"format": "npy", "delimiter": None, "header": None}
    try:
        with open(path, "r", encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except UnicodeDecodeError:
        raise CLIError(f"cannot read {path}: not a text file (use .npy for binary arrays)") \
            from None
    except OSError as e:
        raise CLIError(f"cannot read {path}: {e.strerror or e}") from None
    lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines())
             if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise CLIError(f"{path}: no data rows")
    ext = os.path.splitext(path)[1].lower()
    delim = _TEXT_EXTS.get(ext) if ext in (".csv", ".tsv") else _sniff_delimiter(lines[0][1])
    header = None
    first = _split(lines[0][1], delim)
    if not all(_is_number(t) for t in first):
        header = first
        lines = lines[1:]
        if not lines:
            raise CLIError(f"{path}: only a header row, no data")
    width = len(header) if header is not None else len(first)
    rows = []
    for lineno, ln in lines:
        toks = _split(ln, delim)
        if len(toks) != width:
            raise CLIError(f"{path}:{lineno}: {len(toks)} values, expected {width} "
                           "(every row needs one value per signal)")
        vals = []
        for col, tok in enumerate(toks):
            try:
                v = float(tok)
            except ValueError:
                shown = tok if tok else "(empty)"
                raise CLIError(f"{path}:{lineno}: column {col + 1}: {shown!r} is not a number") \
                    from None
            if not math.isfinite(v):
                raise CLIError(f"{path}:{lineno}: column {col + 1}: {tok!r} (NaN or infinite "
                               "values are not allowed; remove or fill them first)")
            vals.append(v)
        rows.append(vals)
    X = np.asarray(rows, dtype=np.float64)
    return X, {"format": "text", "delimiter": delim, "header": header}


# ----------------------------------------------------------------------------- writing
def write_signals(S, path, like=None):
    """Write S [n, k] to ``path`` atomically, as .npy or delimited text (by extension; for other
    extensions, like the input described by ``like`` from :func:`read_signals`)."""
    from .atomic_io import atomic_write
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    like = like or {"format": "text", "delimiter": ",", "header": None}
    if ext == ".npy" or (ext not in _TEXT_EXTS and like["format"] == "npy"):
        atomic_write(path, lambda f: np.save(f, S), mode="wb")
        return
    if ext in (".csv", ".tsv"):
        delim = _TEXT_EXTS[ext]
    else:
        delim = like.get("delimiter") or (" " if ext == ".txt" or like["format"] == "text"
                                          else ",")
    buf = io.StringIO()
    if like.get("header") is not None:
        buf.write(delim.join(f"source_{j + 1}" for j in range(S.shape[1])) + "\n")
    np.savetxt(buf, S, delimiter=delim, fmt="%.9g")
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def _plot(X, S, path, window=2000):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .atomic_io import save_figure_atomic

    n = min(window, X.shape[0])
    fig, axes = plt.subplots(2, 1, figsize=(10, 5.5), sharex=True)
    for title, A, ax in (("observed mixtures", X, axes[0]), ("recovered sources", S, axes[1])):
        A = A[:n]
        A = (A - A.mean(0)) / np.maximum(A.std(0), 1e-12)
        for j in range(A.shape[1]):
            ax.plot(A[:, j] + 3.2 * (A.shape[1] - 1 - j), lw=0.8)
        ax.set_yticks([])
        ax.set_title(title + (f" (first {n} samples)" if n < X.shape[0] else ""), fontsize=10)
    axes[1].set_xlabel("sample")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=90)


# ----------------------------------------------------------------------------- commands
def _check_output(path, option):
    """Refuse an output path that cannot be written, before any work (a usage error)."""
    from .atomic_io import check_writable
    try:
        check_writable(path)
    except IsADirectoryError:
        raise UsageError(f"{option} {path}: is a directory (give a file name)") from None
    except FileNotFoundError:
        raise UsageError(f"{option} {path}: directory "
                         f"{os.path.dirname(os.path.abspath(path))} does not exist") from None
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot write there ({e.strerror or e})") from None


def _same_file(a, b) -> bool:
    """Whether paths a and b name one file: the same path once symlinks and ``..`` are resolved
    (whether or not it exists yet), or two links to one file."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist: realpath has said all there is
        return False


def _refuse_outputs_at_input(args):
    """An output that is the input file would replace the data being separated: a usage error,
    before anything is read or written (the sharded run included)."""
    for option, path in (("-o", args.output), ("--plot", args.plot)):
        if path and _same_file(path, args.file):
            raise UsageError(f"{option} {path}: the same file as the input {args.file} (it would "
                             "be overwritten)")


# The one-process recipe's start and schedules (halfvae_ext.ica.recipe), which the sharded fit
# takes as options: whitened PCA scores as the start, noise and posterior std 0.1, the prior's
# means and weights held for the first 30% of the steps, the rates decaying over the last 30%.
SHARDED_SEPARATE_RECIPE = dict(whiten="pca", init="pca", init_logvar=2.0 * math.log(0.1),
                               init_noise_std=0.1, prior_warmup=0.3, lr_decay=0.3)


def _cmd_separate_sharded(args, out, err):
    """separate on a latent table split across the processes of torchrun (or one process with
    --sharded): the data PCA-whitened, a Half-VAE fitted in mini-batches from the whitened scores
    (--max-iter steps of --batch-size rows, global; SHARDED_SEPARATE_RECIPE), the standardized
    posterior means written to a .npy by every rank for its own rows. No restarts, no plot: the
    data need not fit in one process (FILE is memory-mapped)."""
    from . import fit_sharded
    if not args.file.endswith(".npy"):
        raise UsageError(f"{args.file}: a sharded run reads a .npy file (memory-mapped)")
    if not args.output.endswith(".npy"):
        raise UsageError(f"-o {args.output}: a sharded run writes a .npy file")
    if args.batch_size is None:
        raise UsageError("--batch-size is required for a sharded run (rows per step, global)")
    if args.plot:
        raise UsageError("--plot: not available in a sharded run")
    _check_output(args.output, "-o")
    try:
        shape = np.load(args.file, mmap_mode="r").shape
    except (OSError, ValueError) as e:
        raise CLIError(f"{args.file}: cannot read it as a .npy file: {e}") from None
    if len(shape) != 2 or args.k > shape[1]:
        raise CLIError(f"-k {args.k}: {args.file} has shape {shape}; at most its number of "
                       "columns of sources can be separated")
    try:
        result = fit_sharded.fit(args.file, args.k, batch_size=args.batch_size,
                                 steps=args.max_iter, out=args.output, standardize_out=True,
                                 decoder=args.decoder, seed=args.seed, **SHARDED_SEPARATE_RECIPE)
    except (ValueError, OSError, fit_sharded.RankFailure) as e:
        raise CLIError(str(e)) from None
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"separated {shape[1]} signal(s) x {shape[0]} samples into {args.k} source(s) -> "
              f"{args.output} ({result['steps']} steps on {result['world']} process(es), "
              f"{result['seconds']:.1f} s)", file=out)
    return 0


def _cmd_separate(args, out, err):
    import warnings

    _refuse_outputs_at_input(args)
    if args.sharded or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _cmd_separate_sharded(args, out, err)

    from sklearn.exceptions import ConvergenceWarning

    from .ica.estimator import HalfVAEICA
    from .ica.preprocessing import centered_rank

    _check_output(args.output, "-o")
    if args.plot:
        _check_output(args.plot, "--plot")
        if _same_file(args.plot, args.output):
            raise UsageError(f"--plot {args.plot}: the same file as -o")
    X, info = read_signals(args.file)
    n, d = X.shape
    if args.k > d:
        raise CLIError(f"-k {args.k}: the file has only {d} signal column(s); at most {d} "
                       "sources can be separated from them")
    if n < 2:
        raise CLIError(f"{args.file}: at least 2 rows (samples) are needed, got {n}")
    rank = centered_rank(X)
    if args.k > rank:
        raise CLIError(f"-k {args.k} exceeds the rank of the centered data ({rank}): there are "
                       f"not that many independent directions in {args.file}")
    est = HalfVAEICA(args.k, decoder=args.decoder, max_iter=args.max_iter,
                     n_restarts=args.restarts, random_state=args.seed, verbose=args.verbose,
                     batch_size=args.batch_size,
                     table_optimizer="fused" if args.batch_size else "torch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        try:
            est.fit(X)
        except ValueError as e:
            raise CLIError(str(e)) from None
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            print(f"halfvae separate: warning: {w.message}", file=err)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    from .ica.demo import halfvae_sources
    S = halfvae_sources(est, X)  # the sources the demo reports
    S = (S - S.mean(0)) / np.maximum(S.std(0), np.finfo(np.float64).tiny)
    try:
        write_signals(S, args.output, like=info)
    except OSError as e:
        raise CLIError(f"cannot write {args.output}: {e.strerror or e}") from None
    print(f"separated {d} signal(s) x {n} samples into {args.k} source(s) -> {args.output} "
          f"(ELBO {est.elbo_:.4f} per sample, restart {est.best_restart_ + 1} of "
          f"{args.restarts})", file=out)
    if args.plot:
        try:
            _plot(X, S, args.plot)
        except OSError as e:
            raise CLIError(f"cannot write {args.plot}: {e.strerror or e}") from None
        print(f"plot -> {args.plot}", file=out)
    return 0


def _cmd_demo(args, out, err):
    from .ica.demo import PROBLEMS, plan_methods, run_demo

    problems = args.problems.split(",") if args.problems else list(PROBLEMS)
    for p in problems:
        if p not in PROBLEMS:
            raise CLIError(f"--problems: unknown problem {p!r}; choose from {', '.join(PROBLEMS)}")
    methods = args.methods.split(",") if args.methods else None
    try:
        plan_methods(problems, methods)
    except ValueError as e:
        raise CLIError(f"--methods: {e}") from None
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create {args.out}: {e.strerror or e}") from None
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    run_demo(args.out, seeds=seeds, quick=args.quick, n_samples=args.samples, methods=methods,
             problems=problems, n_jobs=args.jobs, first_seed=args.first_seed, stream=out)
    return 0


def _int_at_least(least, expected):
    """An argparse type: an integer >= least; `expected` says what is asked for in the error."""
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            v = None
        if v is None or v < least:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s!r}")
        return v
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "a non-negative integer")


def build_parser():
    p = _Parser(prog="halfvae", description="Half-VAE (encoder-free VAE) independent component "
                "analysis.")
    sub = p.add_subparsers(dest="command", metavar="{demo,separate,bench}", parser_class=_Parser)
    sub.add_parser("bench", add_help=False,
                   help="benchmark the fused op against eager PyTorch, torch.distributions and "
                   "torch.compile; from a source checkout (options: halfvae bench --help)")
    d = sub.add_parser("demo", help="Half-VAE vs a VAE, iVAE, FastICA, Picard and AMICA on the "
                       "paper's problems, linear mixes of assorted sources, two photographs and "
                       "nonstationary nonlinear ICA")
    d.add_argument("--out", default="halfvae_demo", metavar="DIR",
                   help="output directory for results.json and sources_<problem>.png "
                   "(default: %(default)s)")
    d.add_argument("--seeds", type=_positive_int, default=None, metavar="N",
                   help="number of seeds (default: 3, or 1 with --quick)")
    d.add_argument("--first-seed", type=_nonneg_int, default=0, metavar="S",
                   help="seeds S..S+N-1 (default: 0)")
    d.add_argument("--quick", action="store_true",
                   help="fewer epochs and restarts (about a tenth of the time)")
    d.add_argument("--samples", type=_positive_int, default=None, metavar="N",
                   help="rows per problem (default: 5000; nonstationary 40 x 1000; images "
                   "17,120 pixels)")
    d.add_argument("--methods", default=None,
                   help="comma-separated methods, each run on the problems it applies to "
                   "(default: each problem's own list; see halfvae_ext.experiments)")
    d.add_argument("--problems", "--problem", default=None,
                   help="comma-separated subset of linear, nonlinear, laplace, assorted, "
                   "assorted_noisy, images, nonstationary (default: all)")
    d.add_argument("--jobs", type=_positive_int, default=None, metavar="N",
                   help="worker processes (default: min(2, CPUs); results do not depend on it)")
    s = sub.add_parser("separate", help="separate the mixtures in a CSV/.npy file "
                       "(rows = samples, columns = observed signals)")
    s.add_argument("file", metavar="FILE")
    s.add_argument("-k", type=_positive_int, required=True, metavar="K",
                   help="number of sources to recover (at most the number of columns)")
    s.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output file: .npy, .csv, .tsv or .txt (other: the input's format)")
    s.add_argument("--plot", metavar="PNG", help="also write a plot of mixtures and sources")
    s.add_argument("--decoder", choices=("linear", "residual", "mlp"), default="linear",
                   help="linear mixing (default); residual (linear + MLP correction) or mlp for "
                   "nonlinear mixing")
    s.add_argument("--max-iter", type=_positive_int, default=1500, metavar="N",
                   help="training epochs per restart (default: %(default)s)")
    s.add_argument("--restarts", type=_positive_int, default=4, metavar="N",
                   help="restarts, the best ELBO is kept (default: %(default)s)")
    s.add_argument("--batch-size", type=_positive_int, default=None, metavar="B",
                   help="mini-batches of B rows, with the fused row-wise Adam for the latent "
                   "table (a step costs O(B) whatever the file's length); default: full batch")
    s.add_argument("--seed", type=_nonneg_int, default=0, help="random seed (default: 0)")
    s.add_argument("--sharded", action="store_true",
                   help="the latent table split across processes (implied under torchrun, "
                   "WORLD_SIZE > 1): .npy in and out, --max-iter steps of --batch-size rows")
    s.add_argument("--verbose", action="store_true", help="progress bar on stderr")
    return p


def _bench_suite():
    """benchmarks.bench_ops.main, or None where the suite cannot be imported: it is in the source
    tree, not in the wheel. An editable install puts the checkout's root on sys.path, as does
    ``python -m`` run there."""
    try:
        from benchmarks.bench_ops import main as bench_main
    except ModuleNotFoundError as e:
        if e.name not in ("benchmarks", "benchmarks.bench_ops"):
            raise  # the suite is there but misses a dependency: say which
        return None
    return bench_main


def main(argv=None, *, stdout=None, stderr=None) -> int:
    """Entry point; returns the exit status (0 success, 1 runtime error, 2 usage error)."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark suite parses its own options
        bench_main = _bench_suite()
        if bench_main is None:
            print("halfvae bench: error: the benchmarks live in the source tree's benchmarks/ "
                  "folder, not in the installed package; in a checkout run `make bench` or "
                  "`python -m benchmarks.bench_ops --quick`", file=err)
            return 2
        try:
            bench_main(argv[1:])
        except SystemExit as e:
            if isinstance(e.code, str):  # the suite's own one-line errors
                print(e.code, file=err)
                return 2
            return int(e.code or 0)
        return 0
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, or argparse's own exits
            return int(e.code or 0)
        if args.command is None:
            raise CLIError("halfvae: a command is needed: demo or separate (see --help)")
    except CLIError as e:
        print(f"error: {e}", file=err)
        return 2
    try:
        if args.command == "separate":
            return _cmd_separate(args, out, err)
        return _cmd_demo(args, out, err)
    except UsageError as e:
        print(f"halfvae {args.command}: error: {e}", file=err)
        return 2
    except CLIError as e:
        print(f"halfvae {args.command}: error: {e}", file=err)
        return 1
    except KeyboardInterrupt:
        print(f"halfvae {args.command}: interrupted", file=err)
        return 130


if __name__ == "__main__":
    status = main()
    if "halfvae_ext.fit_sharded" in sys.modules:  # a sharded run: see fit_sharded.exit_after
        sys.modules["halfvae_ext.fit_sharded"].exit_after(status)
    sys.exit(status)
