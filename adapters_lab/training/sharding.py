"""Sharded training (``trainer.distributed=fsdp``): torch's FSDP2 ``fully_shard`` per decoder layer,
then the root, so the frozen base is split over the processes and each decoder layer's weights are
gathered only while it runs; the adapter parameters (inside the layers, or in the root group for
prefix and prompt tuning) are sharded with them and trained. ``shard`` applies it for the time of
training and ``unshard`` gives the pipeline back a plain model with full weights on every process,
so evaluation and writing the results are the data-parallel path's (the whole model on each device
again, as when it was loaded). Checkpoints hold the full adapter and optimiser state, keyed by
parameter name, so any number of processes resumes them.

``fully_shard`` is applied here, not through accelerate's FSDP plugin: accelerate ignores the plugin
under ``Accelerator(cpu=True)`` (it shards only on GPU process types), so its path could not be run by
the CPU tests; ``fully_shard`` itself runs the same on gloo CPU processes and on GPUs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed
import torch.nn as nn
from accelerate import Accelerator
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from adapters_lab.adapters.placement import decoder_layers
from adapters_lab.config import Distributed
from adapters_lab.training.step import CausalLMObjective

FULL = StateDictOptions(full_state_dict=True, cpu_offload=False)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def wants_sharding(distributed: Distributed, accelerator: Accelerator) -> bool:
    """fsdp over several processes; one process trains the plain model (there is nothing to split)."""
    return distributed == Distributed.fsdp and accelerator.num_processes > 1


def shard(model: nn.Module, accelerator: Accelerator, param_groups: list[dict] | None = None) -> list[dict] | None:
    """``fully_shard`` each decoder layer, then the whole model (the embeddings, the final norm, the
    head and anything outside the layers: an image-text model's vision tower and connector). Under bf16
    the gathered weights and the compute are bf16, gradients are reduced in fp32 and the sharded adapter
    weights stay in their own dtype (fp32). Returns ``param_groups`` holding the sharded parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    named = [{**g, "params": [names[id(p)] for p in g["params"]]} for g in param_groups or []]
    with torch.no_grad():  # every process starts from process 0's weights, as DDP's wrapper makes them
        for tensor in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(tensor, src=0)
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    bf16 = accelerator.mixed_precision == "bf16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for layer in decoder_layers(model)[1]:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    params = dict(model.named_parameters())
    return [{**g, "params": [params[n] for n in g["params"]]} for g in named] or None


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def unshard(model: nn.Module) -> None:
    """Undo ``shard`` in place: every parameter back as a plain full tensor on every process (a
    collective: all processes call it), FSDP's forward hooks removed and each module's class restored.
    FSDP2 has no public inverse of ``fully_shard``: the hook handles are its state's (torch 2.4 to 2.13)."""
    modules = fsdp_modules(model)
    for module in modules:
        module.reshard()  # the module's registered parameters are the sharded ones again
    for owner in model.modules():  # the same order on every process
        for name, param in list(owner.named_parameters(recurse=False)):
            if isinstance(param, DTensor):
                setattr(owner, name, nn.Parameter(param.detach().full_tensor(), requires_grad=param.requires_grad))
    for module in modules:
        state = fully_shard.state(module)
        state._pre_forward_hook_handle.remove()
        state._post_forward_hook_handle.remove()
        module.__class__ = next(base for base in type(module).__bases__ if base is not FSDPModule)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on this process (a collective for a sharded one)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters, whole, on the CPU, by name; every process calls it when sharded."""
    return {name: full_tensor(p.detach()).to("cpu", copy=True).contiguous() for name, p in model.named_parameters()
            if p.requires_grad}


def load_full_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into the parameters of those names (each process keeps its shard)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            param = params[name]
            if isinstance(param, DTensor):
                tensor = distribute_tensor(tensor.to(param.device, param.dtype), param.device_mesh, param.placements)
                param.to_local().copy_(tensor.to_local())
            else:
                param.copy_(tensor)


def inner(optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


def optimizer_state_by_name(model: nn.Module, optimizer) -> dict:
    """The optimiser state, whole, keyed by parameter name (a collective when sharded)."""
    state = get_optimizer_state_dict(model, inner(optimizer), options=FULL)
    return {"state": {name: {k: full_tensor(v).cpu() if torch.is_tensor(v) else v for k, v in entry.items()}
                      for name, entry in state["state"].items()},
            "param_groups": state["param_groups"]}


def load_optimizer_state_by_name(model: nn.Module, optimizer, state: dict) -> None:
    set_optimizer_state_dict(model, inner(optimizer), state, options=FULL)


def by_name(model: nn.Module, optimizer, state: dict) -> dict:
    """An optimiser state keyed by parameter index (``optimizer.state_dict()``) keyed by name instead."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for group in inner(optimizer).param_groups for p in group["params"]]
    groups = [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]
    return {"state": {order[i]: entry for i, entry in state["state"].items()}, "param_groups": groups}


class ShardedObjective(CausalLMObjective):
    """The objective of a sharded model; ``no_sync`` (which accelerate's ``no_sync`` calls) skips the
    gradient reduce-scatter of all but a step's last micro-batch, as DDP's does."""

    @contextlib.contextmanager
    def no_sync(self):
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)
