"""Image-text records in the LLaVA conversation format, their tokens and the image-text collator.

A record is ``{"id", "image"?, "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}``; ``image`` is a path relative to ``dataset.image_dir`` (or,
for the embedded ``shapes`` task, the PIL image itself); text-only records may sit in the same
file. Evaluation records may add ``answers`` (VQA: the human answers) and ``kind`` (how to score).
A record whose image is missing or unreadable is reported (file, record id), skipped and counted;
more than ``dataset.max_bad_record_share`` of them fails before any weight loads.

Tokens follow the model's ``ChatFormat``; the loss is on the assistant turns only (their text and
end marker), as LLaVA's ``preprocess_v1`` and Qwen2-VL's fine-tuning recipes mask it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from adapters_lab.data.records import DataError, RecordSet
from adapters_lab.data.tokenize import IGNORE_INDEX, PaddedCollator
from adapters_lab.models.image_text import IMAGE_PLACEHOLDER, MultimodalProcessor

log = logging.getLogger(__name__)
ROLES = ("human", "gpt")


def conversation_problem(item) -> str | None:
    """Why a raw item is not a conversation record (alternating human/gpt string turns), or None."""
    if not isinstance(item, dict):
        return f"not an object ({type(item).__name__})"
    turns = item.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        return "'conversations' must be a list of at least two turns"
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") != ROLES[index % 2] or not isinstance(turn.get("value"), str):
            return f"turn {index} must be {{'from': {ROLES[index % 2]!r}, 'value': str}}"
    if len(turns) % 2:
        return "the last turn must be the assistant's ('gpt')"
    if "image" in item and not isinstance(item["image"], (str, Image.Image)):
        return f"'image' is {type(item['image']).__name__}, expected a path"
    if "image" not in item and any(IMAGE_PLACEHOLDER in t["value"] for t in turns):
        return f"the text holds {IMAGE_PLACEHOLDER} but the record has no image"
    return None


def image_problem(image, image_dir: Path) -> tuple[object, str | None]:
    """(the image or its resolved path, why it cannot be used or None); the file is decoded once."""
    if isinstance(image, Image.Image):
        return image, None
    path = image_dir / image
    if not path.is_file():
        return path, f"image file not found: {path}"
    try:
        with Image.open(path) as opened:
            opened.load()
    except (UnidentifiedImageError, OSError, ValueError) as err:
        return path, f"image file unreadable: {path} ({err})"
    return path, None


def check_conversations(items: list, source: str, key: str, max_bad_share: float, image_dir: str | None,
                        text_only_without_images: bool) -> RecordSet:
    """Valid records (``image`` resolved, ``answer`` = the last assistant turn) and the skipped ones."""
    if not items:
        raise DataError(f"{key}: {source}: contains no records")
    folder = Path(image_dir).expanduser() if image_dir else None
    has_folder = folder is not None and folder.is_dir()
    with_images = sum(isinstance(item, dict) and "image" in item for item in items)
    if with_images and not has_folder and not text_only_without_images:
        raise DataError(f"{key}: {source}: {with_images} records have an image but dataset.image_dir={image_dir} "
                        "is not a folder (dataset.text_only_without_images=true keeps the text-only records)")
    result, dropped = RecordSet(source=source), 0
    for index, item in enumerate(items):
        problem = conversation_problem(item)
        image = None
        if problem is None and "image" in item:
            if not has_folder and not isinstance(item["image"], Image.Image):
                dropped += 1
                continue
            image, problem = image_problem(item["image"], folder)
        if problem is not None:
            result.skipped.append((index, f"record {item.get('id', index) if isinstance(item, dict) else index}: "
                                          f"{problem}"))
            continue
        result.records.append({**item, "id": str(item.get("id", index)), "image": image,
                               "answer": item.get("answer", item["conversations"][-1]["value"])})
    if dropped:
        log.warning("%s: %s: dataset.image_dir=%s is not a folder: using the %d text-only records, dropping %d with "
                    "an image (dataset.text_only_without_images=true)", key, source, image_dir,
                    len(items) - dropped, dropped)
    _check_share(result, len(items), key, max_bad_share)
    if not result.records:
        raise DataError(f"{key}: {source}: no usable record (of {len(items)}; {dropped} need the absent images)")
    result.text_only_dropped = dropped
    return result


def _check_share(result: RecordSet, total: int, key: str, max_bad_share: float) -> None:
    share = len(result.skipped) / total
    examples = "; ".join(why for _, why in result.skipped[:3])
    if share > max_bad_share:
        raise DataError(f"{key}: {result.source}: {len(result.skipped)} of {total} records are unusable "
                        f"({share:.1%} > dataset.max_bad_record_share={max_bad_share}); {examples}")
    if result.skipped:
        log.warning("%s: %s: skipping %d of %d records (%.1f%% <= dataset.max_bad_record_share=%s): %s%s", key,
                    result.source, len(result.skipped), total, 100 * share, max_bad_share, examples,
                    "; ..." if len(result.skipped) > 3 else "")


def load_image(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as opened:
        return opened.convert("RGB")


def image_text(value: str, image, processor: MultimodalProcessor) -> str:
    """A human turn with its ``<image>`` placeholder as the model's image tokens, expanded to their count."""
    if image is None:
        return value
    if IMAGE_PLACEHOLDER not in value:
        value = f"{IMAGE_PLACEHOLDER}\n{value}"  # LLaVA's rule: the image goes first
    width, height = image.size if isinstance(image, Image.Image) else Image.open(image).size
    pads = processor.image_token * processor.num_image_tokens(height, width)
    expanded = processor.chat.image.replace(processor.image_token, pads)
    return value.replace(IMAGE_PLACEHOLDER, expanded, 1)


