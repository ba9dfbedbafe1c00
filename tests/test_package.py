"""Packaging: import hygiene, wheel layout, and the main job."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MATH_MODULES = ["layout", "transforms", "reference", "reference_model", "shapes", "tiny_model", "compare", "rotation_fit"]


def run_py(code, cwd=REPO):
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_math_modules_do_not_import_sglang():
    mods = ", ".join(f"sglang_tpla.{m}" for m in MATH_MODULES)
    r = run_py(f"import sys, {mods}; bad = sorted(m for m in sys.modules if m.split('.')[0] in ('sglang', 'triton', 'flashinfer')); print(bad)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_no_top_level_kernels_package_shadows_the_dependency():
    # run from the repository root, where a `kernels/__init__.py` would shadow sglang's dependency
    assert not (REPO / "kernels" / "__init__.py").exists()
    assert not (REPO / "patches" / "__init__.py").exists()
    r = run_py("import kernels, sglang_tpla.kernels, sglang_tpla.patches; print(kernels.__file__)")
    assert r.returncode == 0, r.stderr
    assert "site-packages" in r.stdout


def test_wheel_ships_kernels_and_patches_under_sglang_tpla(tmp_path):
    src = tmp_path / "src"  # a clean copy: setuptools' build/ folder in the clone may hold stale files
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__"))
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(src)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = tmp_path.glob("sglang_tpla-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"sglang_tpla"}
    for sub in ("kernels", "patches"):
        local = sorted(p.name for p in (REPO / sub).glob("*.py"))
        shipped = sorted(n.split("/")[-1] for n in names if n.startswith(f"sglang_tpla/{sub}/") and n.endswith(".py"))
        assert shipped == local


def test_main_job_prints_kv_table_and_tiny_comparison():
    r = subprocess.run([sys.executable, "-m", "sglang_tpla", "--skip-serving", "--decode-len", "8"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    # DeepSeek-V3: 61 layers x 576 x 2 B = 70,272 B (MLA); g=2: 61 x 320 x 2 = 39,040 B
    assert "| DeepSeek-V3 | 61 | 128 | 70,272 B |" in out and "39,040 B (0.556x, 1.80x tokens)" in out
    assert "| Kimi-K2 | 61 | 64 |" in out
    assert "| hadamard | pd_sep/exact-norm | 2 |" in out
