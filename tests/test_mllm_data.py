"""Image-text records: LLaVA conversations checked (missing or unreadable images reported, skipped,
counted), loss on assistant turns only, the collator's image inputs, the shapes task, the scores."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from adapters_lab.data.mllm import ImageTextCollator, check_conversations, tokenize_conversations
from adapters_lab.data.records import DataError
from adapters_lab.data.tokenize import IGNORE_INDEX
from adapters_lab.multimodal.metrics import normalize_vqa, parse_letter, score_answer, vqa_accuracy
from tests.conftest import SHARED_DATA
from tests.mm_helpers import TINY, build, shapes


def _conversation(i, image=None, answer="B"):
    record = {"id": f"r{i}", "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + "Q?"},
                                               {"from": "gpt", "value": answer}]}
    return {**record, "image": image} if image else record


@pytest.fixture
def image_folder(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    return tmp_path


def test_missing_and_unreadable_images_are_reported_skipped_and_counted(image_folder, caplog):
    items = [_conversation(0, "ok.png"), _conversation(1, "gone.png"), _conversation(2, "broken.png"),
             _conversation(3)]
    with caplog.at_level(logging.WARNING):
        result = check_conversations(items, "f.json", "dataset.train", 0.5, str(image_folder), False)
    assert [r["id"] for r in result.records] == ["r0", "r3"]
    assert [i for i, _ in result.skipped] == [1, 2]
    assert "record r1: image file not found" in result.skipped[0][1] and "gone.png" in result.skipped[0][1]
    assert "record r2: image file unreadable" in result.skipped[1][1]
    assert "skipping 2 of 4" in caplog.text
    with pytest.raises(DataError, match=r"2 of 4 records are unusable .*max_bad_record_share=0.1"):
        check_conversations(items, "f.json", "dataset.train", 0.1, str(image_folder), False)


def test_absent_image_folder_fails_naming_it_or_keeps_text_only(tmp_path):
    items = [_conversation(0, "a.png"), _conversation(1)]
    with pytest.raises(DataError, match=f"dataset.image_dir={tmp_path / 'none'} is not a folder"):
        check_conversations(items, "f.json", "k", 0.0, str(tmp_path / "none"), False)
    result = check_conversations(items, "f.json", "k", 0.0, str(tmp_path / "none"), True)
    assert [r["id"] for r in result.records] == ["r1"] and result.text_only_dropped == 1


def test_malformed_conversations_are_named():
    bad = [{"id": "x", "conversations": [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]},
           {"id": "y", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}]
    result = check_conversations(bad + [_conversation(2)], "f.json", "k", 1.0, None, False)
    assert "turn 0 must be" in result.skipped[0][1] and "no image" in result.skipped[1][1]


@pytest.mark.parametrize("name", TINY)
def test_loss_only_on_assistant_turns_and_collated_images(name):
    _, processor = build(name)
    records = shapes(name, 4)
    features = tokenize_conversations(records, processor, 512, 0.0, "k")
    end = "</s>" if name == "tiny_llava" else "<|im_end|>\n"
    for record, example in zip(records, features.examples):
        trained = [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX]
        assert processor.tokenizer.decode(trained).strip() == f"{record['answer']}{end}".strip()
    batch = ImageTextCollator(processor, processor.tokenizer.pad_token_id)(features.examples)
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    tokens_per_image = int((batch["input_ids"] == image_id).sum()) // len(records)
    assert tokens_per_image == processor.num_image_tokens(*records[0]["image"].size)
    if name == "tiny_llava":
        assert batch["pixel_values"].shape[0] == len(records)
    else:
        assert batch["image_grid_thw"].shape[0] == len(records)
        assert int(batch["mm_token_type_ids"].sum()) == tokens_per_image * len(records)


def test_shapes_answers_depend_on_the_image_only():
    records = shapes("tiny_llava", 40, kinds=("colour",))
    assert len({r["conversations"][0]["value"] for r in records}) == 1
    assert len({r["answer"] for r in records}) == 4
    again = shapes("tiny_llava", 40, kinds=("colour",))
    assert all(np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) for a, b in zip(records, again))


@pytest.mark.skipif(not (SHARED_DATA / "scienceqa" / "llava_test_CQM-A.json").is_file(), reason="ScienceQA text absent")
def test_scienceqa_text_only_questions_when_images_are_absent(tmp_path):
    items = json.loads((SHARED_DATA / "scienceqa" / "llava_test_CQM-A.json").read_text())
    result = check_conversations(items, "sqa", "k", 0.0, str(tmp_path / "images"), True)
    assert len(result.records) == 4241 - 2017 and result.text_only_dropped == 2017
    assert {r["answer"] for r in result.records} <= set("ABCDE")


def test_letter_vqa_and_exact_scores():
    assert parse_letter("B") == "B" and parse_letter("C. blue") == "C" and parse_letter("The answer is D.") == "D"
    assert parse_letter("blue") is None
    assert normalize_vqa("Two dogs!") == "2 dogs" and normalize_vqa("the cat's") == "cat's"
    # 3 humans said "2": leaving one of them out leaves 2 matches (2/3), leaving another out leaves 3 (1.0)
    assert vqa_accuracy("two", ["2"] * 3 + ["3"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1.0) / 10)
    assert vqa_accuracy("3", ["2"] * 3 + ["3"] * 7) == 1.0 and vqa_accuracy("4", ["2"] * 10) == 0.0
    assert score_answer("exact", "Harry Potter.", {"answer": "harry potter"}) == ("harry potter", 1.0)
    with pytest.raises(ValueError, match="not supported yet"):
        score_answer("caption", "a dog", {"answer": "a dog"})


@pytest.mark.parametrize("name", ["scienceqa", "shapes", "iconqa", "vizwiz", "okvqa", "ocrvqa", "vqav2", "flickr30k"])
def test_every_image_text_dataset_config_loads_or_names_the_missing_file(name, make_cfg):
    from adapters_lab.multimodal.data import load_image_text_data

    cfg = make_cfg("model=tiny_llava", f"dataset={name}", "eval.limit=2")
    if name == "shapes":
        data = load_image_text_data(cfg.dataset, cfg.eval, cfg.paths, cfg.seed)
        assert data.train and len(data.eval_sets["shapes"]) == 2
        return
    with pytest.raises(DataError, match="file not found") as err:
        load_image_text_data(cfg.dataset, cfg.eval, cfg.paths, cfg.seed)
    assert cfg.dataset.train in str(err.value)
    if name == "scienceqa" and (SHARED_DATA / "scienceqa" / "llava_test_CQM-A.json").is_file():  # zero-shot: text only
        data = load_image_text_data(cfg.dataset, cfg.eval, cfg.paths, cfg.seed, needs_train=False)
        assert len(data.eval_sets["scienceqa"]) == 2 and data.text_only_dropped == {"scienceqa": 2017}
