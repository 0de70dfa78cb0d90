"""The one orchestration path: compose -> check -> build model -> inject adapter -> data ->
train -> evaluate -> write and log results. Everything it calls lives elsewhere."""

from __future__ import annotations

import copy
import logging
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from omegaconf import DictConfig, OmegaConf
from transformers import set_seed

from adapters_lab.adapters import build_adapter, count_parameters, freeze
from adapters_lab.adapters.io import check_export, save_adapter, save_base_model, write_exports
from adapters_lab.checks import check_known_keys, check_on_skeleton, check_settings, check_space
from adapters_lab.config import Config
from adapters_lab.files import probe_writable, write_json_atomic, write_text_atomic
from adapters_lab.kinds import model_kind
from adapters_lab.models import build_model
from adapters_lab.report import MemorySampler, run_report
from adapters_lab.runs import RunFolder, check_checkpoint
from adapters_lab.sweep import metric_value
from adapters_lab.tracking import flatten, make_tracker
from adapters_lab.training.loop import train
from adapters_lab.training.settings import check_trainer_config, make_accelerator
from adapters_lab.typed import typed_config

log = logging.getLogger(__name__)


def shared_output_dir(path: Path, accelerator) -> Path:
    """Process 0's run folder, on every process (each resolves Hydra's timestamped folder itself)."""
    if accelerator.num_processes == 1:
        return path
    return Path(broadcast_object_list([str(path)])[0])


def run(composed: DictConfig) -> float | None:
    """Run one experiment; returns ``metrics[cfg.optimized_metric]`` for sweepers. The composed config is
    checked for keys no schema declares, then turned into typed objects once (``cfg``: every group its
    dataclass, every choice an enum member), which is all the run reads; ``composed`` itself only goes
    into the run folder's fingerprint, ``config.yaml`` and the tracker."""
    check_known_keys(composed)
    cfg = typed_config(composed)
    accelerator = make_accelerator(cfg.trainer)  # the device, worked out once
    out_dir = shared_output_dir(Path(cfg.paths.output_dir), accelerator)
    share = (lambda value: broadcast_object_list([value])[0]) if accelerator.num_processes > 1 else None
    with RunFolder(out_dir, composed, accelerator.is_main_process, share) as folder:
        finished = folder.finished()
        if finished is not None:
            log.warning("%s holds this config's metrics.json: skipping this finished run (overwrite=true redoes it)",
                        out_dir)
            return metric_value(finished, cfg.optimized_metric)
        metrics = run_in(cfg, composed, folder, accelerator)
        folder.commit()
    if accelerator.is_main_process:
        log.info("metrics written to %s", out_dir / "metrics.json")
        print(f"metrics.json: {out_dir / 'metrics.json'}")
    return metric_value(metrics, cfg.optimized_metric)


def check_before_weights(cfg: Config, folder: RunFolder) -> tuple:
    """1. Everything that needs no weights: adapter, trainer and data options, data files, the adapter on
    the meta-device skeleton (placement, attention), prompts against the cutoff, the disk. Returns
    (adapter, model kind, checked trainer settings or None, task data, tokenised features or None)."""
    adapter, trainer = build_adapter(cfg.adapter), None
    kind = model_kind(cfg.model)  # causal LM or image-text: its data, builder, tokens, collator, evaluation
    kind.check(adapter, cfg)
    check_export(adapter, cfg.export.peft, cfg.export.merged)
    if adapter.trains:
        # the checked options, as objects, that train() takes
        trainer = check_trainer_config(cfg.trainer, cfg.dataset.val_set_size)
        adapter.check_training(trainer.cfg)
        if trainer.resume_from is not None:
            check_checkpoint(trainer.resume_from, folder.fingerprint)
    check_settings(cfg)
    data = kind.load_data(cfg, needs_train=adapter.trains)
    skeleton = check_on_skeleton(cfg, build_adapter(copy.deepcopy(cfg.adapter)))  # None for image-text models
    features = tokenize(cfg, kind, data, skeleton[1]) if skeleton and adapter.trains else None
    probe_writable(folder.folder)
    if skeleton:
        check_space(folder.folder, cfg, skeleton[0], sum(len(records) for records in data.eval_sets.values()))
    return adapter, kind, trainer, data, features


def tokenize(cfg: Config, kind, data, tokenizer) -> dict:
    """The training and validation records as the kind's features (fails on prompts that overflow the cutoff)."""
    ds = cfg.dataset
    return {split: kind.features(records, tokenizer, ds, f"dataset.train={ds.train} ({split})")
            for split, records in (("train", data.train), ("val", data.val))}


