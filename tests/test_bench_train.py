"""`scripts/bench_train.py --tiny`: every variant runs on the CPU and reports a real rate; the
varlen attention variants, liger kernels, the varlen check, the steady-step profile and the HF PEFT
baselines."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "scripts" / "bench_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_train_tiny_runs_every_variant(bench, tmp_path, capsys):
    rows = bench.main(["--tiny", "--variants", "paper,tuned,ours", "--json", str(tmp_path / "rows.json")])
    assert [r.note.startswith("FAILED") for r in rows] == [False] * 3, [r.note for r in rows]
    assert all(r.tokens_per_second > 0 for r in rows)
    assert rows[0].padded_share > 0 and rows[1].padded_share == 0  # paper pads; tuned uses full sequences
    assert "| variant | real tok/s |" in capsys.readouterr().out
    assert len(json.loads((tmp_path / "rows.json").read_text())) == 3


def test_tiny_fp8_variant_trains_and_keeps_both_loss_curves(bench, tmp_path, capsys):
    """ours_fp8 beside ours (its bf16 counterpart): both train, the JSON holds every step's loss, and the
    first step (LoRA B = 0: the base model's loss) agrees within FP8's error but not exactly."""
    rows = bench.main(["--tiny", "--variants", "ours,ours_fp8", "--json", str(tmp_path / "rows.json")])
    assert [r.note.startswith("FAILED") for r in rows] == [False] * 2, [r.note for r in rows]
    assert all(r.tokens_per_second > 0 for r in rows) and "FP8 frozen base" in rows[1].name
    saved = {r["variant"]: r["loss_history"] for r in json.loads((tmp_path / "rows.json").read_text())}
    assert set(saved) == {"ours", "ours_fp8"} and all(len(v) == 3 for v in saved.values())
    first = saved["ours"][0], saved["ours_fp8"][0]
    assert first[0] != first[1] and abs(first[0] - first[1]) < 1e-3 * first[0]
    assert "fp8 vs bf16 base: step-1 loss ours_fp8" in capsys.readouterr().out


def test_length_list_matches_the_paper_cut():
    lengths = json.loads((REPO / "scripts" / "math_data_lengths.json").read_text())["lengths"]
    assert len(lengths) == 3260 and max(lengths) == 256 and min(lengths) > 16


def test_tiny_varlen_variants_check_and_liger_skip(bench, capsys):
    rows = bench.main(["--tiny", "--variants", "check_varlen,ours,ours_varlen,ours_liger,ours_varlen_nocompile,ours_plainlora"])
    out = capsys.readouterr().out
    assert [r.note.startswith("FAILED") for r in rows] == [False] * 4, [r.note for r in rows]
    assert all(r.tokens_per_second > 0 for r in rows)
    assert "ours_liger: skipped: liger kernels need a CUDA GPU" in out
    check = re.search(r"varlen check: varlen vs sdpa: \|loss diff\| (\S+), LoRA grads max\|diff\|/max\|grad\| (\S+)", out)
    assert check and float(check.group(1)) < 1e-5 and float(check.group(2)) < 1e-5, out
    step1 = re.search(r"varlen vs sdpa: step-1 loss ours_varlen (\S+), ours (\S+), \|diff\| (\S+)", out)
    assert step1 and float(step1.group(3)) < 1e-4, out
    losses = [float(re.search(r"step-1 loss (\S+)", r.note).group(1)) for r in rows]
    assert max(losses) - min(losses) < 1e-4  # same batch, same base model: same first loss


def test_ours_variant_suffixes(bench):
    plain = {"varlen": False, "liger": False, "compile": True, "autotune": False, "fused_lora": True, "fp8": False}
    assert bench.ours_variant("ours") == plain
    assert bench.ours_variant("ours_varlen_liger") == {**plain, "varlen": True, "liger": True}
    assert bench.ours_variant("ours_liger_nocompile") == {**plain, "liger": True, "compile": False}
    assert bench.ours_variant("ours_varlen_autotune") == {**plain, "varlen": True, "autotune": True}
    assert bench.ours_variant("ours_plainlora") == {**plain, "fused_lora": False}
    assert bench.ours_variant("ours_fp8") == {**plain, "fp8": True}
    assert bench.ours_variant("ours_plainlora_fp8") == {**plain, "fused_lora": False, "fp8": True}
    assert bench.ours_variant("ours_padded") is None and bench.ours_variant("tuned") is None
    with pytest.raises(SystemExit, match="unknown suffixes"):
        bench.ours_variant("ours_fast")


def test_liger_skips_when_not_installed(bench, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(bench.Skipped, match="liger-kernel not installed"):
        with bench.liger_kernels(torch.nn.Module(), torch.device("cuda")):
            pass


def test_liger_patches_are_undone_after_the_variant(bench, monkeypatch):
    from transformers.models.llama import modeling_llama

    before = (modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP,
              modeling_llama.LlamaForCausalLM.forward)
    calls = []

    def fake_apply(**kwargs):  # what liger does: module globals and the class forward
        calls.append(kwargs)
        modeling_llama.apply_rotary_pos_emb = modeling_llama.LlamaRMSNorm = modeling_llama.LlamaMLP = "liger"
        modeling_llama.LlamaForCausalLM.forward = lambda self: None

    package = types.ModuleType("liger_kernel")
    package.__spec__ = importlib.machinery.ModuleSpec("liger_kernel", None)
    package.__path__ = []
    sub = types.ModuleType("liger_kernel.transformers")
    sub.apply_liger_kernel_to_llama = fake_apply
    package.transformers = sub
    monkeypatch.setitem(sys.modules, "liger_kernel", package)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", sub)
    with bench.liger_kernels("model", torch.device("cuda")):
        assert modeling_llama.LlamaMLP == "liger"
    assert calls == [dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                          fused_linear_cross_entropy=False, model="model")]
    assert (modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm, modeling_llama.LlamaMLP,
            modeling_llama.LlamaForCausalLM.forward) == before


def test_profile_covers_the_timed_steps_and_names_fill_sites(bench, capsys):
    rows = bench.main(["--tiny", "--variants", "ours", "--profile"])
    out = capsys.readouterr().out
    assert not rows[0].note.startswith("FAILED"), rows[0].note
    assert "profile of 1 timed steps" in out
    assert "fill/zero ops per step by Python call site:" in out
    assert "adapters_lab/training/" in out.split("fill/zero ops per step by Python call site:")[1]


@pytest.mark.parametrize("name, kind", [
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT", "GEMM"),
    ("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Fl...", "attention"),
    ("triton_tem_fused_0", "Inductor templates (flex attention, autotuned GEMMs)"),
    ("triton_red_fused__to_copy_add_mean_mul_native_dropout_pow_rsqrt_0", "Inductor fused"),
    ("Memcpy DtoD (Device -> Device)", "copies"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
])
def test_profile_kinds_name_kernels_by_their_first_matching_kind(bench, name, kind):
    assert bench.kernel_kind(name) == kind


def test_tiny_hf_peft_baselines_run_and_table_has_a_ratio_per_baseline(bench, capsys):
    rows = bench.main(["--tiny", "--variants", "paper,tuned_lengths,tuned_packed,ours"])
    assert [r.variant for r in rows] == ["paper", "tuned_lengths", "tuned_packed", "ours"]
    assert not [r.note for r in rows if r.note.startswith("FAILED")]
    assert all(r.tokens_per_second > 0 for r in rows)
    packed = rows[2]
    assert packed.padded_share < 0.05  # whole examples fill the packed rows
    table = bench.markdown_table(rows).splitlines()
    assert table[0].endswith("| x paper | x tuned_lengths | x tuned_packed |")
    for row, line in zip(rows, table[2:]):
        ratios = [float(cell) for cell in line.strip("|").split("|")[-3:]]
        expected = [row.tokens_per_second / rows[i].tokens_per_second for i in (0, 1, 2)]
        assert ratios == pytest.approx(expected, abs=0.006)
