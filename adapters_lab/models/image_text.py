"""Image-text models (``model.kind=image_text``): LLaVA (``LlavaForConditionalGeneration``) and
Qwen2-VL (``Qwen2VLForConditionalGeneration``) from a local folder or the hub, or tiny random-init
ones (``model.tiny`` with ``tiny.vision``) with a local tokenizer that knows the image token, a
local image processor and a processor: nothing downloaded.

``build_image_text`` returns (model, processor): a ``MultimodalProcessor`` holding the text tokenizer
and the image processor (transformers' own processor classes are not used: Qwen2-VL's needs
torchvision for its video half, and the image token count is all that is needed of them). Each
family's conversation format is a ``ChatFormat`` (the facts of LLaVA-1.5's ``llava_v1`` template
and Qwen2-VL's ChatML template).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoTokenizer,
    CLIPImageProcessorPil,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from adapters_lab.config import ModelConfig, TinyModelConfig
from adapters_lab.models.causal_lm import build_tiny_tokenizer, ensure_pad_token, torch_dtype

FAMILIES = ("llava", "qwen2_vl")
IMAGE_PLACEHOLDER = "<image>"  # where a LLaVA conversation record puts its image


@dataclass(frozen=True)
class ChatFormat:
    """One family's conversation text: ``prefix`` once, then per round ``user`` (with ``{}`` for the
    message) and ``answer`` (with ``{}``; the only text trained on); ``image`` replaces the
    record's ``<image>`` placeholder."""

    prefix: str
    user: str
    answer: str
    image: str


LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")
CHAT_FORMATS = {
    # LLaVA-1.5 (conv_llava_v1): "SYSTEM USER: <image>\nQ ASSISTANT: A</s>USER: ..."
    "llava": ChatFormat(prefix=LLAVA_SYSTEM + " ", user="USER: {} ASSISTANT:", answer=" {}</s>", image="<image>"),
    # Qwen2-VL-Instruct (ChatML), the image as vision start, image pads, vision end
    "qwen2_vl": ChatFormat(prefix="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
                           user="<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n", answer="{}<|im_end|>\n",
                           image="<|vision_start|><|image_pad|><|vision_end|>"),
}
QWEN_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>")


