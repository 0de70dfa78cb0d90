"""``model.init=random``: the paper models from their known shapes, random weights, no download.
Parameter counts are taken on the meta device (no memory) from the real ``conf/model`` files."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from adapters_lab.config import ArchConfig, DType, ModelConfig, ModelInit
from adapters_lab.models import build_model, build_tiny_tokenizer
from adapters_lab.models.random_init import build_random_model


def gptj_6b_by_formula() -> int:
    """GPT-J-6B from its module shapes (28 layers, d 4096, d_ff 16384, vocab 50400, biased MLP and
    head, no attention biases). The model card's 6,053,381,344 is mesh-transformer-jax's count."""
    d, ff, vocab = 4096, 16384, 50400
    layer = 2 * d + 4 * d * d + (d * ff + ff) + (ff * d + d)  # ln_1, q/k/v/out, fc_in, fc_out
    return vocab * d + 28 * layer + 2 * d + (d * vocab + vocab)  # wte, layers, ln_f, lm_head


# The released checkpoints' parameter totals.
KNOWN = {
    "llama7b": 6_738_415_616,
    "llama13b": 13_015_864_320,
    "bloomz7b": 7_069_016_064,
    "smollm2_135m": 134_515_008,
    "gptj6b": gptj_6b_by_formula(),
}


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_random_init_paper_model_has_the_real_parameter_count(make_cfg, name):
    cfg = make_cfg(f"model={name}", "model.init=random").model
    model = build_random_model(cfg.arch, name, build_tiny_tokenizer(), torch.bfloat16, cfg.attn_implementation,
                               device="meta")
    assert sum(p.numel() for p in model.parameters()) == KNOWN[name]
    assert all(p.is_meta for p in model.parameters())
    assert model.config.num_hidden_layers == cfg.arch.num_hidden_layers
    assert model.get_input_embeddings().weight.shape == (cfg.arch.vocab_size, cfg.arch.hidden_size)


def test_smollm2_shape_has_grouped_kv_heads_and_a_tied_head(make_cfg):
    cfg = make_cfg("model=smollm2_135m", "model.init=random").model
    model = build_random_model(cfg.arch, "smollm2_135m", build_tiny_tokenizer(), torch.bfloat16, "sdpa", "meta")
    attention = model.model.layers[0].self_attn
    assert attention.k_proj.weight.shape == (192, 576)  # 3 kv heads of 64
    assert model.config.rope_parameters["rope_theta"] == 100000.0
    assert model.lm_head.weight is model.get_input_embeddings().weight


def test_random_llama_shape_trains_and_evaluates_end_to_end_offline(make_cfg, tmp_path):
    """The whole pipeline on llama7b's config with the shape shrunk: the hub id is never used (the
    tests run with HF_HUB_OFFLINE=1, so any download would fail) and the local tokenizer is used."""
    from adapters_lab.pipeline import run

    small = ["model.arch.hidden_size=64", "model.arch.intermediate_size=96", "model.arch.num_hidden_layers=2",
             "model.arch.num_attention_heads=4", "model.arch.vocab_size=512"]
    cfg = make_cfg("model=llama7b", "model.init=random", "model.dtype=float32", *small)
    run(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    h, i, layers, vocab = 64, 96, 2, 512  # the LLaMA layout: q,k,v,o; gate, up, down; two norms; untied head
    assert metrics["params"]["total"] == 2 * vocab * h + layers * (4 * h * h + 3 * h * i + 2 * h) + h + \
        metrics["params"]["trainable"]
    assert metrics["train"]["steps"] == 3 and len(metrics["train"]["loss_history"]) == 3
    assert "arith" in metrics["eval"]
    config = OmegaConf.load(tmp_path / "run" / "config.yaml")
    assert config.model.init == "random" and config.model.arch.hidden_size == 64


def test_random_init_is_built_on_the_requested_device_and_dtype():
    arch = ArchConfig(model_type="llama", hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                      num_attention_heads=2, vocab_size=400)
    model, tok = build_model(ModelConfig(name="m", init=ModelInit.random, arch=arch, dtype=DType.bfloat16),
                             device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config.pad_token_id == tok.pad_token_id and len(tok) <= 400
    out = model(**tok(["a b"], return_tensors="pt"))
    assert out.logits.shape[-1] == 400


@pytest.mark.parametrize("arch,match", [
    (None, "model.init=random needs model.arch"),
    (ArchConfig(model_type="llamma", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=400),
     "model.arch.model_type='llamma'"),
    (ArchConfig(model_type="bloom", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=400), "model.arch.intermediate_size is not a key of bloom"),
    (ArchConfig(model_type="llama", hidden_size=30, num_hidden_layers=1, num_attention_heads=4, vocab_size=400),
     "hidden_size=30 is not a multiple"),
    (ArchConfig(model_type="llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=100),
     "more than model.arch.vocab_size=100"),
])
def test_bad_arch_fails_in_one_line_naming_the_key(arch, match):
    with pytest.raises(ValueError, match=match) as info:
        build_model(ModelConfig(name="m", init=ModelInit.random, arch=arch), device="meta")
    assert "\n" not in str(info.value)


def test_random_init_reads_a_local_tokenizer_folder_and_never_a_hub_id(tmp_path):
    build_tiny_tokenizer().save_pretrained(tmp_path / "tok")
    arch = ArchConfig(model_type="llama", hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=400)
    _, tok = build_model(ModelConfig(name="m", init=ModelInit.random, arch=arch, local_path=str(tmp_path / "tok")),
                         "meta")
    assert tok.get_vocab() == build_tiny_tokenizer().get_vocab()
    with pytest.raises(ValueError, match="model.local_path=yahma/llama-7b-hf is not a folder"):
        build_model(ModelConfig(name="m", init=ModelInit.random, arch=arch, local_path="yahma/llama-7b-hf"), "meta")


def test_arch_typo_fails_at_compose_time(make_cfg):
    with pytest.raises(Exception, match="hidden_sise"):
        make_cfg("model=llama7b", "model.arch.hidden_sise=8")


SMALL_LLAMA = ["model.arch.hidden_size=64", "model.arch.intermediate_size=96", "model.arch.num_hidden_layers=4",
               "model.arch.num_attention_heads=4", "model.arch.vocab_size=4096", "model.dtype=bfloat16"]


def random_token_examples(count: int, vocab: int, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(20, 60, (count,), generator=generator).tolist()
    return [{"input_ids": (ids := [1] + torch.randint(3, vocab, (n - 1,), generator=generator).tolist()),
             "labels": list(ids)} for n in lengths]


def test_random_init_first_loss_is_ln_vocab_in_bf16(make_cfg):
    """Random weights (std 0.02) give near-uniform predictions: the loss on random tokens starts at
    ln(vocab), finite in bf16, gradients included; a broken init (uninitialised memory, a wrong std)
    starts far from it or at NaN."""
    import math

    cfg = make_cfg("model=llama7b", "model.init=random", *SMALL_LLAMA).model
    model, _ = build_model(cfg, device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = torch.tensor([x["input_ids"][:20] for x in random_token_examples(8, 4096)])
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(math.log(4096), abs=0.3)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("batching", ["padded", "paper_packed"])
def test_our_training_paths_start_at_ln_vocab_on_a_random_init_model(make_cfg, batching):
    """The trainer's first step on a random-init model with bf16 weights: ln(vocab), and no NaN over
    a few steps (padded: the paper recipe's micro-batch means; paper_packed: packed rows). Precision
    stays fp32 (no autocast: one process holds one accelerate state, and the other tests' is fp32)."""
    import math

    from adapters_lab.adapters import build_adapter, freeze
    from tests.train_helpers import run, trainer_cfg

    cfg = make_cfg("model=llama7b", "model.init=random", "adapter=lora", *SMALL_LLAMA)
    model, tokenizer = build_model(cfg.model, device="cpu")
    freeze(model)
    build_adapter(cfg.adapter).inject(model, tokenizer)
    trainer = trainer_cfg(max_steps=4, batch_size=8, micro_batch_size=4, lr=3e-4, precision="fp32",
                          batching=batching, pack_length=0)
    _, result = run(trainer, random_token_examples(32, 4096), model=model)
    assert result.loss_history[0] == pytest.approx(math.log(4096), abs=0.3)
    assert all(math.isfinite(loss) for loss in result.loss_history) and result.steps == 4
