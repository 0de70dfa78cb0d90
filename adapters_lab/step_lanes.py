"""A decoding step's layers run as lanes: groups of prompts, each on its own CUDA stream, their step
attentions taking turns (``Decoder(lanes=n)``; the default is one lane, the whole batch at once).

In a step of the 7B shape the GEMMs (bound by compute) and the attention (bound by the cache's
bandwidth) take about 9 ms each and run one after the other in every layer (docs/benchmarks.md).
With the prompts split into lanes, the attention kernels take turns in a fixed order (layer 0 lane
0, layer 0 lane 1, ..., layer 1 lane 0, ...), so that while one lane's attention streams its
prompts' cache, the other lanes' projections and MLP have the GPU's compute beside it; with
``turns`` off the lanes only run on their own streams. Each lane computes what the whole batch
computes for its rows: the same tokens in float32 (tests/test_step_lanes.py); in bf16 a GEMM of
fewer rows may round differently. Whether it is faster is for a GPU to say (scripts/profile_decoding.py).

How: inside ``running``, every decoder layer's forward is wrapped (an instance attribute). The
first layer forks the lanes from the current stream; each layer runs every lane's rows (its hidden
states, mask, positions and rotary embeddings, the cache's prompts, the step kernel's read window)
on the lane's stream; the last layer joins the lanes and returns the whole batch's hidden states.
Between layers the model only passes a tensor on, so the lanes keep their own hidden states. The
turns are events recorded after each attention and waited on before the next one in the order.
Without CUDA the same runs lane after lane (no streams, no events).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from adapters_lab import fused_layers
from adapters_lab.step_attention import attention_backend

_running: Lanes | None = None  # the lanes of the step being run or captured now


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers (of the kinds in ``fused_layers.LAYERS``), in order."""
    return [m for m in model.modules() if type(m).__name__ in fused_layers.LAYERS]


class Lanes:
    """``prompts`` prompts of ``beams`` beams in ``lanes`` contiguous groups (sizes differ by at
    most one) through the model's decoder ``layers``."""

    def __init__(self, layers: list[nn.Module], prompts: int, beams: int, lanes: int, device: torch.device):
        wrapped = [i for i, layer in enumerate(layers) if "forward" in vars(layer)]
        if wrapped or not layers:  # an accelerate hook placing tensors, say: its forward is not ours to swap
            raise ValueError(f"decoding lanes need the model's own decoder layers; layers {wrapped} have "
                             f"instance forwards" if wrapped else "decoding lanes found no decoder layers")
        bounds = [round(i * prompts / lanes) for i in range(lanes + 1)]
        self.prompts = [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
        self.layers, self.beams, self.turns = layers, beams, True
        cuda = device.type == "cuda"
        self.streams = [torch.cuda.Stream(device) for _ in self.prompts] if cuda else None
        self.events = [[torch.cuda.Event() for _ in self.prompts] for _ in layers] if cuda else None
        self.hidden: list[torch.Tensor | None] = [None] * len(self.prompts)
        self.lane, self.forked = 0, None

    def rows(self, lane: int) -> slice:
        """The beam rows of lane ``lane``'s prompts."""
        prompts = self.prompts[lane]
        return slice(prompts.start * self.beams, prompts.stop * self.beams)

    def previous_turn(self, layer: int, lane: int) -> tuple[int, int] | None:
        """The (layer, lane) whose attention runs just before this one's in a step; None for the first."""
        if lane > 0:
            return layer, lane - 1
        return (layer - 1, len(self.prompts) - 1) if layer > 0 else None

    @contextlib.contextmanager
    def running(self, cache, backend, window: tuple[torch.Tensor, ...]):
        """Inside: the decoder layers run lane by lane; ``cache`` (a ``SlotCache``) and the step
        kernel's ``backend`` and ``window`` (``Decoder._step``) are given each lane's part."""
        global _running
        for index, layer in enumerate(self.layers):
            layer.forward = self._layer_forward(layer, index, cache, backend, window)
        _running = self
        try:
            yield
        finally:
            _running = None
            cache.prompts = slice(None)
            self.hidden = [None] * len(self.prompts)
            for layer in self.layers:
                del layer.forward

    def _layer_forward(self, layer: nn.Module, index: int, cache, backend, window):
        prompts = cache.keys.shape[1]

        def forward(hidden_states, attention_mask=None, position_ids=None, position_embeddings=None, **kwargs):
            if index == 0:
                self._fork(hidden_states)
            original = fused_layers.layer_forward(layer)  # the fused layer, when the decoder runs it
            for lane, part in enumerate(self.prompts):
                rows = self.rows(lane)
                inputs = hidden_states[rows] if index == 0 else self.hidden[lane]
                cache.prompts = part
                lane_window = (window[0][part], window[1][part], *window[2:])
                with self._on(lane), attention_backend(backend, lane_window):
                    self.hidden[lane] = original(
                        layer, inputs, attention_mask=_part(attention_mask, part, prompts),
                        position_ids=_part(position_ids, rows, prompts * self.beams),
                        position_embeddings=_parts(position_embeddings, rows, prompts * self.beams), **kwargs)
            cache.prompts = slice(None)
            return self._join() if index == len(self.layers) - 1 else hidden_states
        return forward

    def _fork(self, hidden_states: torch.Tensor) -> None:
        if self.streams is not None:
            self.forked = torch.cuda.current_stream(hidden_states.device)
            for stream in self.streams:
                stream.wait_stream(self.forked)

    def _on(self, lane: int):
        self.lane = lane
        return torch.cuda.stream(self.streams[lane]) if self.streams is not None else contextlib.nullcontext()

    def _join(self) -> torch.Tensor:
        if self.streams is not None:
            for stream in self.streams:
                self.forked.wait_stream(stream)
        return torch.cat(self.hidden)

    # -- the attentions' turns (``turn``) ---------------------------------------------------------

    def wait_turn(self, layer: int) -> None:
        previous = self.previous_turn(layer, self.lane)
        if previous is not None and self.events is not None:
            torch.cuda.current_stream().wait_event(self.events[previous[0]][previous[1]])

    def end_turn(self, layer: int) -> None:
        if self.events is not None:
            self.events[layer][self.lane].record()


def _part(tensor: torch.Tensor | None, part: slice, whole: int) -> torch.Tensor | None:
    """``tensor``'s rows of ``part`` if its first dimension is the whole batch's (else it broadcasts)."""
    return tensor[part] if tensor is not None and tensor.shape[0] == whole else tensor


def _parts(tensors: tuple[torch.Tensor, ...] | None, part: slice, whole: int) -> tuple | None:
    return None if tensors is None else tuple(_part(t, part, whole) for t in tensors)


@contextlib.contextmanager
def turn(module: nn.Module):
    """Around a decoding step's attention of ``module`` (an attention layer): inside ``running`` with
    turns on, it waits for the attention before it in the order and marks its own end."""
    lanes = _running
    if lanes is None or not lanes.turns:
        yield
        return
    lanes.wait_turn(module.layer_idx)
    yield
    lanes.end_turn(module.layer_idx)
