"""The benchmark suite runs end to end (tiny sizes) and writes its table, JSON and plot."""
import json

from halfvae_ext.cli import main


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
    import json
    from halfvae_ext import bench_tables
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
    from halfvae_ext import bench_tables
    monkeypatch.setattr(bench_tables, "ISOLATE_BYTES", 0)  # force the subprocess path
    a, b = bench_tables.measure_isolated([("fused", 2000), ("embedding", 500)], 32, 3, 0)
    assert (a["method"], a["N"], b["method"], b["N"]) == ("fused", 2000, "embedding", 500)
    assert a["step_seconds"] > 0 and b["step_seconds"] > 0
