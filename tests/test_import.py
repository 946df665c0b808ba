import subprocess
import sys


def test_import_bitsmith_stays_light() -> None:
    code = "import sys, bitsmith, bitsmith.spec; print(sorted(m for m in ('torch', 'transformers', 'gguf', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_gguf_modules_import_first() -> None:
    """Each GGUF module imports in a fresh interpreter before anything else of bitsmith (io.gguf.names
    imports bitsmith.models, whose GGUF source imported io.gguf.names back: a cycle)."""
    for module in ("bitsmith.io.gguf.export", "bitsmith.io.gguf.names", "bitsmith.models.gguf_source"):
        done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True)
        assert done.returncode == 0, f"{module}: {done.stderr[-400:]}"
