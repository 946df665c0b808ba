import subprocess
import sys


def test_import_bitsmith_stays_light() -> None:
    code = "import sys, bitsmith, bitsmith.spec; print(sorted(m for m in ('torch', 'transformers', 'gguf', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
