"""Image-text evaluation: batched generation with images equals batch size 1; the honest image test
(tiny_llava memorises shapes whose answers differ only by the image, through the real
generate-and-parse path, and follows the image when images are swapped); one pipeline run."""

from __future__ import annotations

import json

import pytest
import torch

from adapters_lab.adapters.base import Placement, freeze
from adapters_lab.adapters.lora import LoRA
from adapters_lab.config import EvalConfig, TrainerConfig
from adapters_lab.data.mllm import ImageTextCollator, tokenize_conversations
from adapters_lab.models.parts import parameter_groups, set_connector_trainable
from adapters_lab.multimodal.evaluate import evaluate_image_text_sets, generate_image_text
from adapters_lab.pipeline import run
from adapters_lab.tracking import NullTracker
from adapters_lab.training.loop import train
from adapters_lab.training.settings import check_trainer_config, make_accelerator
from tests.mm_helpers import TINY, build, one_thread, shapes  # noqa: F401  (one_thread: autouse)

CPU = torch.device("cpu")


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("beams", [1, 3])
def test_batched_generation_with_images_equals_batch_size_one(name, beams):
    model, processor = build(name, seed=3)
    records = shapes(name, 6)
    records[2] = {**records[2], "image": None,  # a text-only record in the same batch
                  "conversations": [{"from": "human", "value": "Say a colour."}, {"from": "gpt", "value": "red"}]}
    batched = generate_image_text(model, processor, records, 6, beams, 6, CPU)
    single = [generate_image_text(model, processor, [r], 1, beams, 6, CPU)[0] for r in records]
    assert batched == single
    from adapters_lab.multimodal.evaluate import prompt_ids
    assert len({len(ids) for ids in prompt_ids(records, processor)}) > 2  # the batch is left-padded


def _memorise(model, processor, records, steps: int = 80):
    features = tokenize_conversations(records, processor, 512, 0.0, "test")
    cfg = TrainerConfig(max_steps=steps, batch_size=len(records), micro_batch_size=len(records), lr=3e-3,
                        warmup_steps=0, schedule="constant", device="cpu", progress_bar=False, eval_every=0,
                        checkpoint_every=0, precision="fp32")
    return train(model, features.examples, [], processor.tokenizer.pad_token_id, check_trainer_config(cfg),
                 make_accelerator(cfg),
                 NullTracker(), 0, collate=ImageTextCollator(processor, processor.tokenizer.pad_token_id),
                 param_groups=parameter_groups(model, 3e-3, 1e-2))


def test_honest_image_test_answers_come_from_the_image():
    model, processor = build("tiny_llava")
    freeze(model)
    LoRA(name="lora", rank=8, alpha=16.0, dropout=0.0,
         placement=Placement(modules=["q", "k", "v", "o", "gate", "up", "down"])).inject(model)
    set_connector_trainable(model, True)
    pool = shapes("tiny_llava", 40, kinds=("colour",))
    records = [r for letter in "ABCD" for r in [x for x in pool if x["answer"] == letter][:2]]  # 2 per colour
    assert len({r["conversations"][0]["value"] for r in records}) == 1  # only the image tells them apart
    cfg = EvalConfig(batch_size=8, num_beams=1, max_new_tokens=4)

    def accuracy(items):
        return evaluate_image_text_sets(model, processor, {"shapes": items}, cfg, CPU, None)["shapes"]["accuracy"]

    assert accuracy(records) <= 0.5  # chance is 0.25
    _memorise(model, processor, records)
    assert accuracy(records) == 1.0
    # each image replaced by one of another colour: the answers follow the image, so all are wrong
    swapped = [{**r, "image": records[(i + 2) % len(records)]["image"]} for i, r in enumerate(records)]
    assert accuracy(swapped) <= 0.25
    followed = generate_image_text(model, processor, swapped, 8, 1, 4, CPU)
    assert [t.strip() for t in followed] == [records[(i + 2) % len(records)]["answer"] for i in range(len(records))]


def test_pipeline_run_writes_per_part_counts_predictions_and_connector_weights(make_cfg, tmp_path):
    cfg = make_cfg("model=tiny_llava", "dataset=shapes", "dataset.shapes.num_train=12", "dataset.shapes.num_test=4",
                   "adapter.rank=4", "adapter.alpha=8")
    run(cfg)
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    parts = metrics["params_by_part"]
    assert parts["vision_tower"]["trainable"] == 0
    assert parts["connector"]["trainable"] == parts["connector"]["total"] > 0
    assert metrics["params"]["trainable"] == parts["adapter"]["trainable"] + parts["connector"]["trainable"]
    assert set(metrics["eval"]) == {"shapes", "average"} and metrics["eval"]["shapes"]["n"] == 4
    lines = (out / "predictions" / "shapes.jsonl").read_text().splitlines()
    assert len(lines) == 4 and {"prediction", "label", "score", "kind"} <= set(json.loads(lines[0]))
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert any("multi_modal_projector" in key for key in saved) and any("lora_A" in key for key in saved)


def test_rescore_reads_image_text_predictions(tmp_path):
    from adapters_lab.rescore import rescore

    lines = [{"dataset": "shapes", "kind": "letter", "output": "B", "label": "B"},
             {"dataset": "shapes", "kind": "exact", "output": "left.", "label": "right"},
             {"dataset": "vqav2", "kind": "vqa", "output": "two", "label": "2", "answers": ["2"] * 10}]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    assert rescore(path, "paper") == [{"dataset": "shapes", "accuracy": 0.5, "n": 2},
                                      {"dataset": "vqav2", "accuracy": 1.0, "n": 1}]
