"""Re-score a predictions file without a GPU:
``python -m adapters_lab.rescore PREDICTIONS.jsonl --protocol paper|strict``.

Each line needs ``dataset``, ``output`` (the generated text after "### Response:") and
``label``; ``prompt``, when present, lets ``strict`` map a stated number to a lettered option.
Image-text sets' lines (``kind``: letter, vqa or exact; ``answers`` for VQA) are scored by their own
metric whatever the protocol (``adapters_lab/multimodal/metrics.py``); accuracy is the mean score.
Prints ``{"dataset", "accuracy", "n"}`` as JSON, one line per dataset in the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adapters_lab.answers import ANSWER_KIND, PROTOCOLS, label_parses, score
from adapters_lab.data.records import DataError
from adapters_lab.multimodal.data import IMAGE_TEXT_SETS
from adapters_lab.multimodal.metrics import score_answer

REQUIRED = ("dataset", "output", "label")


def rescore(path: Path, protocol: str) -> list[dict]:
    """Accuracy per dataset under ``protocol``; DataError names the file and line of a bad line."""
    if protocol not in PROTOCOLS:
        raise DataError(f"--protocol={protocol}: expected one of {list(PROTOCOLS)}")
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    totals: dict[str, list[int]] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        missing = [k for k in REQUIRED if not isinstance(row, dict) or not isinstance(row.get(k), str)]
        if missing:
            raise DataError(f"{path}:{lineno}: needs string fields {list(REQUIRED)}; missing or not text: {missing}")
        dataset = row["dataset"]
        if dataset in IMAGE_TEXT_SETS:
            value = score_answer(row.get("kind") or IMAGE_TEXT_SETS[dataset].kind, row["output"],
                                 {"answer": row["label"], "answers": row.get("answers")})[1]
            counts = totals.setdefault(dataset, [0, 0])
            counts[0], counts[1] = counts[0] + value, counts[1] + 1
            continue
        if dataset not in ANSWER_KIND:
            raise DataError(f"{path}:{lineno}: unknown dataset {dataset!r} (known: {sorted(ANSWER_KIND)})")
        if not label_parses(dataset, row["label"]):
            raise DataError(f"{path}:{lineno}: label {row['label']!r} does not parse for {dataset}")
        verdict = score(dataset, row["output"], row["label"], row.get("prompt") or "")[protocol]
        counts = totals.setdefault(dataset, [0, 0])
        counts[0] += verdict["correct"]
        counts[1] += 1
    if not totals:
        raise DataError(f"{path}: contains no predictions")
    return [{"dataset": name, "accuracy": correct / n, "n": n} for name, (correct, n) in totals.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m adapters_lab.rescore", description=__doc__.split("\n\n")[0])
    parser.add_argument("predictions", type=Path, help="a predictions JSONL file written by an evaluation run")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="paper")
    args = parser.parse_args(argv)
    try:
        results = rescore(args.predictions, args.protocol)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for result in results:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
