"""Prefix tuning under trainer.batching=paper_packed: each packed example attends to the n prefix
slots and its own earlier tokens at positions n..n+L-1, as in a padded batch, so the packed steps
train what the padded recipe trains. The trainer gives the packed rows' layers their prefixes without
the cache (the prefix attention), so compiled layers share one graph. Prompt tuning and
trainer.batching=packed stay refused."""

from __future__ import annotations

import contextlib

import pytest
import torch
import transformers.integrations.flex_attention as hf_flex
from transformers import LlamaConfig, LlamaForCausalLM

from adapters_lab.adapters import virtual_tokens
from adapters_lab.adapters.base import AdapterConfigError, freeze
from adapters_lab.adapters.prefix import PREFIX_KEY, PREFIX_VALUE, PrefixTuning, attention_modules, prefix_attention
from adapters_lab.adapters.prompt import PromptInit, PromptTuning
from adapters_lab.config import Batching
from adapters_lab.data.batching import BatchPlan
from adapters_lab.data.paper_packing import LOSS_WEIGHTS
from adapters_lab.data.tokenize import PaddedCollator
from adapters_lab.models import call_cache
from adapters_lab.training.speed import forward_loss, prepare_model, with_prefix_packed_mask
from adapters_lab.training.speed.packed_mask import packed_block_mask, packed_dense_mask, packed_prefix_mask
from tests.train_helpers import PAD, VOCAB, run, token_examples, trainable, trainer_cfg

RECIPE = dict(max_steps=20, batch_size=16, micro_batch_size=4, lr=1e-2, warmup_steps=3, max_grad_norm=1.0)
N = 5  # prefix slots


def tiny_virtual_token_model(method: str = "prefix", projection: bool = False, attention: str = "sdpa",
                             layers: int = 2):
    """A float32 random LLaMA (odd sizes) with prefix (or prompt) tuning, its prefix off its init."""
    config = LlamaConfig(hidden_size=48, intermediate_size=76, num_hidden_layers=layers, num_attention_heads=3,
                         num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=PAD, tie_word_embeddings=False)
    config._attn_implementation = attention
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    freeze(model)
    if method == "prompt":
        PromptTuning(name="prompt", num_virtual_tokens=N, init=PromptInit.random).inject(model)
    else:
        PrefixTuning(name="prefix", num_virtual_tokens=N, projection=projection, projection_hidden=7).inject(model)
    return model


@contextlib.contextmanager
def decoder_calls(model):
    """Within: per call of the decoder, (a cache was passed, how many attention modules hold a prefix)."""
    attentions = attention_modules(model)
    calls = []

    def record(module, args, kwargs):
        calls.append((call_cache(kwargs) is not None, sum(hasattr(a, PREFIX_KEY) for a in attentions)))

    handle = model.get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def holds_no_prefix(model) -> bool:
    return not any(hasattr(m, PREFIX_KEY) or hasattr(m, PREFIX_VALUE) for m in model.modules())


def step_batch(pack_length: int, step: int = -1) -> tuple[dict, list[list[dict]]]:
    """A paper_packed step's batch (by default the epoch's short last step: filler rows or tokens) and
    its micro-batches of examples."""
    examples = token_examples(70, seed=3)
    plan = BatchPlan(examples, trainer_cfg(batch_size=16, micro_batch_size=4, max_steps=5, batching="paper_packed",
                                           pack_length=pack_length), PAD, 0)
    entry = plan.epoch(0)[step]
    return plan.batch(entry)[0], [[examples[i] for i in micro] for micro in entry]


def padded_step_loss(model, micro_batches: list[list[dict]]) -> torch.Tensor:
    """The padded recipe's loss of one step: the mean of its micro-batches' token means."""
    losses = [model(**PaddedCollator(PAD)(micro), use_cache=False).loss for micro in micro_batches]
    return torch.stack(losses).mean()


