"""Language-model measures of a causal-lm graph against PyTorch: next-token NLL, logits, greedy continuations.

These are the accuracy gate's decoder scores (:mod:`lora_edge.check.tasks`).
Logits come from one prefill step per left-padded batch, fed identically to
the graph (ONNX Runtime, through :class:`~lora_edge.runtime.generate.DecoderRunner`)
and to the PyTorch reference, so both see the same positions and padding.
Greedy continuations run each side's own decode loop (the graph's is
``lora-edge generate``'s, the reference's is transformers' ``generate``) on
the same left-padded prompts, and are compared token by token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    from lora_edge.runtime.generate import DecoderRunner


def next_token_nll(logits: "np.ndarray", input_ids: "np.ndarray", attention_mask: "np.ndarray") -> tuple[float, int]:
    """(sum of next-token negative log-likelihoods, count) over a left-padded batch.

    Position t predicts token t+1; a pair counts when both tokens are real
    (mask 1). Computed in float64 from logits [batch, sequence, vocab].
    """
    import numpy as np

    logits = np.asarray(logits, dtype=np.float64)[:, :-1]
    targets = np.asarray(input_ids)[:, 1:]
    mask = np.asarray(attention_mask)
    pairs = (mask[:, :-1] > 0) & (mask[:, 1:] > 0)
    if not pairs.any():
        return 0.0, 0
    rows = logits[pairs]
    peak = rows.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(rows - peak).sum(axis=-1)) + peak[:, 0]
    nll = log_norm - rows[np.arange(len(rows)), targets[pairs]]
    return float(nll.sum()), int(pairs.sum())


def graph_logits(runner: "DecoderRunner", input_ids, attention_mask, position_ids, adapter=None) -> "np.ndarray":
    """Logits of a causal-lm graph on a left-padded batch: one prefill step from an empty past."""
    logits, _ = runner.step(input_ids, attention_mask, position_ids, runner.empty_past(len(input_ids)), adapter)
    return logits


def torch_logits(model, input_ids, attention_mask, position_ids) -> "np.ndarray":
    """Logits of a PyTorch causal LM (e.g. the PEFT reference) on the same batch, no cache."""
    import torch

    with torch.no_grad():
        output = model(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                       position_ids=torch.from_numpy(position_ids), use_cache=False)
    return output.logits.float().numpy()


def _until_eos(tokens: list[int], eos: set[int]) -> list[int]:
    """A continuation up to and including its first EOS token."""
    for index, token in enumerate(tokens):
        if token in eos:
            return tokens[:index + 1]
    return tokens


def graph_greedy(runner: "DecoderRunner", prompts: list[list[int]], max_new_tokens: int, eos: set[int],
                 pad_token_id: int, adapter=None) -> list[list[int]]:
    """Greedy continuation of each prompt by the graph (one left-padded batch), each cut after its first EOS."""
    from lora_edge.runtime.generate import generate

    result = generate(runner, prompts, max_new_tokens, eos_token_id=sorted(eos), pad_token_id=pad_token_id,
                      adapter=adapter)
    return [_until_eos(ids, eos) for ids in result.new_ids]


def torch_greedy(model, prompts: list[list[int]], max_new_tokens: int, eos: set[int],
                 pad_token_id: int) -> list[list[int]]:
    """Greedy continuation of each prompt by a PyTorch causal LM (transformers ``generate``, left-padded batch)."""
    import torch

    from lora_edge.runtime.generate import left_pad

    input_ids, attention_mask = left_pad(prompts, pad_token_id)
    with torch.no_grad():
        output = model.generate(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                                max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(eos),
                                pad_token_id=pad_token_id)
    return [_until_eos(row.tolist(), eos) for row in output[:, input_ids.shape[1]:]]


def greedy_agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Share of the reference's continuation tokens the graph matches at the same position (1.0: identical)."""
    same = sum(a == b for ids, ref in zip(tokens, reference) for a, b in zip(ids, ref))
    total = sum(len(ref) for ref in reference)
    return same / total if total else 1.0
