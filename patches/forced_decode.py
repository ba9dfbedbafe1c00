"""Teacher-forced decode through a real SGLang server, with the model's own log-probabilities.

The fidelity evaluation (``python -m sglang_tpla.eval``) must score a document's continuation
on DECODE steps (pd-sep TPLA is exact in prefill), so it prefills the prompt and forces the
continuation one decode step at a time:

* :class:`ForcedTokensProcessor`, a stock SGLang ``CustomLogitProcessor`` (server flag
  ``--enable-custom-logit-processor``; per request ``custom_params =
  {"tpla_forced_tokens": [t0, t1, ...]}``), sets every logit but ``t_k`` to ``-inf`` at output
  step ``k = len(req.output_ids)`` (needs ``--disable-overlap-schedule`` so ``output_ids`` is
  current when the processor runs), so the sampler picks ``t_k``.
* SGLang 0.5.23 computes the returned log-probabilities AFTER the custom processors
  (``Sampler.forward`` -> ``_preprocess_logits`` runs first; ``SGLANG_RETURN_ORIGINAL_LOGPROB``
  only skips the temperature), so they would be 0 / -inf.  Hook: AROUND
  ``sglang.srt.layers.sampler.Sampler.forward``: when the batch carries forced tokens and
  log-probabilities are requested, the unprocessed logits are copied before the sampler
  runs and the returned token / top-k / token-id log-probabilities are recomputed from them
  (``log_softmax`` of the raw logits, as the greedy path does), for the sampled (= forced)
  token.  Batches without forced tokens are untouched.

Caveat: rows of the same batch that are not forced also get raw-logit log-probabilities
(before temperature or other processors); an evaluation server serves only evaluation
requests.
"""

from __future__ import annotations

import torch

try:  # the server side always has sglang; the client only needs to_str()
    from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor
except Exception:  # noqa: BLE001
    CustomLogitProcessor = object

PARAM = "tpla_forced_tokens"
HOOK_TARGETS = ("sglang.srt.layers.sampler.Sampler.forward",)


class ForcedTokensProcessor(CustomLogitProcessor):
    """Force output token ``k`` of a request to ``custom_params['tpla_forced_tokens'][k]``."""

    def __call__(self, logits, custom_param_list=None):
        for i, params in enumerate(custom_param_list or []):
            if not params or PARAM not in params:
                continue
            targets = params[PARAM]
            k = len(params["__req__"].output_ids)
            if k < len(targets):
                t = int(targets[k])
                logits[i, :] = float("-inf")
                logits[i, t] = 0.0
        return logits


def _forced(sampling_info) -> bool:
    if not getattr(sampling_info, "has_custom_logit_processor", False):
        return False
    return any(p and PARAM in p for p in (sampling_info.custom_params or []))


def _sampler_forward(orig, self, logits_output, sampling_info, return_logprob, top_logprobs_nums, token_ids_logprobs, positions, *args, **kwargs):
    if not (return_logprob and _forced(sampling_info)):
        return orig(self, logits_output, sampling_info, return_logprob, top_logprobs_nums, token_ids_logprobs, positions, *args, **kwargs)
    raw = logits_output.next_token_logits.clone()
    ids = orig(self, logits_output, sampling_info, return_logprob, top_logprobs_nums, token_ids_logprobs, positions, *args, **kwargs)
    logprobs = torch.nn.functional.log_softmax(raw, dim=-1)
    result = self.output_logprob_processor.compute_logprobs(logprobs, top_logprobs_nums, token_ids_logprobs, ids)
    result.write_output_to(logits_output)
    return ids


def install() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(HOOK_TARGETS[0], _sampler_forward, HookType.AROUND)
