"""Our decoder (adapters_lab/decoding.py) chooses exactly the tokens of transformers' generate:
greedy and 4-beam search, with and without sequences ending early, left padding, adapters,
windows, reuse across batches; grouped attention equals per-beam attention by hand."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from adapters_lab import decoding, evaluate
from adapters_lab.adapters import build_adapter, freeze
from tests.adapter_helpers import VOCAB, randomize_trainable, tiny_model

PAD, EOS = 0, 2
LENGTHS = [9, 4, 13, 6, 1]  # left padding on every row but one


def left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def reference(model, ids, mask, beams: int, steps: int, eos: int) -> torch.Tensor:
    """generate's new tokens, padded after the first EOS (its beam search fills with EOS when the
    pad id is 0: ``pad_token_id or eos_token_id``; the text is the same)."""
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=beams, max_new_tokens=steps,
                         pad_token_id=PAD, eos_token_id=eos)[:, ids.shape[1]:]
    out = F.pad(out, (0, steps - out.shape[1]), value=PAD)
    after_eos = (out == eos).long().cumsum(1) - (out == eos).long() > 0
    return out.masked_fill(after_eos, PAD)


def ours(model, ids, mask, beams: int, steps: int, eos: int, **kwargs) -> torch.Tensor:
    decoder = decoding.Decoder(model, ids.shape[0], ids.shape[1] + 3, beams, steps, eos, PAD, **kwargs)
    return decoder(ids, mask)


def ends_early(tokens: torch.Tensor, eos: int) -> bool:
    return bool(((tokens[:, :-1] == eos) & (tokens[:, 1:] == PAD)).any())


def frequent_token(model, ids, mask, steps: int, beams: int = 1) -> int:
    """A token the decoding emits, used as EOS so that some sequences end before the budget (and
    others do not): the most frequent such one."""
    values, counts = reference(model, ids, mask, beams, steps, EOS).unique(return_counts=True)
    for token in values[counts.argsort(descending=True)].tolist():
        if token not in (PAD, EOS) and ends_early(reference(model, ids, mask, beams, steps, token), token):
            return token
    raise AssertionError("no emitted token ends a sequence early")


def compacting_case(model_type: str, beams: int, steps: int = 24, **decoder_kwargs):
    """A confident tiny model (some beams end early), left-padded prompts, an EOS that ends some
    sequences early, and a decoder of short periods that compacts at this size (``decoder_kwargs``:
    more of its arguments); and generate's tokens."""
    model = tiny_model(model_type)
    with torch.no_grad():
        model.lm_head.weight.mul_(100)
    ids, mask = left_padded(LENGTHS)
    eos = frequent_token(model, ids, mask, steps, beams)
    decoder = decoding.Decoder(model, ids.shape[0], ids.shape[1] + 3, beams, steps, eos, PAD, window=4, **decoder_kwargs)
    decoder.slots.bucket = 2
    return decoder, ids, mask, reference(model, ids, mask, beams, steps, eos)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("beams", [1, 4])
@pytest.mark.parametrize("early_eos", [False, True])
def test_tokens_equal_generate(model_type, beams, early_eos):
    model = tiny_model(model_type)
    if early_eos:  # a confident model: beams that end early can win
        with torch.no_grad():
            model.lm_head.weight.mul_(100)
    ids, mask = left_padded(LENGTHS)
    steps = 20
    eos = frequent_token(model, ids, mask, steps, beams) if early_eos else EOS
    expected = reference(model, ids, mask, beams, steps, eos)
    assert torch.equal(ours(model, ids, mask, beams, steps, eos, window=8, check_every=4), expected)


def test_windows_checks_prefill_chunks_and_reuse_do_not_change_tokens(monkeypatch):
    model = tiny_model("llama")
    ids, mask = left_padded(LENGTHS)
    eos = frequent_token(model, ids, mask, 16)
    expected = ours(model, ids, mask, 4, 16, eos, window=32, check_every=100)
    assert torch.equal(ours(model, ids, mask, 4, 16, eos, window=1, check_every=1), expected)
    monkeypatch.setattr(decoding, "PREFILL_TOKENS", 2 * ids.shape[1])  # prefill two prompts at a time
    assert torch.equal(ours(model, ids, mask, 4, 16, eos), expected)
    monkeypatch.undo()
    other_ids, other_mask = left_padded([3, 12, 5, 7, 2], seed=1)
    decoder = decoding.Decoder(model, 5, 16, 4, 16, eos, PAD, window=5)
    first = decoder(other_ids, other_mask)
    assert torch.equal(decoder(ids, mask), expected)  # state from the first batch does not leak
    assert not torch.equal(first, expected)


def test_adapted_model_tokens_equal_generate(make_cfg):
    model = tiny_model("llama")
    freeze(model)
    build_adapter(make_cfg("adapter=lora").adapter).inject(model)
    randomize_trainable(model)
    model.eval()
    ids, mask = left_padded(LENGTHS)
    eos = frequent_token(model, ids, mask, 12)
    for beams in (1, 4):
        assert torch.equal(ours(model, ids, mask, beams, 12, eos), reference(model, ids, mask, beams, 12, eos))


