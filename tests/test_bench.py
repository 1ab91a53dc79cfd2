"""The benchmark suites (benchmarks/, run from the repository root) end to end at tiny sizes:
their tables, JSON and plots; and `halfvae bench`, which runs the op suite from a source checkout
and says where the suites are elsewhere."""
import io
import json
import os
import pathlib
import subprocess
import sys

import pytest

import halfvae_ext
from halfvae_ext.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_halfvae_bench_runs_and_writes_results(tmp_path, capsys):
    rc = main(["bench", "--sizes", "10,12", "--components", "1", "--budget", "0.01",
               "--no-compile", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "ratios" in out and "peak memory" in out
    data = json.loads((tmp_path / "bench_ops.json").read_text())
    assert {r["log2_NK"] for r in data["rows"]} == {10, 12}
    assert {r["variant"] for r in data["rows"]} == {"mc", "prior_index", "bound"}
    for r in data["rows"]:
        names = ["fused", "fused_rng", "randn+fused", "eager", "copy floor"]
        if r["variant"] == "mc":  # torch.distributions has no conditional prior nor KL bound
            names.append("distributions")
        for name in names:
            assert r["seconds"][name] > 0
    assert "fused prior_index/mc" in out and "fused bound/mc" in out
    assert data["memory"]["fused"] > 0
    # The fused step allocates only what it must (outputs, upstream and input gradients).
    assert data["memory"]["fused"] <= 1.2 * data["memory"]["necessary_bytes"]
    assert (tmp_path / "bench_ops.png").stat().st_size > 0


def test_halfvae_bench_help():
    assert main(["bench", "--help"]) == 0


def test_bench_tables_runs_all_methods_and_writes_results(tmp_path):
    from benchmarks import bench_tables
    rows = bench_tables.main(["--rows", "1000,3000", "--steps", "2", "--batch", "64",
                              "--out", str(tmp_path)])
    methods = ("fused", "rowwise_adam", "rowwise_adam_bf16", "rowwise_adagrad", "sparse",
               "embedding", "dense", "touch")
    assert {(r["N"], r["method"]) for r in rows} == {
        (N, m) for N in (1000, 3000) for m in methods}
    # bytes a row (K = 8, float32): table + two Adam moments; the compact records
    per_row = {"rowwise_adam": 192, "rowwise_adam_bf16": 128, "rowwise_adagrad": 128}
    for r in rows:
        assert r["step_seconds"] > 0
        assert r["method"] == "touch" or r["step_peak_bytes"] > 0
        assert r["state_bytes"] == r["N"] * per_row.get(r["method"], 3 * 2 * 8 * 4)
    saved = json.loads((tmp_path / "bench_tables.json").read_text())
    assert len(saved["rows"]) == 16 and saved["goals"] == []  # goal sizes not in --rows
    assert (tmp_path / "bench_tables.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_tables_alternating_pair_in_a_fresh_process(monkeypatch):
    from benchmarks import bench_tables
    monkeypatch.setattr(bench_tables, "ISOLATE_BYTES", 0)  # force the subprocess path
    a, b = bench_tables.measure_isolated([("fused", 2000), ("embedding", 500)], 32, 3, 0)
    assert (a["method"], a["N"], b["method"], b["N"]) == ("fused", 2000, "embedding", 500)
    assert a["step_seconds"] > 0 and b["step_seconds"] > 0


def test_halfvae_bench_runs_anywhere_with_an_editable_install(tmp_path):
    """Not only from the repository root: the editable install makes the checkout's benchmarks
    importable (the `halfvae` script does not put the working directory on sys.path)."""
    if pathlib.Path(halfvae_ext.__file__).resolve().parents[1] != ROOT:
        pytest.skip("halfvae_ext is not installed from this checkout (editable)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-m", "halfvae_ext.cli", "bench", "--help"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--quick" in proc.stdout and "--variants" in proc.stdout


def test_halfvae_bench_without_the_source_tree_says_where_it_is(tmp_path, monkeypatch):
    # An installed wheel: benchmarks.bench_ops cannot be imported.
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setitem(sys.modules, "benchmarks.bench_ops", None)
    out, err = io.StringIO(), io.StringIO()
    rc = main(["bench", "--quick", "--out", str(tmp_path / "b")], stdout=out, stderr=err)
    assert rc == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1, err.getvalue()
    for fragment in ("benchmarks/", "make bench", "python -m benchmarks.bench_ops --quick"):
        assert fragment in lines[0]
    assert not (tmp_path / "b").exists()


def test_halfvae_bench_reports_the_suites_own_errors():
    err = io.StringIO()
    assert main(["bench", "--variants", "nope"], stderr=err) == 2
    assert err.getvalue().strip() == ("bench_ops: --variants takes mc, prior_index, bound; "
                                      "got 'nope'")


def test_bench_training_times_the_fused_and_the_reference_op(tmp_path, monkeypatch):
    from benchmarks import bench_training
    from halfvae_ext import reference
    calls, real = [], reference.reparam_gmm_kl

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    monkeypatch.setattr(reference, "reparam_gmm_kl", counted)
    rows = bench_training.main(["--rows", "600", "--batch-size", "200", "--epochs", "1",
                                "--out", str(tmp_path)])
    # Two epochs (warm-up + 1) of 3 batches each on the reference; none on the fused run.
    assert len(calls) == 6
    assert rows[0]["N"] == 600
    assert rows[0]["fused_seconds"] > 0 and rows[0]["reference_seconds"] > 0
    assert json.loads((tmp_path / "bench_training.json").read_text())["rows"] == rows


def test_fit_cost_times_every_method_on_the_same_data_and_skips_past_max_cells(tmp_path,
                                                                               capsys):
    from benchmarks import fit_cost
    out, png = tmp_path / "fit_cost.json", tmp_path / "fit_cost.png"
    assert fit_cost.main(["--rows", "200", "400", "--sources", "3", "--methods", "fastica",
                          "picard", "--max-cells", "picard=1000", "--out", str(out),
                          "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    results = json.loads(out.read_text())["results"]
    assert [(r["rows"], r["method"]) for r in results] == [(200, "fastica"), (200, "picard"),
                                                            (400, "fastica")]
    assert all(r["mcc"] > 0.9 and r["seconds"] > 0 for r in results)
    assert "picard   skipped" in printed and "| 400 x 3 | " in printed
    assert png.stat().st_size > 0
    with pytest.raises(SystemExit, match="--max-cells"):
        fit_cost.main(["--max-cells", "nosuch=3"])


def test_eeg_fit_measures_each_method_in_its_own_process_and_stops_at_its_deadline(tmp_path):
    from benchmarks import eeg_fit
    out = tmp_path / "eeg_fit.json"
    assert eeg_fit.main(["--samples", "3000", "--channels", "4", "--methods", "picard",
                         "--out", str(out)]) == 0
    data, picard = json.loads(out.read_text())["results"]
    assert data["method"] == "data" and "seconds" not in data
    assert picard["status"] == "ok" and picard["mcc"] > 0.9 and picard["seconds"] > 0
    assert picard["max_rss_mb"] >= data["max_rss_mb"] > 10
    # Importing torch alone takes longer than this deadline: the child is stopped and reaped.
    assert eeg_fit.main(["--samples", "3000", "--channels", "4", "--methods", "halfvae",
                         "--timeout", "0.2", "--out", str(out)]) == 0
    stopped = json.loads(out.read_text())["results"][1]
    assert stopped["status"] == "stopped after 0.2 s" and "mcc" not in stopped


def test_underdetermined_benchmark_runs_every_method_on_the_same_data(tmp_path, capsys):
    from benchmarks import underdetermined
    out = tmp_path / "ud.json"
    assert underdetermined.main(["--sets", "3:2", "--activity", "0.1", "--seeds", "0",
                                 "--samples", "1500", "--max-iter", "20", "--out",
                                 str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["method"] for r in rows] == ["posterior mean, true", "lasso, true A",
                                           "clustering + lasso", "exact EM (Half-VAE's)"]
    assert all(r["snr"] > 8.0 for r in rows)  # each a working separation of 3 from 2
    assert "| 3 -> 2 | 0.1 |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--sets"):
        underdetermined.main(["--sets", "2:3"])


def test_bench_ops_times_only_the_chosen_implementations(tmp_path, capsys):
    from benchmarks.bench_ops import main as bench_ops
    result = bench_ops(["--impls", "fused", "--variants", "mc,prior_index", "--latents", "4",
                        "--sizes", "10", "--components", "3", "--budget", "0.01",
                        "--out", str(tmp_path)])
    assert {r["variant"] for r in result["rows"]} == {"mc", "prior_index"}
    for r in result["rows"]:
        assert set(r["seconds"]) == {"fused", "copy floor", "exp pass"}
    assert "fused prior_index/mc" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--impls"):
        bench_ops(["--impls", "eager", "--sizes", "10", "--out", str(tmp_path)])
