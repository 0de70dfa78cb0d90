"""Typed schemas for every config group, registered in Hydra's ConfigStore.

Each group's YAML is merged onto its dataclass, so an unknown key or a value of the
wrong type fails when Hydra composes the config, before any weight is loaded.
Adapter methods are polymorphic: each is a dataclass (in ``adapters/<family>.py``) that is both the
method and its schema, registered in ``adapters/registry.py``, stored under
``schema/adapter/<ClassName>`` and pulled in by the defaults list of ``conf/adapter/<name>.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Precision(str, Enum):
    """Training precision; ``auto`` picks bf16 on a GPU that has it, else fp32."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class BasePrecision(str, Enum):
    """How the frozen base computes while training (``model.base_precision``); evaluation always uses
    ``model.dtype``."""

    bf16 = "bf16"  # the frozen weights stay in model.dtype
    fp8 = "fp8"  # the decoder's frozen linear layers as FP8 GEMMs (training/speed/fp8.py); bf16 models only


class Schedule(str, Enum):
    linear = "linear"
    cosine = "cosine"
    constant = "constant"


class ModelInit(str, Enum):
    """Where a model's weights come from (``model.init``)."""

    pretrained = "pretrained"  # model.local_path or model.hub_id
    random = "random"  # model.arch's shape, random weights, a local tokenizer: nothing downloaded


class ModelKind(str, Enum):
    """What ``build_model`` builds (``model.kind``): a text decoder, or an image-text model (LLaVA,
    Qwen2-VL) whose language model takes the adapter while its vision tower stays frozen."""

    causal_lm = "causal_lm"
    image_text = "image_text"


class Batching(str, Enum):
    """How training examples form micro-batches (``trainer.batching``)."""

    padded = "padded"  # the paper's: shuffled, right-padded to the longest in the micro-batch
    length_grouped = "length_grouped"  # shuffled, then similar lengths grouped: less padding
    packed = "packed"  # padding-free rows of whole examples, no attention across examples
    # padded's optimiser steps and loss (same order, micro-batches and weighting) as packed rows, one forward
    # a step (data/paper_packing.py)
    paper_packed = "paper_packed"


