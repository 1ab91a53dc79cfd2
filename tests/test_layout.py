"""The package's layering and public paths: what the README's Design section promises.

- core (ops, reference, table_optim, table_memory, atomic_io, models/) never imports the ICA
  application (ica/), the distributed table or the CLI;
- ica/ and the distributed modules never import each other;
- old import paths of moved modules keep working (the same module objects);
- every module stays under 550 lines (a module that grows past it holds more than one job).
"""
import ast
import importlib
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "halfvae_ext"
CORE = ("halfvae_ext.ops", "halfvae_ext.reference", "halfvae_ext.table_optim",
        "halfvae_ext.table_memory", "halfvae_ext.atomic_io", "halfvae_ext.models")
DISTRIBUTED = ("halfvae_ext.distributed", "halfvae_ext.fit_sharded", "halfvae_ext.collectives",
               "halfvae_ext.sharded_data",
               "halfvae_ext.sharded_checkpoint")
ICA = ("halfvae_ext.ica",)
APPLICATIONS = ICA + DISTRIBUTED + ("halfvae_ext.cli", "halfvae_ext.experiments")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path) -> set:
    """Every module a file imports, at the top or inside functions, relative ones resolved."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_import_layering(path):
    name = _module_name(path)
    imported = _imports(path)
    if _within(name, CORE):
        bad = [m for m in imported if _within(m, APPLICATIONS)]
        assert not bad, f"core module {name} imports {bad}"
    if _within(name, ICA):
        bad = [m for m in imported if _within(m, DISTRIBUTED)]
        assert not bad, f"{name} (ica) imports {bad}"
    if _within(name, DISTRIBUTED):
        bad = [m for m in imported if _within(m, ICA)]
        assert not bad, f"{name} (distributed) imports {bad}"


def test_the_layering_check_sees_imports():
    """The check above would catch a violation: it finds relative imports inside functions."""
    imported = _imports(PACKAGE / "cli.py")
    assert "halfvae_ext.ica.estimator.HalfVAEICA" in imported or \
        "halfvae_ext.ica.estimator" in imported
    assert "halfvae_ext.models" in _imports(PACKAGE / "ica" / "recipe.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines < 550, f"{path.relative_to(PACKAGE)} has {lines} lines"


def test_importing_core_loads_no_application_module():
    code = ("import sys, halfvae_ext, halfvae_ext.models; "
            "bad = [m for m in sys.modules if m.startswith(('halfvae_ext.ica', "
            "'halfvae_ext.distributed', 'halfvae_ext.fit_sharded', 'sklearn'))]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("old, new", [
    ("halfvae_ext.estimator", "halfvae_ext.ica.estimator"),
    ("halfvae_ext.recipe", "halfvae_ext.ica.recipe"),
    ("halfvae_ext.restarts", "halfvae_ext.ica.restarts"),
    ("halfvae_ext.preprocessing", "halfvae_ext.ica.preprocessing"),
    ("halfvae_ext.param_validation", "halfvae_ext.ica.param_validation"),
])
def test_old_import_paths_are_the_new_modules(old, new):
    assert importlib.import_module(old) is importlib.import_module(new)
    assert importlib.import_module(new).__spec__.name == new


def test_old_entry_points_keep_working():
    import halfvae_ext
    from halfvae_ext import experiments
    from halfvae_ext.ica import HalfVAEICA, baselines, demo
    assert halfvae_ext.HalfVAEICA is HalfVAEICA
    assert experiments.fit_vae is baselines.fit_vae
    assert experiments.run_demo is demo.run_demo
    from halfvae_ext.estimator import HalfVAEICA as old
    assert old is HalfVAEICA


def test_latents_protocol_is_what_halfvae_checks():
    """LatentTable and ShardedLatentTable (in a one-process gloo group, in a subprocess) satisfy
    the Latents protocol, and HalfVAE refuses an object that does not."""
    import torch

    from halfvae_ext.models import HalfVAE, LatentTable, Latents
    assert isinstance(LatentTable(4, 2), Latents)
    assert not isinstance(torch.nn.Linear(2, 2), Latents)
    with pytest.raises(TypeError, match="Latents protocol"):
        HalfVAE(4, 2, 2, latents=torch.nn.Linear(2, 2))
    code = ("import torch.distributed as dist; from halfvae_ext.distributed import "
            "ShardedLatentTable, init_process_group; from halfvae_ext.models import Latents, "
            "HalfVAE; init_process_group('gloo', timeout_s=60, store=dist.HashStore(), rank=0, "
            "world_size=1); t = ShardedLatentTable(10, 3); assert isinstance(t, Latents); "
            "HalfVAE(10, 2, 3, latents=t); dist.destroy_process_group(); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr
