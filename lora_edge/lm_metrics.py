"""Language-model measures of a causal-lm graph against PyTorch: perplexity, its delta, top-1 agreement.

These are the numbers the accuracy gate uses for decoders. Everything is
computed from one prefill step per left-padded batch (no generation), with
the same batches fed to the graph (ONNX Runtime, through
:class:`~lora_edge.generate.DecoderRunner`) and to the PyTorch reference, so
the two see identical positions and padding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from lora_edge.errors import DataError

if TYPE_CHECKING:
    import numpy as np

    from lora_edge.generate import DecoderRunner


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


def top1_agreement_count(logits: "np.ndarray", reference_logits: "np.ndarray",
                         attention_mask: "np.ndarray") -> tuple[int, int]:
    """(positions where the two argmax next tokens agree, real positions) over a batch."""
    import numpy as np

    real = np.asarray(attention_mask) > 0
    agree = np.asarray(logits).argmax(axis=-1) == np.asarray(reference_logits).argmax(axis=-1)
    return int((agree & real).sum()), int(real.sum())


@dataclass
class LanguageModelScores:
    """A graph against the PyTorch reference on a text set: perplexities, their delta, top-1 agreement."""

    perplexity: float
    reference_perplexity: float
    top1_agreement: float  # fraction of real positions whose argmax next token matches the reference's
    tokens: int            # next-token predictions scored

    @property
    def perplexity_delta(self) -> float:
        """Graph perplexity minus reference perplexity (positive: the graph is worse)."""
        return self.perplexity - self.reference_perplexity

    @property
    def perplexity_increase_percent(self) -> float:
        """The delta relative to the reference, in percent."""
        return 100.0 * self.perplexity_delta / self.reference_perplexity

    def to_json(self) -> dict:
        """JSON form with the derived deltas."""
        return {"perplexity": self.perplexity, "reference_perplexity": self.reference_perplexity,
                "perplexity_delta": self.perplexity_delta,
                "perplexity_increase_percent": self.perplexity_increase_percent,
                "top1_agreement": self.top1_agreement, "tokens": self.tokens}


def _batches(sequences: list[list[int]], batch_size: int, pad_token_id: int) -> Iterator[tuple]:
    """(input_ids, attention_mask, position_ids) of each left-padded batch, as generation builds them."""
    from lora_edge.generate import left_pad, positions_from_mask

    for start in range(0, len(sequences), batch_size):
        input_ids, attention_mask = left_pad(sequences[start:start + batch_size], pad_token_id)
        yield input_ids, attention_mask, positions_from_mask(attention_mask)


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


def graph_perplexity(runner: "DecoderRunner", sequences: list[list[int]], batch_size: int = 8,
                     pad_token_id: int = 0, adapter=None) -> float:
    """Perplexity of a causal-lm graph on token sequences (exp of the mean next-token NLL)."""
    from lora_edge.metrics import perplexity

    total, count = 0.0, 0
    for batch in _batches(sequences, batch_size, pad_token_id):
        nll, n = next_token_nll(graph_logits(runner, *batch, adapter=adapter), batch[0], batch[1])
        total, count = total + nll, count + n
    return perplexity(total / max(count, 1))


def language_model_scores(runner: "DecoderRunner", reference, sequences: list[list[int]], batch_size: int = 8,
                          pad_token_id: int = 0, adapter=None) -> LanguageModelScores:
    """Perplexity of the graph and of the PyTorch ``reference`` on ``sequences``, and next-token top-1 agreement.

    Both see the same left-padded batches; sequences need >= 2 tokens to be scored.
    """
    from lora_edge.metrics import perplexity

    sums = {"graph": [0.0, 0], "reference": [0.0, 0]}
    agree, positions = 0, 0
    for batch in _batches(sequences, batch_size, pad_token_id):
        outputs = {"graph": graph_logits(runner, *batch, adapter=adapter), "reference": torch_logits(reference, *batch)}
        for name, logits in outputs.items():
            nll, n = next_token_nll(logits, batch[0], batch[1])
            sums[name][0] += nll
            sums[name][1] += n
        same, real = top1_agreement_count(outputs["graph"], outputs["reference"], batch[1])
        agree, positions = agree + same, positions + real
    if sums["graph"][1] == 0:
        raise DataError("no text has two tokens or more", "the text set", "give longer texts to score perplexity")
    ppl = {name: perplexity(total / count) for name, (total, count) in sums.items()}
    return LanguageModelScores(ppl["graph"], ppl["reference"], agree / positions, sums["graph"][1])
