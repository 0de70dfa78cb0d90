"""One step of transformers' vectorised beam search (``_beam_search``: top 2k continuations,
running beams, finished hypotheses, the early-stop heuristic; length penalty 1,
``early_stopping=False``) on static buffers, as our decoder (``decoding.Decoder``) runs it in a
CUDA graph: every update is in place and nothing is read back to the host. The cache is never
reordered: a beam's ancestry (which beam row holds its token of step ``s``) is carried instead."""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG = -1.0e9  # transformers' "impossible" beam score


class BeamSearch:
    """The finished hypotheses of ``prompts`` prompts, ``beams`` each, of ``steps`` tokens, and the
    early-stop state; the running beams (tokens, scores, ancestry) are the decoder's, passed to ``select``."""

    def __init__(self, prompts: int, beams: int, steps: int, eos: int, device: torch.device):
        self.beams, self.steps, self.eos = beams, steps, eos
        self.finished = torch.zeros(prompts, beams, steps, dtype=torch.long, device=device)
        self.finished_scores = torch.zeros(prompts, beams, dtype=torch.float32, device=device)
        self.is_finished = torch.zeros(prompts, beams, dtype=torch.bool, device=device)
        self.improvable = torch.zeros(prompts, 1, dtype=torch.bool, device=device)
        self.top_beams = torch.arange(2 * beams, device=device) < beams
        self.two_top_ks = True  # ``_top_continuations``: each row's top 2k, then the prompt's

    def reset(self, pad: int, scores: torch.Tensor) -> None:
        """Before a batch: no hypothesis finished, and only beam 0 extends at first, as in generate."""
        scores[:, 1:] = NEG
        self.finished.fill_(pad)
        self.finished_scores.fill_(NEG)
        self.is_finished.zero_()
        self.improvable.fill_(True)

    def select(self, logits: torch.Tensor, t: torch.Tensor, sequences: torch.Tensor, scores: torch.Tensor,
               ancestry: torch.Tensor, done: torch.Tensor, tokens: torch.Tensor) -> None:
        """Choose step ``t`` (a device scalar) from ``logits`` ``(prompts * beams, vocab)``: updates
        the running ``sequences`` ``(prompts, beams, steps)``, their ``scores`` and ``ancestry``, the
        finished hypotheses, ``done`` and the next step's input ``tokens`` ``(prompts * beams,)``."""
        beams, steps = self.beams, self.steps
        top_scores, parent, token = self._top_continuations(logits, scores)
        candidates = torch.gather(sequences, 1, parent[:, :, None].expand(-1, -1, steps)).clone()
        candidates.index_copy_(2, t.view(1), token[:, :, None])
        ends = (token == self.eos) | (t == steps - 1)

        running = top_scores + ends.float() * NEG
        keep = torch.topk(running, beams).indices
        sequences.copy_(torch.gather(candidates, 1, keep[:, :, None].expand(-1, -1, steps)))
        scores.copy_(torch.gather(running, 1, keep))
        kept_parent = torch.gather(parent, 1, keep)
        ancestry.copy_(torch.gather(ancestry, 1, kept_parent[:, :, None].expand(-1, -1, steps)))

        just_finished = ends & self.top_beams
        finished_scores = top_scores / (t + 1).float()
        finished_scores = finished_scores + (~self.improvable).float() * NEG
        finished_scores = finished_scores + (~just_finished).float() * NEG
        merged_scores = torch.cat([self.finished_scores, finished_scores], dim=1)
        best = torch.topk(merged_scores, beams).indices
        merged = torch.cat([self.finished, candidates], dim=1)
        self.finished.copy_(torch.gather(merged, 1, best[:, :, None].expand(-1, -1, steps)))
        self.finished_scores.copy_(torch.gather(merged_scores, 1, best))
        self.is_finished.copy_(torch.gather(torch.cat([self.is_finished, just_finished], dim=1), 1, best))

        best_running = scores[:, :1] / (t + 1).float()
        worst_finished = torch.where(self.is_finished, self.finished_scores.min(dim=1, keepdim=True).values, NEG)
        self.improvable &= (best_running > worst_finished).any(dim=-1, keepdim=True)
        done.copy_(~(self.improvable.any() & ~ends.all()))
        tokens.copy_(sequences.index_select(2, t.view(1)).reshape(-1))  # no tensor indexing: it syncs

    def _top_continuations(self, logits: torch.Tensor, scores: torch.Tensor):
        """The ``2 * beams`` best continuations of each prompt's beams, ``(prompts, 2 * beams)`` each:
        their scores (log-probability plus the beam's score), beams and tokens. generate takes the top
        ``2 * beams`` of all ``beams * vocab`` sums; adding a beam's score keeps the order of its row, so
        they are among each row's top ``2 * beams``: the same scores, from two small top-k's instead of one
        over ``beams * vocab`` per prompt (equal scores may come in another order)."""
        prompts, beams, k = scores.shape[0], self.beams, 2 * self.beams
        if not self.two_top_ks:  # generate's one top-k (scripts/profile_decoding.py compares the two)
            vocab = logits.shape[-1]
            sums = F.log_softmax(logits, dim=-1).view(prompts, beams, vocab) + scores[:, :, None]
            top_scores, index = torch.topk(sums.view(prompts, beams * vocab), k)
            return top_scores, index // vocab, index % vocab
        row_scores, row_tokens = torch.topk(F.log_softmax(logits, dim=-1), k)  # (prompts * beams, k)
        sums = (row_scores.view(prompts, beams, k) + scores[:, :, None]).view(prompts, beams * k)
        top_scores, pick = torch.topk(sums, k)
        return top_scores, pick // k, torch.gather(row_tokens.view(prompts, beams * k), 1, pick)
