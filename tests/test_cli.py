"""The halfvae command line: separate (CSV / .npy in and out, plot, errors) and demo."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from halfvae_ext.cli import main, read_signals
from halfvae_ext.ica import make_linear, mean_corr_coef

FAST = ["--max-iter", "400", "--restarts", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def problem():
    return make_linear(600, 3, "laplace", random_state=1)


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    rc = main(argv, stdout=out, stderr=err)
    return rc, out.getvalue(), err.getvalue()


def assert_clean_error(rc, err, *fragments):
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


# ----------------------------------------------------------------------------- separate
def test_separate_csv_with_header(problem, tmp_path):
    src = tmp_path / "mix.csv"
    np.savetxt(src, problem.X, delimiter=",", header="a,b,c", comments="")
    out = tmp_path / "sources.csv"
    png = tmp_path / "plot.png"
    rc, stdout, err = run(["separate", str(src), "-k", "3", "-o", str(out), "--plot", str(png),
                           *FAST])
    assert rc == 0, err
    assert "3 source(s)" in stdout
    lines = out.read_text().splitlines()
    assert lines[0] == "source_1,source_2,source_3"
    S = np.loadtxt(out, delimiter=",", skiprows=1)
    assert S.shape == (600, 3)
    np.testing.assert_allclose(S.mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(S.std(0), 1, atol=1e-6)
    assert mean_corr_coef(problem.S, S) > 0.97
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mix.csv", "plot.png", "sources.csv"]


def test_separate_npy_same_format_and_fewer_sources(problem, tmp_path):
    src = tmp_path / "mix.npy"
    np.save(src, problem.X)
    out = tmp_path / "sources.out"  # unknown extension: the input's format (.npy)
    rc, _, err = run(["separate", str(src), "-k", "2", "-o", str(out), *FAST])
    assert rc == 0, err
    S = np.load(out)
    assert S.shape == (600, 2)


def test_separate_mini_batches_with_fused_table(problem, tmp_path):
    src = tmp_path / "mix.npy"
    np.save(src, problem.X)
    out = tmp_path / "s.npy"
    rc, _, err = run(["separate", str(src), "-k", "3", "-o", str(out), "--batch-size", "200",
                      *FAST])
    assert rc == 0, err
    assert mean_corr_coef(problem.S, np.load(out)) > 0.97
    rc, _, err = run(["separate", str(src), "-k", "3", "-o", str(out), "--batch-size", "0"])
    assert rc != 0 and "--batch-size" in err


def test_separate_whitespace_text_without_header(problem, tmp_path):
    src = tmp_path / "mix.txt"
    np.savetxt(src, problem.X[:200], fmt="%.10f")
    out = tmp_path / "s.txt"
    rc, _, err = run(["separate", str(src), "-k", "3", "-o", str(out), "--max-iter", "20",
                      "--restarts", "1"])
    assert rc == 0, err
    S = np.loadtxt(out)
    assert S.shape == (200, 3)
    X, info = read_signals(src)
    assert info == {"format": "text", "delimiter": None, "header": None}
    np.testing.assert_allclose(X, problem.X[:200], atol=1e-9)


def test_separate_is_reproducible(problem, tmp_path):
    src = tmp_path / "mix.npy"
    np.save(src, problem.X[:200])
    outs = []
    for i in range(2):
        out = tmp_path / f"s{i}.npy"
        assert run(["separate", str(src), "-k", "3", "-o", str(out), "--max-iter", "30",
                    "--restarts", "2", "--seed", "5"])[0] == 0
        outs.append(np.load(out))
    np.testing.assert_array_equal(*outs)


@pytest.mark.parametrize("content, fragments", [
    ("1,2\n3,abc\n5,6\n", ["mix.csv:2", "column 2", "'abc' is not a number"]),
    ("1,2\n3,nan\n5,6\n", ["mix.csv:2", "NaN or infinite"]),
    ("1,2\n3,4,5\n", ["mix.csv:2", "3 values, expected 2"]),
    ("", ["no data rows"]),
    ("x,y\n", ["only a header"]),
    ("1,2\n3,\n", ["'(empty)' is not a number"]),
])
def test_separate_bad_text_files(tmp_path, content, fragments):
    src = tmp_path / "mix.csv"
    src.write_text(content)
    rc, _, err = run(["separate", str(src), "-k", "1", "-o", str(tmp_path / "o.csv")])
    assert_clean_error(rc, err, *fragments)
    assert not (tmp_path / "o.csv").exists()


def test_separate_bad_npy_and_paths(tmp_path, problem):
    one_d = tmp_path / "v.npy"
    np.save(one_d, np.arange(10.0))
    assert_clean_error(*run(["separate", str(one_d), "-k", "1", "-o", "o.npy"])[::2], "2-D")
    nan = tmp_path / "nan.npy"
    X = problem.X.copy()
    X[3, 1] = np.nan
    np.save(nan, X)
    assert_clean_error(*run(["separate", str(nan), "-k", "1", "-o", "o.npy"])[::2],
                       "row 3, column 1")
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert_clean_error(*run(["separate", str(obj), "-k", "1", "-o", "o.npy"])[::2], "cannot read")
    garbage = tmp_path / "g.npy"
    garbage.write_bytes(b"not numpy")
    assert_clean_error(*run(["separate", str(garbage), "-k", "1", "-o", "o.npy"])[::2],
                       "cannot read")
    binary = tmp_path / "b.csv"
    binary.write_bytes(b"\xff\xfe\x00\x81\x00")
    assert_clean_error(*run(["separate", str(binary), "-k", "1", "-o", "o.npy"])[::2],
                       "not a text file")
    assert_clean_error(*run(["separate", str(tmp_path / "missing.csv"), "-k", "1", "-o",
                             "o.csv"])[::2], "no such file")
    assert_clean_error(*run(["separate", str(tmp_path), "-k", "1", "-o", "o.csv"])[::2],
                       "directory")
    good = tmp_path / "good.npy"
    np.save(good, problem.X)
    assert_clean_error(*run(["separate", str(good), "-k", "4", "-o", "o.npy"])[::2],
                       "-k 4", "only 3 signal")
    assert_clean_error(*run(["separate", str(good), "-k", "2", "-o",
                             str(tmp_path / "nodir" / "o.npy")])[::2], "does not exist")
    rank1 = tmp_path / "rank1.npy"
    np.save(rank1, np.outer(np.arange(50.0), [1.0, 2.0]))
    assert_clean_error(*run(["separate", str(rank1), "-k", "2", "-o", "o.npy"])[::2],
                       "exceeds the rank")


@pytest.mark.parametrize("argv, fragment", [
    (["separate", "f.csv", "-k", "0", "-o", "o.csv"], "positive integer"),
    (["separate", "f.csv", "-k", "two", "-o", "o.csv"], "positive integer"),
    (["separate", "f.csv", "-o", "o.csv"], "-k"),
    (["separate", "f.csv", "-k", "2", "-o", "o.csv", "--decoder", "cnn"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
    ([], "a command is needed"),
    (["demo", "--methods", "magic"], "unknown method"),
    (["demo", "--problems", "linear", "--methods", "halfvae_u"], "applies to none"),
    (["demo", "--problem", "speech"], "unknown problem"),
    (["demo", "--seeds", "-1"], "positive integer"),
])
def test_usage_errors(argv, fragment):
    rc, _, err = run(argv)
    assert_clean_error(rc, err, fragment)


def test_integer_options_take_their_lowest_value_and_refuse_below_it():
    from halfvae_ext.cli import build_parser
    args = build_parser().parse_args(["separate", "f.csv", "-k", "1", "-o", "o.csv", "--seed", "0"])
    assert (args.k, args.seed) == (1, 0)
    assert build_parser().parse_args(["demo", "--first-seed", "0"]).first_seed == 0
    for argv, fragment in (
            (["separate", "f.csv", "-k", "2", "-o", "o.csv", "--seed", "-1"],
             "expected a non-negative integer, got '-1'"),
            (["demo", "--first-seed", "1.5"], "expected a non-negative integer, got '1.5'"),
            (["demo", "--seeds", "0"], "expected a positive integer, got '0'")):
        rc, _, err = run(argv)
        assert rc == 2
        assert_clean_error(rc, err, fragment)


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "separate" in capsys.readouterr().out


# ----------------------------------------------------------------------------- demo
def test_demo_small(tmp_path):
    out_dir = tmp_path / "demo"
    rc, stdout, err = run(["demo", "--out", str(out_dir), "--quick", "--seeds", "2",
                           "--samples", "300", "--methods", "fastica,halfvae_plain",
                           "--problems", "linear", "--jobs", "1"])
    assert rc == 0, err
    assert "linear: the paper's problem" in stdout and "2 seed(s), 300 rows" in stdout
    assert "sawtooth" in stdout
    res = json.loads((out_dir / "results.json").read_text())
    assert res["config"]["seeds"] == [0, 1]
    r = res["results"]["linear"]["fastica"]
    assert np.asarray(r["rmse"]).shape == (2, 3) and len(r["mcc"]) == 2
    assert res["summary"]["linear"]["fastica"]["mcc_mean"] > 0.95
    assert (out_dir / "sources_linear.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(os.listdir(out_dir)) == ["results.json", "sources_linear.png"]


def test_demo_nonstationary_and_images(tmp_path):
    """The two problems with their own data paths: segment labels for halfvae_u and ivae, image
    sources (a figure of images); small and quick, so the thresholds are loose but real."""
    out_dir = tmp_path / "demo"
    rc, stdout, err = run(["demo", "--out", str(out_dir), "--quick", "--seeds", "1",
                           "--samples", "2000", "--problem", "nonstationary,images",
                           "--jobs", "1"])
    assert rc == 0, err
    res = json.loads((out_dir / "results.json").read_text())
    assert res["config"]["methods"] == {"nonstationary": ["halfvae_u", "ivae", "fastica"],
                                        "images": ["halfvae", "fastica", "picard", "amica"]}
    assert res["config"]["n_samples"] == {"nonstationary": 2000, "images": 1944}
    ns = res["results"]["nonstationary"]
    assert np.asarray(ns["halfvae_u"]["rmse"]).shape == (1, 5)
    assert all(0.0 < r["mcc"][0] <= 1.0 for r in ns.values())
    im = res["results"]["images"]
    # the photographs are not independent, but every method unmixes most of them
    assert all(r["mcc"][0] > 0.9 for r in im.values()), {m: r["mcc"] for m, r in im.items()}
    assert "china" in stdout and "MCC [median, worst]" in stdout
    assert sorted(os.listdir(out_dir)) == ["results.json", "sources_images.png",
                                           "sources_nonstationary.png"]
    for f in ("sources_images.png", "sources_nonstationary.png"):
        assert (out_dir / f).read_bytes()[:4] == b"\x89PNG"


def test_demo_results_do_not_depend_on_worker_processes():
    from halfvae_ext.ica.demo import run_experiments
    kw = dict(seeds=[0, 1], problems=["linear", "nonlinear"], methods=["halfvae_plain"],
              n_samples=200, quick=True)
    one = run_experiments(n_jobs=1, **kw)
    two = run_experiments(n_jobs=2, **kw)
    for p in ("linear", "nonlinear"):
        a, b = one["results"][p]["halfvae_plain"], two["results"][p]["halfvae_plain"]
        assert a["rmse"] == b["rmse"] and a["mcc"] == b["mcc"]


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "halfvae_ext.cli", "separate", "nofile.csv",
                           "-k", "2", "-o", "x.csv"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "halfvae separate: error: cannot read nofile.csv: no such file"


# ----------------------------------------------------------------------------- outputs first
@pytest.mark.parametrize("where", ["output_is_directory", "plot_missing_dir", "plot_is_directory",
                                   "plot_read_only", "output_read_only"])
def test_separate_checks_outputs_before_training(problem, tmp_path, monkeypatch, where):
    from halfvae_ext.ica.estimator import HalfVAEICA

    def no_fit(*a, **k):
        raise AssertionError("trained before checking the outputs")

    monkeypatch.setattr(HalfVAEICA, "fit", no_fit)
    src = tmp_path / "mix.npy"
    np.save(src, problem.X)
    out, png = tmp_path / "s.npy", tmp_path / "p.png"
    ro = tmp_path / "ro"
    ro.write_bytes(b"old")
    os.chmod(ro, 0o444)
    out, png = {"output_is_directory": (tmp_path, png),
                "plot_missing_dir": (out, tmp_path / "nodir" / "p.png"),
                "plot_is_directory": (out, tmp_path),
                "plot_read_only": (out, ro),
                "output_read_only": (ro, png)}[where]
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, stdout, err = run(["separate", str(src), "-k", "3", "-o", str(out), "--plot", str(png),
                           *FAST])
    assert rc == 2
    # The option named right after "error:" (the temporary paths contain "-o" themselves).
    assert_clean_error(rc, err, "error: --plot " if where.startswith("plot") else "error: -o ")
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert ro.read_bytes() == b"old"


# ----------------------------------------------------------------------------- input kept
@pytest.mark.parametrize("where", ["output_same_path", "output_other_spelling",
                                   "output_symlink_to_input", "output_hard_link_to_input",
                                   "plot_is_input", "output_is_input_sharded"])
def test_separate_refuses_to_write_over_its_input(problem, tmp_path, monkeypatch, where):
    from halfvae_ext import fit_sharded
    from halfvae_ext.ica.estimator import HalfVAEICA

    def no_fit(*a, **k):
        raise AssertionError("trained although an output is the input")

    monkeypatch.setattr(HalfVAEICA, "fit", no_fit)
    monkeypatch.setattr(fit_sharded, "fit", no_fit)
    data = tmp_path / "data"
    data.mkdir()
    src = data / ("mix.npy" if where.endswith("sharded") else "mix.csv")
    if src.suffix == ".npy":
        np.save(src, problem.X)
    else:
        np.savetxt(src, problem.X, delimiter=",")
    link = tmp_path / "link.csv"
    if where == "output_symlink_to_input":
        link.symlink_to(src)
    elif where == "output_hard_link_to_input":
        os.link(src, link)
    out, option, extra = {
        "output_same_path": (src, "-o", []),
        "output_other_spelling": (tmp_path / "data" / ".." / "data" / "mix.csv", "-o", []),
        "output_symlink_to_input": (link, "-o", []),
        "output_hard_link_to_input": (link, "-o", []),
        "plot_is_input": (tmp_path / "s.csv", "--plot", ["--plot", str(src)]),
        "output_is_input_sharded": (src, "-o", ["--sharded", "--batch-size", "64"]),
    }[where]
    before = src.read_bytes()
    listing = sorted(str(p) for p in tmp_path.rglob("*"))
    rc, stdout, err = run(["separate", str(src), "-k", "3", "-o", str(out), *extra, *FAST])
    assert rc == 2
    assert_clean_error(rc, err, f"error: {option} ", "the same file as the input")
    assert src.read_bytes() == before
    assert sorted(str(p) for p in tmp_path.rglob("*")) == listing  # nothing written
    assert stdout == ""


def test_separate_refuses_a_plot_that_is_the_output_through_a_symlink(problem, tmp_path,
                                                                      monkeypatch):
    from halfvae_ext.ica.estimator import HalfVAEICA

    def no_fit(*a, **k):
        raise AssertionError("trained although the plot would replace -o")

    monkeypatch.setattr(HalfVAEICA, "fit", no_fit)
    src = tmp_path / "mix.npy"
    np.save(src, problem.X)
    out = tmp_path / "s.npy"
    png = tmp_path / "p.png"
    png.symlink_to(out)  # dangling until -o is written
    rc, _, err = run(["separate", str(src), "-k", "3", "-o", str(out), "--plot", str(png), *FAST])
    assert rc == 2
    assert_clean_error(rc, err, "error: --plot ", "the same file as -o")
    assert not out.exists()


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   FileExistsError("CKPT holds a checkpoint")])
def test_sharded_separate_reports_an_os_error_in_one_line(problem, tmp_path, monkeypatch, error):
    from halfvae_ext import fit_sharded

    def failing_fit(*a, **k):
        raise error

    monkeypatch.setattr(fit_sharded, "fit", failing_fit)
    src = tmp_path / "mix.npy"
    np.save(src, problem.X)
    rc, stdout, err = run(["separate", str(src), "-k", "3", "-o", str(tmp_path / "s.npy"),
                           "--sharded", "--batch-size", "64", *FAST])
    assert rc == 1
    assert_clean_error(rc, err, str(error))
    assert "Traceback" not in err