def run_in(cfg: Config, composed: DictConfig, folder: RunFolder, accelerator) -> dict:
    """The run itself, into ``folder.prepare()`` (the run folder, or its staging area under overwrite);
    ``composed`` (the config as Hydra composed it) is only recorded."""
    main = accelerator.is_main_process
    adapter, kind, trainer, data, features = check_before_weights(cfg, folder)
    out_dir = folder.prepare()
    if main:
        write_text_atomic(out_dir / "config.yaml", OmegaConf.to_yaml(composed, resolve=True))
    accelerator.wait_for_everyone()  # the staging area settled before any process looks for a checkpoint

    set_seed(cfg.seed)
    run_name = f"{cfg.model.name}-{adapter.name}-{cfg.dataset.name}"
    tracker = make_tracker(cfg.logger, OmegaConf.to_container(composed, resolve=True), str(out_dir), run_name, main)

    memory = MemorySampler(accelerator.device)  # reserved GPU memory, sampled for metrics.json's report
    # 2-3. Base model, frozen; the adapter injected into it.
    model, tokenizer = build_model(cfg.model, accelerator.device)  # by model.kind: (model, tokenizer or processor)
    freeze(model)
    if cfg.model.tiny is not None and adapter.trains and main:
        save_base_model(model, tokenizer, out_dir / "base_model")  # random init: others need it to load the adapter
    report = adapter.inject(model, kind.text_tokenizer(tokenizer))
    described = kind.describe(model, cfg)  # image-text: the connector trained or frozen, counts per part
    params = count_parameters(model)
    log.info("%s", report.summary())
    log.info("parameters: %s trainable of %s (%.4f%%)", f"{params['trainable']:,}", f"{params['total']:,}",
             100 * params["trainable"] / params["total"])
    metrics: dict = {"run": run_name, "params": params,
                     "adapter": {"modules": len(report.adapted), "summary": report.summary()}, **described}
    model.to(accelerator.device)

    # 4-5. Data as tokens, then training.
    if adapter.trains:
        features = features or tokenize(cfg, kind, data, tokenizer)
        result = train(model, features["train"].examples, features["val"].examples,
                       kind.text_tokenizer(tokenizer).pad_token_id, trainer, accelerator, tracker, cfg.seed,
                       checkpoint_dir=out_dir / "checkpoints", base_precision=cfg.model.base_precision,
                       **kind.train_options(model, tokenizer, cfg))
        metrics["train"] = asdict(result)
        metrics["data"] = {"train_records": len(data.train), "val_records": len(data.val),
                           "truncated": features["train"].truncated, "prompt_overflow": features["train"].prompt_overflow}
    metrics.setdefault("data", {})["skipped_malformed"] = data.skipped
    metrics["data"]["missing_sets"] = data.missing_sets  # eval.missing_sets=skip: sets left out for lack of a file
    metrics["data"].update(kind.data_notes(data))

    # 6. Evaluation, each process a share of every set; 7. results (process 0 only), adapter weights alone.
    metrics["eval"] = kind.evaluate(model, tokenizer, data.eval_sets, cfg, accelerator.device,
                                    out_dir / "predictions" if main else None, accelerator.num_processes,
                                    accelerator.process_index)
    if main:
        write_results(cfg, model, adapter, tracker, out_dir, metrics, folder.fingerprint, memory,
                      kind.data_files(cfg, adapter.trains))
    tracker.finish()
    return metrics


def write_results(cfg: Config, model, adapter, tracker, out_dir: Path, metrics: dict, fingerprint: dict,
                  memory: MemorySampler, data_files: list[Path]) -> None:
    """Adapter, exports and ``metrics.json`` (last: it marks the run finished), process 0 only."""
    tracker.log_predictions(out_dir / "predictions")
    if adapter.trains:
        base_model = cfg.model.hub_id or cfg.model.name
        save_adapter(model, adapter, out_dir / "adapter", base_model=base_model)
        write_exports(model, adapter, out_dir, cfg.export, base_model=base_model)
    if torch.cuda.is_available():
        metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    metrics["report"] = run_report(metrics, cfg.model, data_files, out_dir / "adapter", memory)
    tracker.summary(flatten(metrics))
    write_json_atomic(out_dir / "metrics.json", {**metrics, "fingerprint": fingerprint})
