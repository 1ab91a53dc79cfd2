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
    for r in data["rows"]:
        for name in ("fused", "fused_rng", "randn+fused", "eager", "distributions", "copy floor"):
            assert r["seconds"][name] > 0
    assert data["memory"]["fused"] > 0
    # The fused step allocates only what it must (outputs, upstream and input gradients).
    assert data["memory"]["fused"] <= 1.2 * data["memory"]["necessary_bytes"]
    assert (tmp_path / "bench_ops.png").stat().st_size > 0


def test_halfvae_bench_help():
    assert main(["bench", "--help"]) == 0