@dataclass
class MultimodalProcessor:
    """A model's tokenizer, image processor and conversation format, and its image token count."""

    family: str
    tokenizer: object
    image_processor: object
    chat: ChatFormat
    patch_size: int = 14  # LLaVA: the vision tower's patch
    extra_image_tokens: int = 0  # LLaVA: +1 CLS token with feature strategy "full", 0 with "default"

    @property
    def image_token(self) -> str:
        return IMAGE_PLACEHOLDER if self.family == "llava" else "<|image_pad|>"

    def num_image_tokens(self, height: int, width: int) -> int:
        """Image tokens the text holds for one image of this size, as transformers' processors count them."""
        if self.family == "llava":
            crop = self.image_processor.crop_size
            return (crop["height"] // self.patch_size) * (crop["width"] // self.patch_size) + self.extra_image_tokens
        merge = self.image_processor.merge_size
        return self.image_processor.get_number_of_image_patches(height, width, {}) // merge**2

    def images(self, images: list) -> dict:
        """The model's image inputs for a list of PIL images: ``pixel_values`` (and ``image_grid_thw``)."""
        return dict(self.image_processor(images, return_tensors="pt"))

    def token_types(self, input_ids: torch.Tensor) -> dict:
        """Qwen2-VL's ``mm_token_type_ids`` (1 at image tokens, as its processor returns them) for M-RoPE."""
        if self.family != "qwen2_vl":
            return {}
        image_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        return {"mm_token_type_ids": (input_ids == image_id).int()}

    def save_pretrained(self, directory) -> None:
        self.tokenizer.save_pretrained(directory)
        self.image_processor.save_pretrained(directory)


def family_of(cfg: ModelConfig) -> str:
    """``llava`` or ``qwen2_vl``, from ``tiny.model_type`` or the checkpoint's config (no weights read)."""
    if cfg.tiny is not None:
        model_type = cfg.tiny.model_type
    else:
        source = cfg.local_path or cfg.hub_id
        if not source:
            raise ValueError(f"model={cfg.name}: set model.local_path or model.hub_id")
        model_type = AutoConfig.from_pretrained(source, revision=cfg.revision,
                                                trust_remote_code=cfg.trust_remote_code).model_type
    if model_type not in FAMILIES:
        raise ValueError(f"model={cfg.name}: model type {model_type!r} is not an image-text family known here "
                         f"({', '.join(FAMILIES)})")
    return model_type


def _tiny_corpus(fmt: ChatFormat) -> list[str]:
    from adapters_lab.data.shapes import VOCABULARY

    sample = fmt.prefix + fmt.user.format(fmt.image + "\nWhat is this?") + fmt.answer.format("A. red square")
    return [sample, " ".join(VOCABULARY), "A. B. C. D. E. Answer with the option's letter from the given choices"] * 4


def build_tiny_processor(tiny: TinyModelConfig, family: str):
    """The tokenizer (image token and chat markers kept whole) and image processor of a tiny model."""
    fmt, vision = CHAT_FORMATS[family], tiny.vision
    special = (IMAGE_PLACEHOLDER,) if family == "llava" else QWEN_TOKENS
    tokenizer = build_tiny_tokenizer(tiny.vocab_size, special, _tiny_corpus(fmt),
                                     eos_token="</s>" if family == "llava" else "<|im_end|>")
    size = vision.image_size
    if family == "llava":
        images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        return MultimodalProcessor(family, tokenizer, images, fmt, patch_size=vision.patch_size)
    images = Qwen2VLImageProcessorPil(min_pixels=size * size, max_pixels=size * size, patch_size=vision.patch_size,
                                   merge_size=vision.spatial_merge_size, temporal_patch_size=2)
    return MultimodalProcessor(family, tokenizer, images, fmt)


def tiny_config(tiny: TinyModelConfig, family: str, tokenizer):
    vision = tiny.vision
    text = dict(hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
                num_hidden_layers=tiny.num_hidden_layers, num_attention_heads=tiny.num_attention_heads,
                num_key_value_heads=tiny.num_key_value_heads, max_position_embeddings=tiny.max_position_embeddings,
                vocab_size=len(tokenizer), initializer_range=tiny.init_std, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    if family == "llava":
        clip = dict(model_type="clip_vision_model", hidden_size=vision.hidden_size,
                    intermediate_size=vision.intermediate_size, num_hidden_layers=vision.num_hidden_layers,
                    num_attention_heads=vision.num_attention_heads, image_size=vision.image_size,
                    patch_size=vision.patch_size, projection_dim=vision.hidden_size)
        return LlavaConfig(text_config={"model_type": "llama", **text}, vision_config=clip,
                           image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
                           vision_feature_layer=-2, vision_feature_select_strategy="default",
                           pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    half_head = tiny.hidden_size // tiny.num_attention_heads // 2
    section = [half_head // 4, half_head // 4, half_head - 2 * (half_head // 4)]  # temporal, height, width
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
    vit = dict(depth=vision.num_hidden_layers, embed_dim=vision.hidden_size, hidden_size=tiny.hidden_size,
               num_heads=vision.num_attention_heads, mlp_ratio=max(1, vision.intermediate_size // vision.hidden_size),
               patch_size=vision.patch_size, spatial_merge_size=vision.spatial_merge_size, temporal_patch_size=2)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("image_token_id", "<|image_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"))}
    return Qwen2VLConfig(text_config=text, vision_config=vit, video_token_id=ids["image_token_id"], **ids,
                         tie_word_embeddings=False)


def build_tiny_image_text(cfg: ModelConfig, family: str) -> tuple[nn.Module, object]:
    if cfg.tiny.vision is None:
        raise ValueError(f"model={cfg.name}: model.tiny.vision must be set for a tiny image-text model")
    processor = build_tiny_processor(cfg.tiny, family)
    config = tiny_config(cfg.tiny, family, processor.tokenizer)
    config._attn_implementation = cfg.attn_implementation
    config.get_text_config()._attn_implementation = cfg.attn_implementation
    model_class = LlavaForConditionalGeneration if family == "llava" else Qwen2VLForConditionalGeneration
    model = model_class(config).to(torch_dtype(cfg.dtype))
    with torch.no_grad():  # a wider head, as the tiny causal LM's: a frozen random head would bound the logits
        model.get_output_embeddings().weight.normal_(0.0, 2.0 / cfg.tiny.hidden_size**0.5)
    return model, processor


def pretrained_processor(source: str, family: str, config, kwargs: dict) -> MultimodalProcessor:
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    images = AutoImageProcessor.from_pretrained(source, **kwargs)
    if family != "llava":
        return MultimodalProcessor(family, tokenizer, images, CHAT_FORMATS[family])
    full = config.vision_feature_select_strategy == "full"
    return MultimodalProcessor(family, tokenizer, images, CHAT_FORMATS[family],
                               patch_size=config.vision_config.patch_size, extra_image_tokens=int(full))


def build_image_text(cfg: ModelConfig) -> tuple[nn.Module, object]:
    """(model, processor) for an image-text model config; tiny ones are built without files."""
    family = family_of(cfg)
    if cfg.tiny is not None:
        model, processor = build_tiny_image_text(cfg, family)
    else:
        source = cfg.local_path or cfg.hub_id
        kwargs = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForImageTextToText.from_pretrained(
            source, dtype=torch_dtype(cfg.dtype), attn_implementation=cfg.attn_implementation, **kwargs)
        processor = pretrained_processor(source, family, model.config, kwargs)
    ensure_pad_token(processor.tokenizer, cfg.name)
    model.config.pad_token_id = processor.tokenizer.pad_token_id
    model.config.get_text_config().pad_token_id = processor.tokenizer.pad_token_id
    return model, processor
