"""What of scripts/gpu_check.sh can run without a GPU: its syntax, its sanitizer workload (every
op, forward and backward) and its table benchmark, on the CPU with tiny sizes."""
import importlib.util
import json
import pathlib
import subprocess

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_script_parses_and_refuses_an_unknown_mode(tmp_path):
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")], check=True)
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "neither"],
                       capture_output=True, text=True,
                       env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "usage" in r.stderr


def test_sanitizer_workload_calls_every_op_forward_and_backward_on_cpu(capsys):
    sanitize = load_script("sanitize_ops")
    assert sanitize.main(["--device", "cpu"]) == 0
    called = capsys.readouterr().out
    ops = sorted(n.split("::")[1] for n in sanitize.library_ops())
    assert ops and all(op in called for op in ops)
    # The backward ops are among them: the workload differentiates every forward.
    assert {"reparam_gmm_kl_backward", "reparam_gmm_kl_rows_backward",
            "reparam_gmm_kl_rows_backward_step_", "gmm_log_prob_backward"} <= set(ops)


def test_sanitizer_workload_fails_on_a_non_finite_result():
    sanitize = load_script("sanitize_ops")
    with pytest.raises(AssertionError, match="non-finite"):
        sanitize.finite(torch.tensor([1.0, float("nan")]))


def test_table_benchmark_runs_on_cpu(tmp_path, capsys):
    bench = load_script("gpu_bench_tables")
    out = tmp_path / "t.json"
    assert bench.main(["--device", "cpu", "--rows", "1000", "--batch", "64", "--steps", "2",
                       "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["rows"] == 1000 and result["fused_ms"] > 0 and result["speedup"] > 0
    assert "nn.Embedding(sparse)+SparseAdam" in capsys.readouterr().out
