"""scripts/profile_decoding.py on CPU: a suite batch under each variant decodes the same tokens in
float32 (the fused norms change no float32 computation), and its phases and variants are written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "llm_adapters" / "dataset"


@pytest.mark.skipif(not (DATA / "gsm8k" / "test.json").is_file(), reason="the math test sets are absent here")
def test_tiny_variants_decode_the_same_tokens_and_are_written(tmp_path):
    spec = importlib.util.spec_from_file_location("profile_decoding", REPO / "scripts" / "profile_decoding.py")
    profile = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(profile)
    out = tmp_path / "profile.json"
    result = profile.main(["--tiny", "--out", str(out), "--beams", "4", "--batch-index", "1",
                           "--variants", "before,lanes_2,decoder_default", "--data-dir", str(DATA.parent)])
    row = result["decodings"][0]
    assert [row["before"]["fused_norms"], row["decoder_default"]["fused_norms"]] == [False, True]
    assert row["decoder_default"]["prompts_with_reference_tokens"] == row["prompts"] > 1
    assert row["lanes_2"]["prompts_with_reference_tokens"] == row["prompts"] and row["lanes_2"]["lanes"] == 2
    phases = row["phases"]
    assert 0 < phases["prefill"] + phases["steps"] + phases["compaction"] <= phases["total"] * 1.01
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
