"""Peers' shared inputs (run in bitsmith's venv): the reference as a Hugging Face folder (the
model's fp32 weights exactly as bitsmith evaluates them, i.e. dequantized from its GGUF), the
calibration text (docs/PROTOCOL.md's 128 x 512 tokens of sotu_1790_1949.txt, decoded back to text) and
the reference as an F32 GGUF for llama.cpp.

    python bench/peers/prepare.py --model smollm2-135m --work WORK
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for tools.py
import tools  # noqa: E402
from common import work_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--work", default=None, help="work folder (default: ~/.cache/bitsmith/bench/peers)")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=512)
    args = ap.parse_args()

    import torch
    from safetensors.torch import save_file

    import bitsmith
    from bitsmith.calib import CalibrationConfig

    work = Path(args.work) if args.work else work_dir("peers")
    ref_dir = work / "reference"
    ref_dir.mkdir(parents=True, exist_ok=True)
    loaded = bitsmith.load(args.model)
    model, tok = loaded.model, loaded.tokenizer
    state = {k: v.detach().contiguous().float() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    tmp = ref_dir / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(ref_dir / "model.safetensors")
    model.config.torch_dtype = "float32"
    model.config.architectures = [type(model).__name__]  # the GGUF converter reads the class from here
    model.config.save_pretrained(ref_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(ref_dir)
    tok.save_pretrained(str(ref_dir))
    calib = CalibrationConfig(samples=args.calib_samples, seq_len=args.calib_len).batches(tok)  # [N, L]
    (work / "calib.txt").write_text("".join(tok.decode(row.tolist()) for row in calib), encoding="utf-8")
    torch.save(calib, work / "calib_ids.pt")
    gguf = work / "reference-f32.gguf"
    if not gguf.exists():
        subprocess.run([sys.executable, str(tools.llama_script("convert_hf_to_gguf.py")), str(ref_dir), "--outtype", "f32",
                        "--outfile", str(gguf)], check=True)
    print(json.dumps({"reference": str(ref_dir), "calib_text": str(work / "calib.txt"), "gguf": str(gguf)}))


if __name__ == "__main__":
    main()