def test_models_with_virtual_tokens_or_other_attention_use_generate(make_cfg):
    prompted = tiny_model("llama")
    freeze(prompted)
    build_adapter(make_cfg("adapter=prompt", "adapter.init=random").adapter).inject(prompted)
    assert decoding.supports(tiny_model("llama"), 8192) and decoding.supports(tiny_model("qwen2"), 8192)
    mistral = tiny_model("mistral")
    mistral.config.sliding_window = 64
    assert decoding.supports(mistral, 64) and not decoding.supports(mistral, 65)  # window attention: generate
    assert not decoding.supports(prompted, 16)
    assert not decoding.supports(tiny_model("bloom"), 16) and not decoding.supports(tiny_model("gpt2"), 16)


def test_grouped_attention_equals_each_beam_attending_its_own_keys():
    g = torch.Generator().manual_seed(0)
    prompts, beams, heads, kv_heads, slots, dim = 2, 3, 4, 2, 7, 5
    query = torch.randn(prompts * beams, heads, 1, dim, generator=g)
    key, value = (torch.randn(prompts, kv_heads, slots, dim, generator=g) for _ in range(2))
    mask = torch.rand(prompts, 1, beams, slots, generator=g) > 0.3
    mask[..., 0] = True
    out, _ = decoding.grouped_attention(None, query, key, value, mask, scaling=0.5)
    for row in range(prompts * beams):
        p, b = divmod(row, beams)
        k, v = (t[p].repeat_interleave(heads // kv_heads, dim=0) for t in (key, value))  # (heads, slots, dim)
        scores = (query[row] @ k.transpose(-1, -2)) * 0.5  # (heads, 1, slots)
        scores = scores.masked_fill(~mask[p, 0, b], float("-inf"))
        expected = scores.softmax(-1) @ v  # (heads, 1, dim)
        torch.testing.assert_close(out[row, 0], expected[:, 0], rtol=1e-5, atol=1e-6)


def test_a_batch_that_does_not_fit_is_halved(monkeypatch, caplog):
    model = tiny_model("llama")
    ids, mask = left_padded(LENGTHS)
    real_call, tried = decoding.Decoder.__call__, []

    def fits_two(self, input_ids, attention_mask):
        tried.append(self.prompts)
        if self.prompts > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_call(self, input_ids, attention_mask)

    tokenizer = _IdsTokenizer(ids, mask)
    prompts = [str(i) for i in range(len(LENGTHS))]
    expected = evaluate.generate(model, tokenizer, prompts, 5, 1, 6, torch.device("cpu"), "transformers")
    monkeypatch.setattr(decoding.Decoder, "__call__", fits_two)
    assert evaluate.generate(model, tokenizer, prompts, 5, 1, 6, torch.device("cpu")) == expected
    assert tried == [5, 2, 3, 1, 2]  # 5 -> 2 + 3, then 3 -> 1 + 2
    assert "out of memory at batch 5" in caplog.text


class _IdsTokenizer:
    """A tokenizer over fixed rows: prompt "i" is row i of ``ids`` (its real tokens)."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor):
        self.rows = [row[m.bool()] for row, m in zip(ids, mask)]
        self.pad_token_id, self.eos_token_id, self.bos_token_id, self.padding_side = PAD, EOS, 1, "left"

    def __call__(self, prompts, return_tensors=None, padding=False):
        rows = [self.rows[int(p)] for p in ([prompts] if isinstance(prompts, str) else prompts)]
        if return_tensors is None:
            return {"input_ids": rows[0].tolist()}
        ids, mask = left_padded([len(r) for r in rows])
        for i, r in enumerate(rows):
            ids[i, ids.shape[1] - len(r):] = r
        return _Encoding(input_ids=ids, attention_mask=mask)

    def batch_decode(self, sequences, skip_special_tokens=True):
        return [" ".join(str(int(t)) for t in row if int(t) not in (PAD, EOS)) for row in sequences]


class _Encoding(dict):
    def to(self, device):
        return self


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_steps_equal_eager_steps():
    model = copy.deepcopy(tiny_model("llama")).cuda()
    ids, mask = left_padded(LENGTHS)
    for beams in (1, 4):
        graphed = ours(model, ids, mask, beams, 20, EOS, window=8, cuda_graphs=True)
        assert torch.equal(graphed, ours(model, ids, mask, beams, 20, EOS, window=8, cuda_graphs=False))


def test_a_failed_graph_capture_falls_back_to_eager_steps(monkeypatch, caplog):
    model = tiny_model("llama")
    ids, mask = left_padded(LENGTHS)
    eager = ours(model, ids, mask, 4, 12, EOS, window=4, cuda_graphs=False)
    captures = []

    def capture_fails(self):  # a capture records kernels without running them: the state is the eager step's
        captures.append(self.slots.key)
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(decoding.Decoder, "_capture", capture_fails)
    assert torch.equal(ours(model, ids, mask, 4, 12, EOS, window=4, cuda_graphs=True), eager)
    assert "without CUDA graphs (capture failed: CUDA error: operation not permitted" in caplog.text
    assert captures == [(0, 16)]  # tried once, then every step eagerly
    monkeypatch.setattr(decoding.Decoder, "_capture", lambda self: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")))
    with pytest.raises(torch.OutOfMemoryError):  # out of memory is not a capture problem: the batch is halved
        ours(model, ids, mask, 4, 12, EOS, cuda_graphs=True)


def test_a_decoder_is_reused_for_shorter_prompts_with_the_same_tokens(monkeypatch):
    model = tiny_model("llama")
    ids, mask = left_padded(LENGTHS)
    tokenizer, prompts = _IdsTokenizer(ids, mask), [str(i) for i in range(len(LENGTHS))]
    expected = evaluate.generate(model, tokenizer, prompts, 1, 4, 6, torch.device("cpu"), "transformers")
    built, real_init = [], decoding.Decoder.__init__

    def counting_init(self, model, prompts, prompt_slots, *args, **kwargs):
        built.append(prompt_slots)
        real_init(self, model, prompts, prompt_slots, *args, **kwargs)

    monkeypatch.setattr(decoding.Decoder, "__init__", counting_init)
    monkeypatch.setattr(evaluate, "PROMPT_SLOT_MULTIPLE", 4)
    for reuse, builds in ((0, [16, 12, 8, 4]), (100, [16])):  # lengths 13, 9, 6, 4, 1 one at a time
        built.clear()
        monkeypatch.setattr(evaluate, "REUSE_SLOTS", reuse)
        assert evaluate.generate(model, tokenizer, prompts, 1, 4, 6, torch.device("cpu")) == expected
        assert built == builds


def test_batches_hold_no_more_prompts_than_their_kv_cache_fits_in_gpu_memory(monkeypatch):
    model = tiny_model("llama")
    ids, mask = left_padded(LENGTHS)
    tokenizer, prompts = _IdsTokenizer(ids, mask), [str(i) for i in range(len(LENGTHS))]
    expected = evaluate.generate(model, tokenizer, prompts, 5, 4, 6, torch.device("cpu"), "transformers")
    slots = evaluate.PROMPT_SLOT_MULTIPLE  # the longest prompt (13 tokens) rounded up
    one = decoding.Decoder(model, 1, slots, 4, 6, EOS, PAD, cuda_graphs=False).cache
    logits = 4 * 4 * VOCAB * 4  # float32 logits, four copies per beam
    per_prompt = one.keys.nbytes + one.values.nbytes + logits
    monkeypatch.setattr(evaluate, "free_gpu_bytes", lambda device: decoding.WORKSPACE_BYTES + 5 * per_prompt // 2)
    built, real_init = [], decoding.Decoder.__init__

    def counting_init(self, model, prompts, *args, **kwargs):
        built.append(prompts)
        real_init(self, model, prompts, *args, **kwargs)

    monkeypatch.setattr(decoding.Decoder, "__init__", counting_init)
    assert evaluate.generate(model, tokenizer, prompts, 5, 4, 6, torch.device("cpu")) == expected
    assert built == [2]  # batches of 2, 2 and 1 (filled up), one decoder reused


def test_fastest_step_backend_skips_kernels_that_refuse_and_keeps_the_quickest():
    from torch.nn.attention import SDPBackend

    g = torch.Generator().manual_seed(1)
    query, key, value = torch.randn(2, 4, 4, 16, generator=g), *(torch.randn(2, 2, 9, 16, generator=g) for _ in range(2))
    mask = torch.rand(2, 1, 4, 9, generator=g) < 0.5
    mask[..., -1] = True
    backends = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)  # no cuDNN on a CPU

    def timer_returning(*times):
        queue = list(times)

        def timer(fn):
            fn()  # raises for a backend that cannot run these inputs
            return queue.pop(0)
        return timer

    pick = decoding.fastest_step_backend
    assert pick(query, key, value, mask, 0.25, backends, timer_returning(2.0, 1.0)) == SDPBackend.MATH
    assert pick(query, key, value, mask, 0.25, backends, timer_returning(1.0, 2.0)) == SDPBackend.FLASH_ATTENTION
    assert pick(query, key, value, mask, 0.25, backends[:1], timer_returning()) is None


def test_the_chosen_step_backend_runs_every_decoding_step(monkeypatch):
    from torch.nn.attention import SDPBackend

    model = tiny_model("llama")
    ids, mask = left_padded(LENGTHS)
    expected = reference(model, ids, mask, 4, 10, EOS)
    monkeypatch.setattr(decoding.Decoder, "_choose_step_backend", lambda self: SDPBackend.MATH)
    assert torch.equal(ours(model, ids, mask, 4, 10, EOS), expected)
    monkeypatch.setattr(decoding.Decoder, "_choose_step_backend", lambda self: SDPBackend.CUDNN_ATTENTION)
    with pytest.raises(RuntimeError, match="No viable backend"):  # cuDNN has no CPU kernel: the choice is applied
        ours(model, ids, mask, 4, 10, EOS)
