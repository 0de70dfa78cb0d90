"""A run's image-text records: training file (or the embedded ``shapes`` task), validation split and
evaluation sets, all read and checked before any weight loads.

Evaluation sets by name (files under ``paths.data_root`` in the LLaVA conversation format; their
answer kind says how they are scored, a record's own ``kind`` wins). ``dataset.eval_file`` replaces
the file of the one set named; ``dataset.eval_image_dir`` (default ``dataset.image_dir``) is the
folder their images are relative to.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adapters_lab.config import DatasetConfig, EvalConfig, PathsConfig
from adapters_lab.data.mllm import check_conversations
from adapters_lab.data.records import DataError, read_json_records
from adapters_lab.data.shapes import shapes_records
from adapters_lab.data.sources import TaskData, split_validation


@dataclass(frozen=True)
class ImageTextSet:
    file: str | None  # under paths.data_root; None: generated (shapes) or only by dataset.eval_file
    kind: str  # letter | vqa | exact | caption | record (each record's own kind)
    max_new_tokens: int


SHAPES = "shapes"
IMAGE_TEXT_SETS = {
    "scienceqa": ImageTextSet("scienceqa/llava_test_CQM-A.json", "letter", 16),
    "iconqa": ImageTextSet("iconqa/llava_test.json", "letter", 16),  # fill-in-the-blank records: kind exact
    "vizwiz": ImageTextSet("vizwiz/llava_val.json", "vqa", 16),
    "okvqa": ImageTextSet("okvqa/llava_val.json", "vqa", 16),
    "vqav2": ImageTextSet("vqav2/llava_val.json", "vqa", 16),
    "ocrvqa": ImageTextSet("ocrvqa/llava_test.json", "exact", 32),
    "flickr30k": ImageTextSet("flickr30k/llava_test.json", "caption", 64),
    SHAPES: ImageTextSet(None, "record", 8),
    "mllm_file": ImageTextSet(None, "exact", 32),
}


def image_text_set(name: str) -> ImageTextSet:
    if name not in IMAGE_TEXT_SETS:
        raise DataError(f"dataset.eval_sets: unknown image-text evaluation set {name!r} "
                        f"(known: {sorted(IMAGE_TEXT_SETS)})")
    return IMAGE_TEXT_SETS[name]


def _read(path: Path, key: str, dataset: DatasetConfig, image_dir: str | None, skipped: dict) -> tuple[list, int]:
    result = check_conversations(read_json_records(path, key), str(path), key, dataset.max_bad_record_share,
                                 image_dir, dataset.text_only_without_images)
    if result.skipped:
        skipped[str(path)] = len(result.skipped)
    return result.records, result.text_only_dropped


def eval_file(name: str, dataset: DatasetConfig, paths: PathsConfig) -> Path:
    spec = image_text_set(name)
    if dataset.eval_file:
        return Path(dataset.eval_file).expanduser()
    if spec.file is None:
        raise DataError(f"dataset.eval_sets: {name} has no file of its own; set dataset.eval_file")
    return Path(paths.data_root) / spec.file


def load_image_text_data(dataset: DatasetConfig, eval_cfg: EvalConfig, paths: PathsConfig, seed: int,
                         needs_train: bool = True) -> TaskData:
    """Every record the run needs, checked; DataError naming the key and path."""
    skipped: dict[str, int] = {}
    text_only = {}
    train: list[dict] = []
    size, kinds = dataset.shapes.image_size, list(dataset.shapes.questions)
    if needs_train:
        if dataset.train == SHAPES:
            train = shapes_records(dataset.shapes.num_train, kinds, size, dataset.shapes.seed, "train")
        else:
            key = f"dataset.train={dataset.train}"
            train, text_only["train"] = _read(Path(dataset.train).expanduser(), key, dataset, dataset.image_dir,
                                              skipped)
        train = train[: dataset.limit_train] if dataset.limit_train is not None else train
    eval_sets: dict[str, list[dict]] = {}
    for name in dataset.eval_sets:
        if name == SHAPES:
            records = shapes_records(dataset.shapes.num_test, kinds, size, dataset.shapes.seed, "test")
        else:
            if image_text_set(name).kind == "caption":
                from adapters_lab.multimodal.metrics import UNSUPPORTED
                raise DataError(f"dataset.eval_sets: {name}: {UNSUPPORTED['caption']}")
            records, text_only[name] = _read(eval_file(name, dataset, paths), f"dataset.eval_sets[{name}]", dataset,
                                             dataset.eval_image_dir or dataset.image_dir, skipped)
        eval_sets[name] = records[: eval_cfg.limit] if eval_cfg.limit else records
    train, val = split_validation(train, dataset.val_set_size if needs_train else 0, seed, dataset.train)
    data = TaskData(train=train, val=val, eval_sets=eval_sets, skipped=skipped)
    data.text_only_dropped = {k: v for k, v in text_only.items() if v}
    return data
