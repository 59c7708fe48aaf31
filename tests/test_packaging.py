"""The distribution: pureflax.compat ships in the wheel and imports from it, as from the editable install."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_editable_install_imports_compat():
    import pureflax.compat

    assert Path(pureflax.compat.__file__).resolve() == ROOT / "compat" / "__init__.py"


def test_wheel_contains_and_imports_compat(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT), "-w", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = tmp_path.glob("pureflax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pureflax/compat/__init__.py" in names and "pureflax/nn.py" in names
    assert "pureflax/compat/convert/__init__.py" in names  # the subpackage too
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = "import pureflax, pureflax.compat, pureflax.vae; print(pureflax.__file__); print(pureflax.compat.__file__)"
    # the dependencies come from this environment; the wheel's copy of pureflax must win over the editable one
    run = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(site)!r}); {probe}"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr
    for line in run.stdout.split():
        assert line.startswith(str(site)), run.stdout


def test_no_compat_file_is_over_400_lines():
    root = Path(__file__).resolve().parents[1] / "compat"
    long = {str(p.relative_to(root)): n for p in root.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these into files of one concept each: {long}"