@pytest.mark.parametrize("projection,pack_length", [(False, 0), (True, 0), (False, 24), (True, 24)])
def test_prefix_under_paper_packed_trains_what_padded_trains_over_20_steps(projection, pack_length):
    examples = token_examples(70, seed=3)
    padded_model = tiny_virtual_token_model(projection=projection)
    with decoder_calls(padded_model) as padded_calls:
        _, padded = run(trainer_cfg(**RECIPE), examples, model=padded_model)
    packed_model = tiny_virtual_token_model(projection=projection)
    with decoder_calls(packed_model) as packed_calls:
        _, packed = run(trainer_cfg(**RECIPE, batching="paper_packed", pack_length=pack_length), examples,
                        model=packed_model)
    assert packed.steps == padded.steps == 20
    assert set(padded_calls) == {(True, 0)}  # padded: the prefix in the cache
    assert set(packed_calls) == {(False, 2)}  # packed: no cache, each layer's attention holds its prefix
    assert holds_no_prefix(packed_model) and packed_model.config._attn_implementation == "sdpa"  # restored
    torch.testing.assert_close(torch.tensor(packed.loss_history), torch.tensor(padded.loss_history),
                               rtol=1e-5, atol=1e-6)
    padded_weights, packed_weights = trainable(padded_model), trainable(packed_model)
    assert padded_weights and all(name.startswith("prefix_tuning.") for name in padded_weights)
    start = trainable(tiny_virtual_token_model(projection=projection))
    for name, weight in padded_weights.items():
        torch.testing.assert_close(packed_weights[name], weight, rtol=1e-4, atol=1e-6, msg=name)
        assert not torch.allclose(weight, start[name])  # the prefix trained
    assert packed.tokens == padded.tokens and packed.padded_tokens < padded.padded_tokens


@pytest.mark.parametrize("without_cache", [False, True])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("pack_length", [0, 24])
def test_one_packed_step_is_the_padded_step_and_the_prefix_columns_matter(attention, pack_length, without_cache):
    model = tiny_virtual_token_model(attention=attention)
    if without_cache:
        model.set_attn_implementation(prefix_attention(model))
    batch, micro_batches = step_batch(pack_length)
    with torch.no_grad(), decoder_calls(model) as calls:
        packed = forward_loss(model, batch, fused=False)
        assert calls == [(False, 2) if without_cache else (True, 0)]
        padded = padded_step_loss(model, micro_batches)
        assert set(calls[1:]) == {(True, 0)}
        torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-6)
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
        inputs = with_prefix_packed_mask(model, inputs, N)
        assert torch.isfinite(model(**inputs, use_cache=False).logits).all()  # filler segments too
        mask = inputs["attention_mask"]
        hidden = mask.clone()
        hidden[..., :N] = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
        without = model(**{**inputs, "attention_mask": hidden}, use_cache=False).logits
        assert not torch.allclose(without, model(**inputs, use_cache=False).logits, atol=1e-3)


def test_dense_mask_sees_the_prefix_and_its_own_segment_only():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    mask = packed_dense_mask(positions, prefix=2)
    assert mask.shape == (2, 1, 6, 8) and mask[..., :2].all()
    own = mask[0, 0, :, 2:].int().tolist()
    assert own == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                   [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    assert torch.equal(packed_dense_mask(positions, prefix=0), mask[..., 2:])


@pytest.mark.parametrize("prefix", [0, N])
def test_block_mask_is_the_dense_mask_with_a_key_offset(prefix):
    batch, _ = step_batch(24)
    positions = batch["position_ids"]
    dense = packed_dense_mask(positions, prefix)[:, 0]
    block = packed_block_mask(positions, prefix)
    rows, length = positions.shape
    assert tuple(block.shape) == (rows, 1, length, prefix + length)
    q, kv = torch.arange(length)[:, None], torch.arange(prefix + length)[None, :]
    for row in range(rows):
        assert torch.equal(block.mask_mod(torch.tensor(row), torch.tensor(0), q, kv), dense[row])


@pytest.mark.parametrize("without_cache", [False, True])
def test_flex_attention_with_the_prefix_block_mask_matches_sdpa(monkeypatch, without_cache):
    from tests.test_packed_mask import eager_flex

    batch, _ = step_batch(0)
    model = tiny_virtual_token_model(projection=True).eval()
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    with torch.no_grad():
        reference = model(**with_prefix_packed_mask(model, inputs, N), use_cache=False).logits
        monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", eager_flex)
        model.set_attn_implementation("flex_attention")
        if without_cache:
            model.set_attn_implementation(prefix_attention(model))
        assert not isinstance(packed_prefix_mask(model, inputs["position_ids"], N), torch.Tensor)  # a BlockMask
        with decoder_calls(model) as calls:
            flex = model(**with_prefix_packed_mask(model, inputs, N), use_cache=False).logits
    assert calls == [(False, 2) if without_cache else (True, 0)]
    torch.testing.assert_close(flex, reference, rtol=1e-4, atol=1e-5)


def test_the_prefix_attributes_are_gone_after_the_call_also_after_an_error():
    batch, _ = step_batch(24)
    model = tiny_virtual_token_model()
    model.set_attn_implementation(prefix_attention(model))
    inputs = with_prefix_packed_mask(model, {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}, N)
    seen = []
    last = attention_modules(model)[-1]
    last.register_forward_pre_hook(lambda module, args: seen.append(getattr(module, PREFIX_KEY).shape))
    loss = model(**inputs, use_cache=False).logits.sum()
    assert seen == [(batch["input_ids"].shape[0], 1, N, 16)] and holds_no_prefix(model)  # batch, kv heads, n, dim
    loss.backward()  # the autograd graph keeps the prefixes
    assert model.prefix_tuning.embedding.weight.grad.abs().sum() > 0

    def fail(module, args):
        assert hasattr(module, PREFIX_KEY)
        raise RuntimeError("in the layer")

    last.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="in the layer"):
        model(**inputs, use_cache=False)
    assert len(seen) == 2 and holds_no_prefix(model)