class Device(str, Enum):
    """Where training runs; ``auto`` takes a CUDA GPU when there is one."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class CompileMode(str, Enum):
    """``torch.compile`` mode of the decoder layers (CUDA-graph modes do not suit per-layer graphs)."""

    default = "default"
    # Inductor times Triton GEMM templates against cuBLAS per shape and can fuse the elementwise ops
    # around them; slower to compile
    max_autotune_no_cudagraphs = "max-autotune-no-cudagraphs"


class Distributed(str, Enum):
    """How several processes (``accelerate launch``) share training (``trainer.distributed``)."""

    ddp = "ddp"  # data-parallel: every process holds the whole model, adapter gradients averaged
    fsdp = "fsdp"  # the same steps with the model sharded over the processes (training/sharding.py)


class ResumeMode(str, Enum):
    """``trainer.resume``: ``auto``, ``never``, or any other value: a checkpoint folder."""

    auto = "auto"
    never = "never"
    folder = "folder"


class Select(str, Enum):
    """Which adapter weights training ends with (``trainer.select``)."""

    last = "last"  # the last step's
    best_val = "best_val"  # the step of lowest validation loss (upstream finetune.py's load_best_model_at_end)


class TrainerConfigError(ValueError):
    """A bad trainer option; the message names the key."""


class NanPolicy(str, Enum):
    stop = "stop"  # save the last finite state, then stop with a message
    skip = "skip"  # drop the optimiser step whose loss was not finite


class Protocol(str, Enum):
    paper = "paper"
    strict = "strict"


class Scoring(str, Enum):
    generate = "generate"  # generate, then parse under both protocols (the paper's evaluation)
    likelihood = "likelihood"  # fixed-answer sets only: each option's log-likelihood, no generation
    both = "both"  # generation on every set, likelihood too on the fixed-answer ones


class PromptTemplate(str, Enum):
    paper = "paper"  # upstream's evaluation template (evaluate.py): the paper protocol
    train = "train"  # the training template's user part: train and test prompts are the same text


class MissingSets(str, Enum):
    fail = "fail"  # an evaluation set whose file is missing stops the run before any weight loads
    skip = "skip"  # evaluate the sets that exist; the missing ones are logged and listed in metrics.json


class DecoderKind(str, Enum):
    adapters_lab = "adapters_lab"  # adapters_lab/decoding.py: grouped beam cache, CUDA graphs on a GPU
    transformers = "transformers"  # transformers' generate (used anyway where ours does not apply)


class LoggerBackend(str, Enum):
    none = "none"
    wandb = "wandb"


class WandbMode(str, Enum):
    auto = "auto"  # online when an API key is configured, else offline
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class TinyVisionConfig:
    """The vision side of a tiny image-text model: a random CLIP tower (LLaVA) or Qwen2-VL ViT."""

    hidden_size: int = 32
    intermediate_size: int = 40
    num_hidden_layers: int = 2
    num_attention_heads: int = 2
    image_size: int = 30  # LLaVA: square images resized to this; Qwen2-VL: min = max pixels = this squared
    patch_size: int = 6
    spatial_merge_size: int = 2  # Qwen2-VL only: patches merged per side by the connector


@dataclass
class TinyModelConfig:
    """A random-init decoder built from a config: no download, odd sizes to catch shape bugs."""

    model_type: str = "llama"
    hidden_size: int = 48
    intermediate_size: int = 76
    num_hidden_layers: int = 3
    num_attention_heads: int = 3
    num_key_value_heads: int = 1
    max_position_embeddings: int = 1024
    vocab_size: int = 384  # size of the locally trained byte-level BPE tokenizer
    init_std: float = 0.02
    vision: Optional[TinyVisionConfig] = None  # image-text tiny models (model_type llava | qwen2_vl)


@dataclass
class ArchConfig:
    """A paper model's shape, as its ``config.json`` gives it, for ``model.init=random``. Names are
    transformers' common ones; ``adapters_lab/models/random_init.py`` maps them to each model type's own."""

    model_type: str = MISSING  # llama, bloom, gptj, ...
    hidden_size: int = MISSING
    num_hidden_layers: int = MISSING
    num_attention_heads: int = MISSING
    vocab_size: int = MISSING
    intermediate_size: Optional[int] = None  # None: the type's rule (BLOOM: 4 x hidden)
    num_key_value_heads: Optional[int] = None  # None: one per attention head
    max_position_embeddings: Optional[int] = None  # None: the type's default (BLOOM has none: ALiBi)
    rope_theta: Optional[float] = None
    rotary_dim: Optional[int] = None  # GPT-J: rotary dimensions per head
    norm_eps: Optional[float] = None  # rms_norm_eps (LLaMA) or layer_norm_epsilon (BLOOM, GPT-J)
    tie_word_embeddings: bool = False


@dataclass
class ModelConfig:
    name: str = MISSING
    hub_id: Optional[str] = None  # e.g. yahma/llama-7b-hf
    local_path: Optional[str] = None  # a folder with config + weights; wins over hub_id
    tiny: Optional[TinyModelConfig] = None  # set: random init, local tokenizer
    init: ModelInit = ModelInit.pretrained  # random: ``arch``'s shape, random weights (tiny models always are)
    arch: Optional[ArchConfig] = None  # the architecture's facts, for init=random
    dtype: DType = DType.bfloat16
    base_precision: BasePrecision = BasePrecision.bf16  # fp8: the frozen base's GEMMs in FP8 while training
    attn_implementation: str = "sdpa"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    kind: ModelKind = ModelKind.causal_lm
    # image-text models: train the vision-language connector fully (its own optimiser group at
    # trainer.connector_lr); the vision tower is always frozen
    train_connector: bool = False


@dataclass
class ArithConfig:
    """Seeded synthetic arithmetic word problems (the embedded default dataset)."""

    num_train: int = 256
    num_test: int = 32
    max_operand: int = 20
    seed: int = 1234


@dataclass
class ShapesConfig:
    """Seeded synthetic images of coloured shapes, with questions whose answers depend on the image."""

    num_train: int = 256
    num_test: int = 32
    image_size: int = 30
    questions: list[str] = field(default_factory=lambda: ["colour", "shape", "count", "position"])
    seed: int = 1234


@dataclass
class DatasetConfig:
    name: str = MISSING
    # Training source: "arith" (synthetic), an upstream training set name (math_10k,
    # math_data, commonsense_170k, ...), an evaluation-set name's train split
    # (boolq, ARC-Easy, ARC-Challenge, openbookqa), "gsm8k" (OpenAI jsonl under paths.data_root),
    # "hf:<id>[:<split>]" (datasets.load_dataset, online), or a path to a .json/.jsonl file.
    train: str = MISSING
    # Evaluation sets by upstream folder name, a suite name (math, commonsense), or "arith".
    eval_sets: list[str] = field(default_factory=list)
    cutoff_len: int = 256
    train_on_inputs: bool = True
    add_eos_token: bool = True
    limit_train: Optional[int] = None  # take the first N training records
    val_set_size: int = 120  # training records held out (seeded draw) for the validation loss
    max_bad_record_share: float = 0.01  # above this share of malformed records: fail
    arith: ArithConfig = field(default_factory=ArithConfig)
    # Image-text datasets (LLaVA conversation records): the folder that record "image" paths are relative to
    image_dir: Optional[str] = None
    eval_image_dir: Optional[str] = None  # the evaluation records' image folder (None: image_dir)
    eval_file: Optional[str] = None  # image-text: the file of the one evaluation set named (mllm_file: required)
    # With image_dir absent as a folder: keep only the records without an image, and say so (false: fail)
    text_only_without_images: bool = False
    prompt_suffix: str = ""  # appended to every evaluation question (e.g. LLaVA's ScienceQA answer instruction)
    shapes: ShapesConfig = field(default_factory=ShapesConfig)


@dataclass
class TrainerConfig:
    epochs: float = 3.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 16  # examples per optimiser step, over all processes when data-parallel
    micro_batch_size: int = 4  # examples per forward pass (grad accumulation = batch / micro)
    lr: float = 3e-4
    warmup_steps: int = 100
    # share of the optimiser steps spent warming up, as HF's warmup_ratio: ceil(ratio * steps);
    # when set it replaces warmup_steps
    warmup_ratio: Optional[float] = None
    schedule: Schedule = Schedule.linear
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    precision: Precision = Precision.auto
    eval_every: int = 200  # validation loss every N optimiser steps (0: only at the end)
    select: Select = Select.last  # best_val: end with the weights of the lowest validation loss (at eval_every)
    log_every: int = 10
    device: Device = Device.auto
    progress_bar: bool = True
    batching: Batching = Batching.padded
    distributed: Distributed = Distributed.ddp  # fsdp: the frozen base sharded over the processes
    pack_length: int = 0  # tokens per packed row; 0: the longest example rounded up to 8
    gradient_checkpointing: bool = False
    checkpoint_layers: Optional[int] = None  # recompute only the first N decoder layers (None: all)
    compile: bool = False  # torch.compile each decoder layer
    compile_mode: CompileMode = CompileMode.default  # default | max_autotune_no_cudagraphs
    # attention while training: flex_attention, sdpa, varlen (packed rows as cu_seqlens segments; CUDA:
    # torch.nn.attention.varlen), ...; None: the model's
    attn_implementation: Optional[str] = None
    fused_loss: bool = False  # chunked cross-entropy: no full-vocabulary fp32 logits
    fused_lora: bool = False  # LoRA layers as one autograd op, dropout masks redrawn from a seed (fused_lora.py)
    checkpoint_every: int = 200  # save adapter, optimiser, scheduler, RNG, data position (0: only at the end)
    keep_checkpoints: int = 2
    async_checkpoint: bool = True  # write checkpoint files on a background thread (the state is copied first)
    resume: str = "auto"  # auto (the run dir's last checkpoint, if any) | never | a checkpoint folder
    nan_policy: NanPolicy = NanPolicy.stop
    peak_tflops: Optional[float] = None  # for MFU; None: the device's dense bf16 datasheet peak
    connector_lr: Optional[float] = None  # image-text models with model.train_connector: None = trainer.lr


@dataclass
class EvalConfig:
    batch_size: int = 128  # prompts, at most: capped to the KV cache that fits in free GPU memory
    num_beams: int = 4  # the paper's decoding
    max_new_tokens: Optional[int] = None  # None: per-set default (math 256, commonsense 32)
    limit: Optional[int] = None  # first N examples of each set
    protocol: Protocol = Protocol.paper  # which parse `eval.<set>.accuracy` reports
    # likelihood: `eval.<set>.accuracy_likelihood(_norm)` (lm-evaluation-harness acc / acc_norm), no generation
    scoring: Scoring = Scoring.generate
    missing_sets: MissingSets = MissingSets.fail  # skip: a suite's sets that exist (data.missing_sets lists the rest)
    prompt_template: PromptTemplate = PromptTemplate.paper  # train: not the paper protocol (prompts differ)
    # Same tokens either way (tests/test_decoding.py); adapters_lab's is the fast one.
    decoder: DecoderKind = DecoderKind.adapters_lab


@dataclass
class LoggerConfig:
    backend: LoggerBackend = LoggerBackend.none
    project: str = "adapters_lab"
    entity: Optional[str] = None
    mode: WandbMode = WandbMode.auto
    group: Optional[str] = None
    job_type: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_root: str = MISSING  # holds llm_adapters/, gsm8k/, scienceqa/
    data_dir: str = MISSING  # LLM-Adapters layout: dataset/<NAME>/test.json, ft-training_set/
    output_dir: str = MISSING


@dataclass
class ExportConfig:
    peft: bool = False  # also write the adapter in HF PEFT format (peft_adapter/): LoRA, DoRA, IA3, prompt
    merged: bool = False  # also write the base with the adapter folded in (merged_model/): LoRA, DoRA, IA3


@dataclass
class Config:
    model: ModelConfig = MISSING
    adapter: Any = MISSING  # schema chosen by the adapter YAML (schema/adapter/<name>)
    dataset: DatasetConfig = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    seed: int = 42
    optimized_metric: str = "eval/average"
    overwrite: bool = False  # replace the results in the output dir (built beside them, moved in once finished)


# Keys that moved to another group: an old override of one fails in one line naming the new key (checks.py), and
# a run folder's stored fingerprint is read under the new names (runs.py).
MOVED_KEYS = {"trainer.val_set_size": "dataset.val_set_size"}

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def register_configs() -> None:
    """Store the top-level schema and one schema per registered adapter class (``schema/adapter/<Class>``)."""
    from adapters_lab.adapters.registry import ADAPTERS, schema

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for name, cls in ADAPTERS.items():
        cs.store(group="schema/adapter", name=name, node=schema(cls))