def segments(record: dict, processor: MultimodalProcessor, with_last_answer: bool, suffix: str = "") -> list:
    """(text, trained) pieces of a record: the prefix and user turns untrained, the answers trained;
    without the last answer it is the generation prompt."""
    fmt, turns = processor.chat, record["conversations"]
    pieces = [(fmt.prefix, False)]
    for index in range(0, len(turns), 2):
        user = turns[index]["value"]
        if index == 0:
            user = image_text(user, record["image"], processor)
        last = index + 2 == len(turns)
        pieces.append((fmt.user.format(user + (suffix if last else "")), False))
        if with_last_answer or not last:
            pieces.append((fmt.answer.format(turns[index + 1]["value"]), True))
    return pieces


def encode(pieces: list, tokenizer) -> tuple[list[int], list[int]]:
    ids, labels = [], []
    for index, (text, trained) in enumerate(pieces):
        piece = tokenizer(text, add_special_tokens=index == 0)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


@dataclass
class ImageTextFeatures:
    examples: list[dict]  # input_ids, labels, image
    truncated: int  # cut at cutoff_len after the image tokens
    prompt_overflow: int  # image tokens or the whole prompt past cutoff_len: dropped


def tokenize_conversations(records: list[dict], processor: MultimodalProcessor, cutoff_len: int,
                           max_overflow_share: float, key: str) -> ImageTextFeatures:
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    examples, truncated, overflow = [], 0, 0
    for record in records:
        ids, labels = encode(segments(record, processor, with_last_answer=True), processor.tokenizer)
        last_image = max((i for i, t in enumerate(ids) if t == image_id), default=-1)
        if last_image >= cutoff_len or all(label == IGNORE_INDEX for label in labels[:cutoff_len]):
            overflow += 1
            continue
        truncated += len(ids) > cutoff_len
        examples.append({"input_ids": ids[:cutoff_len], "labels": labels[:cutoff_len], "image": record["image"]})
    if records and overflow / len(records) > max_overflow_share:
        raise DataError(f"{key}: {overflow} of {len(records)} conversations have their image tokens or their whole "
                        f"prompt past dataset.cutoff_len={cutoff_len}; raise dataset.cutoff_len")
    return ImageTextFeatures(examples, truncated, overflow)


class ImageTextCollator:
    """Right-pads token ids as ``PaddedCollator`` does and adds the image inputs of the rows that
    have an image (``pixel_values``, and ``image_grid_thw`` for Qwen2-VL), in row order."""

    def __init__(self, processor: MultimodalProcessor, pad_token_id: int):
        self.processor = processor
        self.pad = PaddedCollator(pad_token_id)

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        collated = self.pad(batch)
        images = [load_image(x["image"]) for x in batch if x.get("image") is not None]
        if images:
            collated.update(self.processor.images(images))
            collated.update(self.processor.token_types(collated["input_ids"]))
        return collated


def generation_inputs(prompt_ids: list[list[int]], images: list, processor: MultimodalProcessor) -> dict:
    """Left-padded prompts with their attention mask and image inputs, for ``generate``."""
    pad = processor.tokenizer.pad_token_id
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(prompt_ids):
        input_ids[row, width - len(ids):] = torch.tensor(ids)
        mask[row, width - len(ids):] = 1
    inputs = {"input_ids": input_ids, "attention_mask": mask}
    present = [load_image(image) for image in images if image is not None]
    if present:
        inputs.update(processor.images(present))
        inputs.update(processor.token_types(input_ids))
    return inputs
