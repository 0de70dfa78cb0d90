"""A decoding step's layers as lanes (adapters_lab/step_lanes.py): the tokens and beam scores of one
lane, the attentions' turns in their order, the lanes' parts of every per-row input, and the model
left as it was."""

from __future__ import annotations

import pytest
import torch

from adapters_lab import decoding, step_lanes
from tests.adapter_helpers import tiny_model
from tests.test_decoding import LENGTHS, PAD, compacting_case, left_padded


@pytest.mark.parametrize("model_type, beams", [("llama", 4), ("qwen2", 4), ("llama", 1)])
@pytest.mark.parametrize("lanes", [2, 3])
def test_lanes_choose_generates_tokens_with_one_lanes_scores(model_type, beams, lanes):
    decoder, ids, mask, expected = compacting_case(model_type, beams, lanes=lanes)
    assert [(p.start, p.stop) for p in decoder.lanes.prompts] == {2: [(0, 2), (2, 5)], 3: [(0, 2), (2, 3), (3, 5)]}[lanes]
    assert torch.equal(decoder(ids, mask), expected)
    assert beams == 1 or decoder.slots.kept < beams * 24 - beams * 4, "compaction dropped slots"
    one_lane, ids, mask, _ = compacting_case(model_type, beams)
    one_lane(ids, mask)
    torch.testing.assert_close(decoder.scores, one_lane.scores, rtol=1e-5, atol=1e-5)
    if beams > 1:
        torch.testing.assert_close(decoder.beam_search.finished_scores, one_lane.beam_search.finished_scores,
                                   rtol=1e-5, atol=1e-5)


def test_each_lane_gets_its_own_rows_and_the_model_is_left_as_it_was(monkeypatch):
    decoder, ids, mask, expected = compacting_case("llama", 4, steps=6, lanes=2)
    layers = step_lanes.decoder_layers(decoder.model)
    assert len(layers) == decoder.model.config.num_hidden_layers
    seen = []
    original = type(layers[0]).forward

    def spy(layer, hidden_states, attention_mask=None, position_ids=None, position_embeddings=None, **kwargs):
        if layer is layers[0] and hidden_states.shape[1] == 1:  # a step's first layer, one lane's call
            seen.append((hidden_states.shape[0], attention_mask.shape[0], position_ids.shape[0],
                         position_embeddings[0].shape[0], decoder.cache.prompts))
        return original(layer, hidden_states, attention_mask, position_ids, position_embeddings=position_embeddings,
                        **kwargs)

    monkeypatch.setattr(type(layers[0]), "forward", spy)
    assert torch.equal(decoder(ids, mask), expected)
    assert seen[:2] == [(8, 2, 8, 8, slice(0, 2)), (12, 3, 12, 12, slice(2, 5))]  # rows = prompts x 4 beams
    assert len(seen) == 2 * 5  # two lanes in each of the 5 steps
    assert all("forward" not in vars(layer) for layer in layers)
    assert decoder.cache.prompts == slice(None)


def test_the_attentions_take_turns_in_layer_then_lane_order(monkeypatch):
    decoder, ids, mask, _ = compacting_case("qwen2", 4, steps=3, lanes=3)
    log = []
    monkeypatch.setattr(step_lanes.Lanes, "wait_turn", lambda self, layer: log.append(("wait", layer, self.lane)))
    monkeypatch.setattr(step_lanes.Lanes, "end_turn", lambda self, layer: log.append(("end", layer, self.lane)))
    decoder(ids, mask)
    layers = decoder.model.config.num_hidden_layers
    step = [(kind, layer, lane) for layer in range(layers) for lane in range(3) for kind in ("wait", "end")]
    assert log == step * 2  # two steps after the prefill's token; the prefill takes no turns
    lanes = decoder.lanes
    assert lanes.previous_turn(0, 0) is None
    assert [lanes.previous_turn(1, lane) for lane in range(3)] == [(0, 2), (1, 0), (1, 1)]
    log.clear()
    lanes.turns = False  # lanes on their own streams only
    decoder(ids, mask)
    assert log == []


def test_layers_with_a_forward_of_their_own_are_refused():
    model = tiny_model("llama")
    layer = step_lanes.decoder_layers(model)[1]
    layer.forward = layer.forward  # as an accelerate hook would leave it
    ids, _ = left_padded(LENGTHS)
    with pytest.raises(ValueError, match=r"layers \[1\] have instance forwards"):
        decoding.Decoder(model, ids.shape[0], ids.shape[1], 4, 4, 2, PAD, lanes=2)
