"""Beam search's choice of continuations (adapters_lab/beam_search.py): the two small top-k's give
generate's top 2k of all beams' sums, beams and tokens included."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adapters_lab.beam_search import NEG, BeamSearch


def generates_top(logits, scores, beams):
    """transformers' ``_beam_search``: the top 2k of every beam's log-probabilities plus its score."""
    prompts, vocab = scores.shape[0], logits.shape[-1]
    sums = F.log_softmax(logits, dim=-1).view(prompts, beams, vocab) + scores[:, :, None]
    top, index = torch.topk(sums.view(prompts, beams * vocab), 2 * beams)
    return top, index // vocab, index % vocab


def test_two_small_top_ks_give_generates_continuations():
    g = torch.Generator().manual_seed(0)
    for prompts, beams, vocab in ((5, 4, 97), (3, 2, 31), (2, 3, 7)):  # 7: a row's top 2k is most of it
        search = BeamSearch(prompts, beams, 4, eos=2, device=torch.device("cpu"))
        logits = torch.randn(prompts * beams, vocab, generator=g) * 3
        for scores in (torch.randn(prompts, beams, generator=g) * 5,  # a later step: beams far apart
                       torch.cat([torch.zeros(prompts, 1), torch.full((prompts, beams - 1), NEG)], 1)):  # the first
            got = search._top_continuations(logits, scores)
            for ours, theirs in zip(got, generates_top(logits, scores, beams)):
                assert torch.equal(ours, theirs)
            search.two_top_ks = False  # the one top-k the profile compares against
            for ours, theirs in zip(search._top_continuations(logits, scores), got):
                assert torch.equal(ours, theirs)
            search.two_top_ks = True
