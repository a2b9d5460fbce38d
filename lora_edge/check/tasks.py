"""How the accuracy gate feeds and reads each task's graphs and references (a registry per task).

A task backend turns texts into batches, runs a batch through the PyTorch
reference and through an ONNX Runtime session (with a hot-swap adapter when
given), picks the logit rows to compare, and computes the task metric.
Classification: one row per example, accuracy and macro-F1 on labels.
Causal LM: one row per real token (top-1 agreement there is next-token
agreement) and perplexity; the graph runs through the decoder stage's
:class:`~lora_edge.runtime.generate.DecoderRunner` (prefill with an empty past). Then
greedy continuations of the evaluation prompts, graph against reference:
token agreement, and on chat data the exact match of the answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from lora_edge.check.data import EvalSet
from lora_edge.check.metrics import LogitComparison, classification_scores
from lora_edge.core.data import encode_texts

if TYPE_CHECKING:
    import onnxruntime


@dataclass
class Batch:
    """One batch of the evaluation set: graph feeds (numpy) and, for causal LMs, the real-token mask."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    token_mask: np.ndarray | None = None  # causal LM: [batch, sequence] bool, True on real tokens


@dataclass
class Continuations:
    """Greedy continuations of an evaluation set's prompts (token ids, each cut after its first EOS)."""

    tokens: list[list[int]]
    texts: list[str]

    @classmethod
    def decoded(cls, tokens: list[list[int]], tokenizer) -> "Continuations":
        """The continuations with their texts (special tokens dropped, stripped), as answers are compared."""
        return cls(tokens, [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in tokens])


class ClassificationBackend:
    """Sequence classification: logits [batch, classes]."""

    task = "seq-cls"

    def batches(self, tokenizer, evalset: EvalSet, batch_size: int, max_length: int) -> list[Batch]:
        """Tokenize the texts into padded batches (int64 feeds), with their labels."""
        out = []
        for start in range(0, len(evalset.texts), batch_size):
            encoded = encode_texts(tokenizer, evalset.texts[start:start + batch_size], max_length)
            labels = (np.asarray(evalset.labels[start:start + batch_size]) if evalset.labels is not None else None)
            out.append(Batch({k: v.numpy().astype(np.int64) for k, v in encoded.items()}, labels))
        return out

    def reference(self, model, batch: Batch) -> np.ndarray:
        """Logits of the PyTorch model on a batch."""
        import torch

        names = ("input_ids", "attention_mask", "token_type_ids")
        with torch.no_grad():
            inputs = {k: torch.from_numpy(v) for k, v in batch.feeds.items() if k in names}
            return model(**inputs).logits.float().numpy()

    def graph(self, session: "onnxruntime.InferenceSession", batch: Batch,
              adapter: "onnxruntime.LoraAdapter | None") -> np.ndarray:
        """Logits of an ONNX graph on a batch."""
        from lora_edge.runtime.session import run

        names = [o.name for o in session.get_outputs()]
        output = ["logits"] if "logits" in names else names[:1]
        return np.asarray(run(session, batch.feeds, adapter=adapter, output_names=output)[0], dtype=np.float32)

    def rows(self, logits: np.ndarray, batch: Batch) -> np.ndarray:
        """Rows to compare: one per example."""
        return logits

    def task_scores(self, graph: list[np.ndarray], reference: list[np.ndarray], batches: list[Batch],
                    evalset: EvalSet) -> dict[str, float]:
        """Accuracy and macro-F1 of graph and reference, and the drops (points)."""
        labels = np.concatenate([b.labels for b in batches])
        return classification_scores(np.concatenate(graph), np.concatenate(reference), labels.tolist(),
                                     evalset.n_classes)