def test_validation_under_the_prefix_attention_gives_the_cache_paths_logits():
    model = tiny_virtual_token_model(projection=True).eval()
    batch = PaddedCollator(PAD)(token_examples(6, seed=7))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        reference = model(**inputs, use_cache=False).logits
        speed = prepare_model(model, trainer_cfg(batching="paper_packed"))
        assert model.config._attn_implementation == "adapters_lab_prefix_sdpa"
        with decoder_calls(model) as calls:
            logits = speed.logits(model, batch)
    assert calls == [(False, 2)]
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], reference[real], rtol=1e-5, atol=1e-5)
    speed.restore(model)
    assert model.config._attn_implementation == "sdpa" and not speed.packed_prefix


def test_compiled_layers_train_the_same_prefix_steps():
    from torch._dynamo.utils import counters

    examples = token_examples(40, seed=4)
    recipe = dict(RECIPE, max_steps=4, batching="paper_packed", pack_length=0)
    eager_model, compiled_model = tiny_virtual_token_model(), tiny_virtual_token_model()
    _, eager = run(trainer_cfg(**recipe), examples, model=eager_model)
    counters.clear()
    _, compiled = run(trainer_cfg(**recipe, compile=True), examples, model=compiled_model)
    assert counters["stats"]["unique_graphs"] > 0 and not counters["graph_break"]
    torch.testing.assert_close(torch.tensor(compiled.loss_history), torch.tensor(eager.loss_history),
                               rtol=1e-4, atol=1e-5)
    for name, weight in trainable(eager_model).items():
        torch.testing.assert_close(trainable(compiled_model)[name], weight, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # flex attention has no CPU backward
def test_compiled_layers_share_one_graph_over_ten_prefix_layers_with_validation(attention):
    from torch._dynamo.utils import counters

    examples, val = token_examples(40, seed=4), token_examples(12, seed=5)
    recipe = dict(RECIPE, max_steps=3, warmup_steps=1, batching="paper_packed", pack_length=0)
    eager_model, compiled_model = (tiny_virtual_token_model(attention=attention, layers=10) for _ in range(2))
    _, eager = run(trainer_cfg(**recipe), examples, model=eager_model, val=val)
    counters.clear()
    with decoder_calls(compiled_model) as calls:
        _, compiled = run(trainer_cfg(**recipe, compile=True), examples, model=compiled_model, val=val)
    assert set(calls) == {(False, 10)}  # training and validation calls: no cache
    assert 0 < counters["stats"]["unique_graphs"] <= 3  # train + validation shapes, not one graph per layer
    assert not any("recompile limit" in reason for reason in counters["unimplemented"])
    assert not counters["graph_break"]
    torch.testing.assert_close(torch.tensor(compiled.loss_history), torch.tensor(eager.loss_history),
                               rtol=1e-4, atol=1e-5)
    assert compiled.val_loss == pytest.approx(eager.val_loss, rel=1e-4)


def test_prompt_tuning_and_packed_batching_are_still_refused(make_cfg):
    from adapters_lab.adapters import build_adapter

    prefix, prompt = (build_adapter(make_cfg(f"adapter={name}").adapter) for name in ("prefix", "prompt"))
    prefix.check_training(trainer_cfg(batching=Batching.paper_packed))
    with pytest.raises(AdapterConfigError, match=r"^trainer.batching=paper_packed: prompt.*trainer.batching=padded$"):
        prompt.check_training(trainer_cfg(batching=Batching.paper_packed))
    for adapter in (prefix, prompt):
        with pytest.raises(AdapterConfigError, match=r"^trainer.batching=packed: "):
            adapter.check_training(trainer_cfg(batching=Batching.packed))
    with pytest.raises(AdapterConfigError, match=r"use trainer.fused_loss=false \(trainer=paper_packed sets it true\)"):
        prefix.check_training(make_cfg("adapter=prefix", "trainer=paper_packed").trainer)
    prefix.check_training(make_cfg("adapter=prefix", "trainer=paper_packed", "trainer.fused_loss=false").trainer)
    with pytest.raises(AdapterConfigError, match=r"^trainer.attn_implementation=varlen: prefix"):
        prefix.check_training(trainer_cfg(batching=Batching.paper_packed, attn_implementation="varlen"))


def test_prefix_tuning_refuses_gradient_checkpointing_before_weights_load(make_cfg, tmp_path, monkeypatch):
    from adapters_lab import pipeline
    from adapters_lab.adapters import build_adapter
    from adapters_lab.training.settings import check_trainer_config

    monkeypatch.setattr(pipeline, "build_model", lambda *_: pytest.fail("model weights loaded before the check"))
    for trainer in ("default", "paper_packed"):
        cfg = make_cfg("adapter=prefix", f"trainer={trainer}", "trainer.fused_loss=false",
                       "trainer.gradient_checkpointing=true", f"paths.output_dir={tmp_path / trainer}")
        with pytest.raises(AdapterConfigError, match=r"^trainer.gradient_checkpointing=true: prefix tuning.*"
                                                     r"use trainer.gradient_checkpointing=false$"):
            pipeline.run(cfg)
    prompt = make_cfg("adapter=prompt", "trainer.gradient_checkpointing=true")
    build_adapter(prompt.adapter).check_training(check_trainer_config(prompt.trainer).cfg)  # prompt tuning recomputes


def test_the_forward_refuses_prompt_tuning_and_packed_rows_without_the_paper_packed_layout():
    batch, _ = step_batch(24)
    prompt = tiny_virtual_token_model("prompt")
    with pytest.raises(ValueError, match="prompt tuning's virtual tokens are input positions"):
        forward_loss(prompt, batch, fused=False)
    prefix = tiny_virtual_token_model()
    plain_packed = {k: v for k, v in batch.items() if k != LOSS_WEIGHTS}  # trainer.batching=packed's rows
    with pytest.raises(ValueError, match="trainer.batching=packed"):
        forward_loss(prefix, plain_packed, fused=False)
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    wrong = packed_dense_mask(batch["position_ids"], prefix=N - 1)  # a mask that misses a prefix slot
    with pytest.raises(ValueError, match=rf"4D attention mask over {N} prefix slots"):
        prefix(**inputs, attention_mask=wrong, use_cache=False, **{virtual_tokens.PACKED_ROWS: True})


def test_run_py_trains_prefix_under_trainer_paper_packed(make_cfg, tmp_path):
    import json

    from adapters_lab.pipeline import run as run_py

    cfg = make_cfg("model=tiny_llama", "adapter=prefix", "trainer=paper_packed", "trainer.fused_loss=false",
                   "trainer.attn_implementation=sdpa", "trainer.compile=false", "trainer.max_steps=3", "eval.limit=2")
    assert cfg.trainer.batching == Batching.paper_packed
    run_py(cfg)
    train = json.loads((tmp_path / "run" / "metrics.json").read_text())["train"]
    assert train["steps"] == 3 and torch.isfinite(torch.tensor([train["loss_final"], train["val_loss"]])).all()