class CausalLMBackend:
    """Causal LM: logits [batch, sequence, vocabulary] of one prefill step over left-padded batches.

    Batching, the graph run and the PyTorch run are the decoder stage's own
    (:mod:`lora_edge.runtime.generate`, :mod:`lora_edge.check.lm_metrics`), so the gate sees
    exactly the positions and padding that generation uses.
    """

    task = "causal-lm"

    def batches(self, tokenizer, evalset: EvalSet, batch_size: int, max_length: int) -> list[Batch]:
        """Left-padded batches with position ids and the real-token mask."""
        from lora_edge.runtime.generate import left_pad, positions_from_mask

        sequences = [tokenizer(text, truncation=True, max_length=max_length)["input_ids"] for text in evalset.texts]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        out = []
        for start in range(0, len(sequences), batch_size):
            ids, mask = left_pad(sequences[start:start + batch_size], pad)
            out.append(Batch({"input_ids": ids, "attention_mask": mask, "position_ids": positions_from_mask(mask)},
                             None, np.asarray(mask) > 0))
        return out

    def reference(self, model, batch: Batch) -> np.ndarray:
        """Logits of the PyTorch model on a batch (no cache)."""
        from lora_edge.check.lm_metrics import torch_logits

        return torch_logits(model, batch.feeds["input_ids"], batch.feeds["attention_mask"],
                            batch.feeds["position_ids"])

    def graph(self, session: "onnxruntime.InferenceSession", batch: Batch,
              adapter: "onnxruntime.LoraAdapter | None") -> np.ndarray:
        """Logits of the decoder graph on a batch: one prefill step from an empty past."""
        from lora_edge.runtime.generate import DecoderRunner
        from lora_edge.check.lm_metrics import graph_logits

        logits = graph_logits(DecoderRunner(session), batch.feeds["input_ids"], batch.feeds["attention_mask"],
                              batch.feeds["position_ids"], adapter=adapter)
        return np.asarray(logits, dtype=np.float32)

    def rows(self, logits: np.ndarray, batch: Batch) -> np.ndarray:
        """Rows to compare: one per real (unpadded) token, i.e. every next-token prediction."""
        return logits[batch.token_mask]

    def task_scores(self, graph: list[np.ndarray], reference: list[np.ndarray], batches: list[Batch],
                    evalset: EvalSet) -> dict[str, float]:
        """Perplexity of graph and reference on the texts, and the increase in percent."""
        from lora_edge.check.lm_metrics import next_token_nll
        from lora_edge.core.metrics import perplexity

        totals = {"graph": [0.0, 0], "reference": [0.0, 0]}
        for g, r, batch in zip(graph, reference, batches):
            for name, logits in (("graph", g), ("reference", r)):
                nll, count = next_token_nll(logits, batch.feeds["input_ids"], batch.feeds["attention_mask"])
                totals[name][0] += nll
                totals[name][1] += count
        ppl = {name: perplexity(total / max(count, 1)) for name, (total, count) in totals.items()}
        return {"perplexity": ppl["graph"], "reference_perplexity": ppl["reference"],
                "perplexity_increase": 100.0 * (ppl["graph"] - ppl["reference"]) / ppl["reference"]}

    def reference_continuations(self, model, tokenizer, prompts: list[list[int]], spec: "Generation") -> Continuations:
        """The PyTorch reference's greedy continuations (transformers ``generate``)."""
        from lora_edge.check.lm_metrics import torch_greedy

        tokens = torch_greedy(model, prompts, spec.max_new_tokens, spec.eos, spec.pad_token_id)
        return Continuations.decoded(tokens, tokenizer)

    def graph_continuations(self, session: "onnxruntime.InferenceSession", tokenizer, prompts: list[list[int]],
                            spec: "Generation", adapter: "onnxruntime.LoraAdapter | None") -> Continuations:
        """The graph's greedy continuations (``lora-edge generate``'s decode loop)."""
        from lora_edge.runtime.generate import DecoderRunner
        from lora_edge.check.lm_metrics import graph_greedy

        tokens = graph_greedy(DecoderRunner(session), prompts, spec.max_new_tokens, spec.eos, spec.pad_token_id,
                              adapter)
        return Continuations.decoded(tokens, tokenizer)

    def generation_scores(self, graph: Continuations, reference: Continuations,
                          answers: list[str] | None) -> dict[str, float]:
        """Greedy token agreement; with expected answers, exact match of both sides and the drop in points."""
        from lora_edge.core.chat import exact_match
        from lora_edge.check.lm_metrics import greedy_agreement

        scores = {"greedy_agreement": greedy_agreement(graph.tokens, reference.tokens),
                  "greedy_prompts": float(len(reference.tokens))}
        if answers:
            def share(texts: list[str]) -> float:
                return sum(exact_match(text, answer) for text, answer in zip(texts, answers)) / len(answers)

            scores["exact_match"], scores["reference_exact_match"] = share(graph.texts), share(reference.texts)
            scores["exact_match_drop"] = 100.0 * (scores["reference_exact_match"] - scores["exact_match"])
        return scores


@dataclass(frozen=True)
class Generation:
    """How the gate generates: most new tokens per prompt, the stop tokens, the padding token."""

    max_new_tokens: int
    eos: frozenset[int]
    pad_token_id: int


BACKENDS: dict[str, Any] = {"seq-cls": ClassificationBackend(), "causal-lm": CausalLMBackend()}


def compare_logits(backend, graph: list[np.ndarray], reference: list[np.ndarray],
                   batches: list[Batch]) -> dict[str, float]:
    """The logit metrics of a graph's outputs against the reference's, batch by batch."""
    comparison = LogitComparison()
    for g, r, batch in zip(graph, reference, batches):
        comparison.update(backend.rows(g, batch), backend.rows(r, batch))
    return comparison.results()
