"""Generation on ONNX Runtime against PyTorch generate; the generate CLI; language-model measures."""

from __future__ import annotations

import json

import numpy as np
import pytest

from decoder_bundles import ARCHS, FORMS, adapter_dirs, bundle_for, shared_root
from lora_edge.core.adapters import AdapterRef, load_reference
from lora_edge.core.bundle import ONNX_DIR
from lora_edge.core.choices import Form
from lora_edge.core.manifest import find_graph
from lora_edge.core.errors import ConfigError, ModelError
from lora_edge.runtime.generate import BoundAdapter, DecoderRunner, SamplingSpec, nucleus, generate
from lora_edge.runtime.bundle_generate import encode_prompts, generate_from_bundle
from lora_edge.runtime.adapter_layout import write_packed_adapter
from lora_edge.runtime.session import create_session, load_lora_adapter

PROMPTS = ["the weather in paris is", "hello", "please set a timer for ten minutes and then play some jazz"]
NEW_TOKENS = 32


@pytest.fixture(scope="session")
def bundles(tmp_path_factory, tiny_model, tiny_adapter):
    """Factory: ``bundles(arch, form)`` -> (bundle, graph name), exported once per session."""
    root = shared_root(tmp_path_factory)
    return lambda arch, form: bundle_for(arch, form, root, tiny_model, tiny_adapter)


@pytest.fixture(scope="session")
def references(tiny_model, tiny_adapter):
    """Factory: ``references(arch, name)`` -> the PEFT model (base + adapter, fp32, unmerged), cached."""
    cache = {}

    def make(arch: str, name: str = "a"):
        if (arch, name) not in cache:
            cache[arch, name] = load_reference(tiny_model(arch), AdapterRef(name, adapter_dirs(arch, tiny_adapter)[name]))
        return cache[arch, name]

    return make


def _tokenizer(bundle):
    from lora_edge.core.models import load_tokenizer

    return load_tokenizer(bundle / ONNX_DIR)


def _runner(bundle, graph) -> DecoderRunner:
    return DecoderRunner(create_session(bundle / find_graph(bundle, graph).file), max_positions=128)


def torch_generate(model, prompts: list[list[int]], max_new_tokens: int, eos: int, pad: int,
                   use_adapter: bool = True) -> list[list[int]]:
    """transformers' greedy generate on a left-padded batch; new tokens per row, cut after EOS."""
    import contextlib

    import torch

    from lora_edge.runtime.generate import left_pad

    ids, mask = left_pad(prompts, pad)
    context = contextlib.nullcontext() if use_adapter else model.disable_adapter()
    with context, torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
        rows.append(row[:row.index(eos) + 1] if eos in row else row)
    return rows


def _special(model) -> tuple[int, int]:
    return model.config.eos_token_id, model.config.pad_token_id


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_pytorch_generate_for_every_form(arch, bundles, references):
    reference = references(arch)
    eos, pad = _special(reference)
    bundle, _ = bundles(arch, Form.MERGED)
    prompts = encode_prompts(_tokenizer(bundle), PROMPTS)
    expected = torch_generate(reference, prompts, NEW_TOKENS, eos, pad)
    base = torch_generate(reference, prompts, NEW_TOKENS, eos, pad, use_adapter=False)
    assert all(len(row) == NEW_TOKENS for row in expected), "pick prompts that do not stop at EOS"
    assert expected != base, "the adapter must change the generated tokens"
    for form in FORMS:
        bundle, graph = bundles(arch, form)
        runner = _runner(bundle, graph)
        adapters = [None]
        if form is Form.HOTSWAP:  # bound to the cache-keeping loop, and through session.run's RunOptions
            path = bundle / ONNX_DIR / "adapters" / "a.onnx_adapter"
            adapters = [BoundAdapter.load(path), load_lora_adapter(path)]
        for adapter in adapters:
            result = generate(runner, prompts, NEW_TOKENS, eos_token_id=eos, pad_token_id=pad, adapter=adapter)
            assert result.new_ids == expected, f"{arch} {form.value} {type(adapter).__name__}: ONNX Runtime and " \
                                               "PyTorch disagree"
        if form is Form.HOTSWAP:  # the same session with no adapter active is the base model
            assert generate(runner, prompts, NEW_TOKENS, eos_token_id=eos, pad_token_id=pad).new_ids == base


@pytest.mark.slow
def test_sliding_window_attention_stays_exact_past_the_window(tiny_model, tiny_adapter, references, tmp_path):
    """Mistral with a 6-token window, 40 new tokens: the graph keeps the whole past and the mask applies the window."""
    import shutil

    from lora_edge.export.bundle import export_bundle

    windowed = tmp_path / "mistral-window"
    shutil.copytree(tiny_model("mistral"), windowed)
    config = json.loads((windowed / "config.json").read_text())
    config["sliding_window"] = 6
    (windowed / "config.json").write_text(json.dumps(config))
    adapter = adapter_dirs("mistral", tiny_adapter)["a"]
    bundle = export_bundle(windowed, [AdapterRef("a", adapter)], ["merged"], tmp_path / "bundle", task="causal-lm",
                           progress=lambda message: None)
    reference = load_reference(windowed, AdapterRef("a", adapter))
    eos, pad = _special(reference)
    prompts = encode_prompts(_tokenizer(bundle), PROMPTS)
    expected = torch_generate(reference, prompts, 40, eos, pad)
    assert expected != torch_generate(references("mistral"), prompts, 40, eos, pad), "the window must matter"
    got = generate(_runner(bundle, "merged.fp32"), prompts, 40, eos_token_id=eos, pad_token_id=pad)
    assert got.new_ids == expected


def test_hotswap_switches_adapters_between_prompts_in_one_session(bundles, references):
    bundle, graph = bundles("llama", Form.HOTSWAP)
    runner = _runner(bundle, graph)
    session = runner.session
    files = {name: BoundAdapter.load(bundle / ONNX_DIR / "adapters" / f"{name}.onnx_adapter") for name in "ab"}
    eos, pad = _special(references("llama"))
    prompts = encode_prompts(_tokenizer(bundle), PROMPTS[:2])
    expected = {name: torch_generate(references("llama", name), prompts, NEW_TOKENS, eos, pad) for name in "ab"}
    assert expected["a"] != expected["b"]
    for name in ("a", "b", "a", "b"):  # switch back and forth, run by run
        got = generate(runner, prompts, NEW_TOKENS, eos_token_id=eos, pad_token_id=pad, adapter=files[name])
        assert got.new_ids == expected[name], f"adapter {name}"
    assert runner.session is session


def test_left_padded_batch_equals_one_prompt_at_a_time(bundles):
    bundle, graph = bundles("llama", Form.BRANCHED)
    runner = _runner(bundle, graph)
    prompts = encode_prompts(_tokenizer(bundle), PROMPTS)
    assert len({len(p) for p in prompts}) == len(prompts), "prompts of different lengths need padding"
    batch = generate(runner, prompts, NEW_TOKENS, eos_token_id=None)
    singles = [generate(runner, [p], NEW_TOKENS, eos_token_id=None).new_ids[0] for p in prompts]
    assert batch.new_ids == singles
    assert batch.prompt_ids == prompts


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(bundles):
    bundle, graph = bundles("llama", Form.MERGED)
    runner = _runner(bundle, graph)
    prompts = encode_prompts(_tokenizer(bundle), PROMPTS[:2])

    def run(**spec):
        return generate(runner, prompts, 16, SamplingSpec(greedy=False, **spec), eos_token_id=None).new_ids

    assert run(temperature=1.5, seed=3) == run(temperature=1.5, seed=3)
    assert run(temperature=1.5, seed=3) != run(temperature=1.5, seed=4)
    greedy = generate(runner, prompts, 16, eos_token_id=None).new_ids
    assert run(temperature=1.0, top_p=1e-9, seed=5) == greedy  # only the top token survives


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    p = np.array([0.05, 0.5, 0.2, 0.25])
    assert list(nucleus(p, 0.5)) == [1]
    assert list(nucleus(p, 0.7)) == [1, 3]
    assert list(nucleus(p, 0.76)) == [1, 3, 2]
    assert len(nucleus(p, 1.0)) == 4
    big = np.random.default_rng(0).dirichlet(np.full(5000, 0.05))
    for top_p in (0.3, 0.9, 0.999):  # the candidate shortcut and the full sort agree
        assert set(nucleus(big, top_p, candidates=64)) == set(nucleus(big, top_p, candidates=10**6))


@pytest.mark.parametrize("spec, field", [(dict(temperature=0.0), "--temperature"), (dict(top_p=1.5), "--top-p")])
def test_sampling_spec_rejects_bad_values(spec, field):
    from lora_edge.core.errors import ConfigError

    with pytest.raises(ConfigError, match=field):
        SamplingSpec(greedy=False, **spec)


def test_generate_refuses_a_prompt_longer_than_the_context(bundles):
    from lora_edge.core.errors import ConfigError, DataError

    bundle, graph = bundles("llama", Form.MERGED)
    with pytest.raises(DataError, match="context is 128"):
        generate_from_bundle(bundle, graph, ["word " * 200], max_new_tokens=4)
    # a prompt that fits, with more new tokens than the context leaves, is refused before any step runs
    with pytest.raises(ConfigError, match="--max-new-tokens|runs past the model's context") as caught:
        generate_from_bundle(bundle, graph, ["word " * 120], max_new_tokens=64)
    assert "at most" in caught.value.fix
    out = generate_from_bundle(bundle, graph, ["word " * 120], max_new_tokens=int(caught.value.fix.split()[4]))
    assert len(out.result.prompt_ids[0]) + len(out.result.new_ids[0]) <= 128


# --- the CLI ---------------------------------------------------------------------------------------------

def _cli(args, capsys):
    from lora_edge.cli import main

    capsys.readouterr()  # drop what fixtures printed (a bundle's first use exports it through the CLI)
    code = 0
    try:
        main(args)
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_generate_streams_the_greedy_text(bundles, capsys):
    bundle, graph = bundles("gpt2", Form.HOTSWAP)
    code, out, err = _cli(["generate", str(bundle), "--graph", graph, "--adapter", "a", "--prompt", PROMPTS[0],
                           "--max-new-tokens", "12", "--greedy"], capsys)
    assert code == 0, err
    expected = generate_from_bundle(bundle, graph, [PROMPTS[0]], "a", 12)
    assert out.strip() == expected.texts[0].strip() and out.strip()
    assert "tokens/s" in err


def test_cli_generate_json(bundles, capsys):
    bundle, graph = bundles("gpt2", Form.MERGED)
    code, out, err = _cli(["generate", str(bundle), "--graph", graph, "--prompt", PROMPTS[1],
                           "--max-new-tokens", "8", "--temperature", "0.7", "--top-p", "0.9", "--seed", "1",
                           "--json"], capsys)
    assert code == 0, err
    payload = json.loads(out)
    assert payload["prompt_ids"] == encode_prompts(_tokenizer(bundle), [PROMPTS[1]])
    assert len(payload["new_ids"][0]) == 8
    assert payload["prefill_tokens_per_second"] > 0 and payload["decode_tokens_per_second"] > 0
    again = json.loads(_cli(["generate", str(bundle), "--graph", graph, "--prompt", PROMPTS[1], "--max-new-tokens",
                             "8", "--temperature", "0.7", "--top-p", "0.9", "--seed", "1", "--json"], capsys)[1])
    assert again["new_ids"] == payload["new_ids"]


def test_cli_generate_renders_the_bundles_chat_template(bundles, tmp_path, capsys):
    """With a chat template (a copy of the bundle given one) prompts are user turns, as transformers renders them."""
    import shutil

    from gguf_helpers import CHATML

    source, graph = bundles("llama", Form.MERGED)
    bundle = tmp_path / "bundle"
    shutil.copytree(source, bundle)
    (bundle / ONNX_DIR / "chat_template.jinja").write_text(CHATML)
    tokenizer = _tokenizer(bundle)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[0]}]
    expected = tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                         add_special_tokens=False)["input_ids"]
    args = ["generate", str(bundle), "--graph", graph, "--prompt", PROMPTS[0], "--max-new-tokens", "4", "--json"]
    code, out, err = _cli(args + ["--system", "Be brief."], capsys)
    assert code == 0, err
    assert json.loads(out)["prompt_ids"] == [list(expected)]
    code, out, err = _cli(args + ["--raw"], capsys)  # --raw: the plain text, as without a template
    assert code == 0 and json.loads(out)["prompt_ids"] == encode_prompts(tokenizer, [PROMPTS[0]])
    # a bundle without a template: plain text by default, --chat refused in one line
    code, out, err = _cli(["generate", str(source), "--graph", graph, "--prompt", "hi", "--chat"], capsys)
    assert code == ModelError.exit_code and err.strip().startswith("error: ") and "chat template" in err
    code, out, err = _cli(["generate", str(source), "--graph", graph, "--prompt", "hi", "--system", "x"], capsys)
    assert code == ConfigError.exit_code and "--system" in err


def test_cli_generate_bad_input_has_distinct_exit_codes(bundles, capsys):
    llama, llama_graph = bundles("llama", Form.HOTSWAP)
    gpt2, _ = bundles("gpt2", Form.HOTSWAP)
    cases = {
        "unknown graph": (["--graph", "nope.fp32", "--prompt", "hi"], 9, "no graph named 'nope.fp32'"),
        "prompt too long": (["--graph", llama_graph, "--adapter", "a", "--prompt", "word " * 200], 3, "context"),
        "new tokens past the context": (["--graph", llama_graph, "--adapter", "a", "--prompt", "hi",
                                         "--max-new-tokens", "500"], ConfigError.exit_code, "--max-new-tokens"),
        "adapter of another base": (["--graph", llama_graph, "--adapter",
                                     str(gpt2 / ONNX_DIR / "adapters" / "a.onnx_adapter"), "--prompt", "hi"], 4,
                                    "another base model"),
        "greedy and sampling": (["--graph", llama_graph, "--greedy", "--temperature", "0.5", "--prompt", "hi"],
                                ConfigError.exit_code, "--greedy"),
    }
    for name, (args, exit_code, message) in cases.items():
        code, out, err = _cli(["generate", str(llama)] + args, capsys)
        assert code == exit_code, f"{name}: exit {code}, {err}"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], f"{name}: {err}"


# --- language-model measures -----------------------------------------------------------------------------

def test_next_token_nll_matches_torch_cross_entropy():
    import torch

    from lora_edge.check.lm_metrics import next_token_nll

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
    ids = rng.integers(0, 11, size=(2, 5))
    mask = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    total, count = next_token_nll(logits, ids, mask)
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits[0, 2:4]), torch.from_numpy(ids[0, 3:5]),
                                                 reduction="sum")
    expected += torch.nn.functional.cross_entropy(torch.from_numpy(logits[1, :4]), torch.from_numpy(ids[1, 1:]),
                                                  reduction="sum")
    assert count == 6
    assert total == pytest.approx(float(expected), rel=1e-6)


def test_graph_perplexity_and_greedy_continuations_match_pytorch(bundles, references):
    """The gate's decoder scores (lm_metrics) on a hot-swap graph equal PyTorch's own loss and generate()."""
    import torch

    from lora_edge.runtime.generate import left_pad, positions_from_mask
    from lora_edge.check.lm_metrics import graph_greedy, graph_logits, greedy_agreement, next_token_nll, torch_greedy

    reference = references("llama", "a")
    bundle, graph = bundles("llama", Form.HOTSWAP)
    runner = _runner(bundle, graph)
    sequences = encode_prompts(_tokenizer(bundle), PROMPTS + ["turn the lights off in the kitchen"])
    # PyTorch perplexity computed independently: one sequence at a time, the model's own loss
    losses, tokens = 0.0, 0
    with torch.no_grad():
        for ids in sequences:
            tensor = torch.tensor([ids])
            losses += float(reference(input_ids=tensor, labels=tensor).loss) * (len(ids) - 1)
            tokens += len(ids) - 1
    adapter = load_lora_adapter(bundle / ONNX_DIR / "adapters" / "a.onnx_adapter")
    ids, mask = left_pad(sequences, 0)
    nll, count = next_token_nll(graph_logits(runner, ids, mask, positions_from_mask(mask), adapter), ids, mask)
    assert count == tokens and nll == pytest.approx(losses, rel=1e-4)
    base_nll, _ = next_token_nll(graph_logits(runner, ids, mask, positions_from_mask(mask)), ids, mask)
    assert abs(base_nll - losses) > 1.0  # without its adapter the graph is the base model: a drift

    expected = torch_greedy(reference, sequences, 8, {2}, 0)
    assert graph_greedy(runner, sequences, 8, {2}, 0, adapter) == expected
    assert greedy_agreement(expected, expected) == 1.0
    assert greedy_agreement(graph_greedy(runner, sequences, 8, {2}, 0), expected) < 1.0


# --- decoder graph rewrites (lora_edge.quantize.decoder) ----------------------------------------------------

def test_fused_decoder_graphs_generate_like_pytorch(bundles, references, tmp_path):
    """RMSNorm/rotary fusions keep merged and hot-swap graphs token-exact with PyTorch greedy generate."""
    import onnx

    from lora_edge.quantize.decoder import fuse_decoder

    reference = references("llama")
    eos, pad = _special(reference)
    layers = reference.config.num_hidden_layers
    for form in (Form.MERGED, Form.HOTSWAP):
        bundle, graph = bundles("llama", form)
        source = bundle / find_graph(bundle, graph).file
        config = json.loads((bundle / ONNX_DIR / "config.json").read_text())
        fused, report = fuse_decoder(onnx.load(source), str(source), config)
        assert report.dropped is None and report.max_abs_diff < 1e-4
        assert report.rms_norm + report.skip_rms_norm == 2 * layers + 1 and report.rotary == 2 * layers
        assert report.group_query_attention == layers and report.grouped_attention == 0
        assert report.packed_qkv == layers  # q, k, v one MatMul; the hot-swap LoRA branches are added to their slices
        assert report.nodes_after < report.nodes_before
        path = tmp_path / f"{form.value}.fused.onnx"
        onnx.save(fused, path)
        runner = DecoderRunner(create_session(path), max_positions=128)
        assert runner.shared_cache and runner.chunk_rows == 1  # generate appends to one buffer in place
        prompts = encode_prompts(_tokenizer(bundle), PROMPTS)
        adapter = BoundAdapter.load(bundle / ONNX_DIR / "adapters" / "a.onnx_adapter") if form is Form.HOTSWAP else None
        got = generate(runner, prompts, NEW_TOKENS, eos_token_id=eos, pad_token_id=pad, adapter=adapter)
        assert got.new_ids == torch_generate(reference, prompts, NEW_TOKENS, eos, pad), form.value
    _packed_hotswap_switches_adapters(runner, fused, bundle, references, prompts)


def _packed_hotswap_switches_adapters(runner, fused, bundle, references, prompts) -> None:
    """The fused hot-swap graph takes one packed A and B per layer for q|v (its per-target q/v inputs are gone);
    per-target adapters of different ranks (a: 4, b: 2) and the base model switch run by run in one session."""
    layers = references("llama").config.num_hidden_layers
    names = {value.name for value in fused.graph.input}
    assert len(runner.packs) == layers and {pack.a for pack in runner.packs} <= names
    assert not any(".q_proj.lora_" in name or ".v_proj.lora_" in name for name in names)
    eos, pad = _special(references("llama"))
    files = {name: BoundAdapter.load(bundle / ONNX_DIR / "adapters" / f"{name}.onnx_adapter") for name in "ab"}
    expected = {name: torch_generate(references("llama", name), prompts, NEW_TOKENS, eos, pad) for name in "ab"}
    expected[None] = torch_generate(references("llama", "a"), prompts, NEW_TOKENS, eos, pad, use_adapter=False)
    assert len({str(rows) for rows in expected.values()}) == 3
    for name in ("b", None, "a", "b"):
        got = generate(runner, prompts, NEW_TOKENS, eos_token_id=eos, pad_token_id=pad,
                       adapter=files[name] if name else None)
        assert got.new_ids == expected[name], f"adapter {name}"


def test_a_decoder_rewrite_not_kept_gives_back_the_source_graph(bundles, monkeypatch):
    """fuse_decoder rewrites in place (no copy of the weights): when it drops the result, the file comes back whole."""
    import onnx

    from lora_edge.quantize import decoder as quantize_decoder

    bundle, graph = bundles("llama", Form.MERGED)
    source = bundle / find_graph(bundle, graph).file
    config = json.loads((bundle / ONNX_DIR / "config.json").read_text())

    def half_done(model, config, report, group_query):
        quantize_decoder.fuse_rms_norms(model, report)  # the graph is changed, then the rewrites fail
        raise RuntimeError("a rewrite failed half-way")

    monkeypatch.setattr(quantize_decoder, "_rewrite", half_done)
    model = onnx.load(source)
    back, report = quantize_decoder.fuse_decoder(model, str(source), config)
    assert "a rewrite failed half-way" in report.dropped
    assert back.SerializeToString() == onnx.load(source).SerializeToString()


@pytest.mark.parametrize("block_size", [32, 64])
def test_int4_tied_embedding_is_stored_once_and_reads_the_head_rows(block_size, bundles, tmp_path):
    """A tied embedding/LM head is one int4 tensor: the lookup returns exactly the head's dequantized rows, also
    when the hidden size (32) is not a whole number of blocks (64: each row's one block padded, then sliced)."""
    import shutil

    import onnx
    from onnx import helper, numpy_helper

    from lora_edge.core.recipe import QuantizeOptions
    from lora_edge.quantize.quantizer import quantize_graph

    bundle, graph = bundles("llama", Form.MERGED)
    model = onnx.load(bundle / find_graph(bundle, graph).file)
    inits = {init.name: init for init in model.graph.initializer}
    embedding = next(node.input[0] for node in model.graph.node if node.op_type == "Gather" and node.input[0] in inits)
    weight = numpy_helper.to_array(inits[embedding])
    transposes = {node.output[0]: node for node in model.graph.node if node.op_type == "Transpose"}
    vocab_by_hidden, hidden_by_vocab = [weight.shape[1], weight.shape[0]], list(weight.shape)
    reads = next(node.input[1] for node in model.graph.node if node.op_type == "MatMul" and (
        node.input[1] in inits and list(inits[node.input[1]].dims) == vocab_by_hidden
        or node.input[1] in transposes and transposes[node.input[1]].input[0] in inits
        and list(inits[transposes[node.input[1]].input[0]].dims) == hidden_by_vocab))
    if reads in inits:  # the head stored transposed: give it the embedding's values
        inits[reads].CopyFrom(numpy_helper.from_array(weight.T.copy(), reads))  # tie them, as SmolLM2 is
    else:  # MatMul(x, Transpose(W)): read the embedding's own tensor, as a tied export does
        transposes[reads].input[0] = embedding
    (tmp_path / "onnx").mkdir()
    shutil.copy(bundle / ONNX_DIR / "config.json", tmp_path / "onnx" / "config.json")
    onnx.save(model, tmp_path / "onnx" / "tied.fp32.onnx")
    result = quantize_graph(tmp_path / "onnx" / "tied.fp32.onnx", tmp_path / "onnx" / "tied.int4.onnx", "int4",
                            QuantizeOptions(block_size=block_size), task="causal-lm")
    assert result.details.get("tied_embedding")
    quantized = onnx.load(result.path)
    vocab_tensors = sorted(init.name for init in quantized.graph.initializer
                           if init.dims and init.dims[0] == weight.shape[0])
    assert len(vocab_tensors) == 2 and vocab_tensors[0].endswith("_Q4")  # the head's only: blocks and scales
    head = vocab_tensors[0][:-len("_Q4")]
    assert vocab_tensors[1] == f"{head}_scales"
    lookup = next(node for node in quantized.graph.node if node.op_type == "GatherBlockQuantized")
    rows = next(node.output[0] for node in quantized.graph.node if lookup.output[0] in node.input)
    rows = next((node.output[0] for node in quantized.graph.node if node.op_type == "Slice" and rows in node.input),
                rows)  # (padded rows: sliced to the hidden size)
    quantized.graph.output.append(helper.make_tensor_value_info(rows, onnx.TensorProto.FLOAT, None))
    from lora_edge.runtime.feeds import sample_decoder_feeds

    session = __import__("onnxruntime").InferenceSession(quantized.SerializeToString(),
                                                         providers=["CPUExecutionProvider"])
    feeds = sample_decoder_feeds(quantized)[0]
    got = session.run([rows], {i.name: feeds[i.name] for i in session.get_inputs()})[0]
    packed = numpy_helper.to_array(next(i for i in quantized.graph.initializer if i.name == f"{head}_Q4"))
    scales = numpy_helper.to_array(next(i for i in quantized.graph.initializer if i.name == f"{head}_scales"))
    nibbles = np.stack([packed & 15, packed >> 4], -1).reshape(len(packed), -1, block_size).astype(np.float32)
    dequantized = ((nibbles - 8) * scales.reshape(len(packed), -1, 1)).reshape(len(packed), -1)[:, :weight.shape[1]]
    np.testing.assert_array_equal(got, dequantized[feeds["input_ids"]])
    assert np.abs(got - weight[feeds["input_ids"]]).max() < np.abs(weight).max() / 4  # 4-bit rounding only


def _fused_runner(bundle, graph, tmp_path) -> DecoderRunner:
    """A runner of ``graph`` after the CPU rewrites (GroupQueryAttention), saved under ``tmp_path``."""
    import onnx

    from lora_edge.quantize.decoder import fuse_decoder

    source = bundle / find_graph(bundle, graph).file
    config = json.loads((bundle / ONNX_DIR / "config.json").read_text())
    fused, report = fuse_decoder(onnx.load(source), str(source), config)
    assert report.group_query_attention and report.dropped is None
    path = tmp_path / f"{graph}.gqa.onnx"
    onnx.save(fused, path)
    return DecoderRunner(create_session(path), max_positions=128)


@pytest.mark.parametrize("form", [Form.MERGED, Form.BRANCHED, Form.HOTSWAP])
def test_group_query_attention_graph_matches_pytorch_step_by_step(form, bundles, references, tmp_path):
    """Fused graph vs PyTorch (base + adapter) logits: left-padded prefill of 3 rows + 5 decode steps, in a cache
    buffer that must grow on the way; a one-row chunk of 3 tokens after a past; a 2-row chunk is refused."""
    import torch

    from lora_edge.core.errors import DataError
    from lora_edge.runtime.generate import left_pad, positions_from_mask

    reference = references("llama", "a")
    bundle, graph = bundles("llama", form)
    runner = _fused_runner(bundle, graph, tmp_path)
    adapter = BoundAdapter.load(bundle / ONNX_DIR / "adapters" / "a.onnx_adapter") if form is Form.HOTSWAP else None
    ids, mask = left_pad(encode_prompts(_tokenizer(bundle), PROMPTS), 0)
    width, steps = ids.shape[1], 5
    new = np.random.default_rng(0).integers(3, 90, size=(len(ids), steps))
    full_ids, full_mask = np.concatenate([ids, new], 1), np.concatenate([mask, np.ones_like(new)], 1)
    with torch.no_grad():
        expected = reference(input_ids=torch.from_numpy(full_ids), attention_mask=torch.from_numpy(full_mask),
                             position_ids=torch.from_numpy(positions_from_mask(full_mask))).logits.numpy()
    scale = np.abs(expected).max()
    logits, past = runner.bound_step(ids, mask, positions_from_mask(mask), None, adapter, capacity=width + 2)
    np.testing.assert_allclose(logits, expected[:, width - 1], atol=1e-4 * scale)
    for t in range(steps):
        step_mask = full_mask[:, :width + t + 1]
        logits, past = runner.bound_step(new[:, t:t + 1], step_mask, positions_from_mask(step_mask)[:, -1:], past,
                                         adapter)
        np.testing.assert_allclose(logits, expected[:, width + t], atol=1e-4 * scale)
    assert past[0].shape()[2] >= width + steps  # the buffer grew past its first capacity

    # numpy feeds with an exact past (the contract's I/O): a one-row chunk of 3 tokens after a prefill
    lora = None
    if form is Form.HOTSWAP:  # the fused graph takes its LoRA inputs packed: the file packed for it
        assert runner.packs, "the q/v LoRA inputs of the fused hot-swap graph are packed"
        lora = load_lora_adapter(write_packed_adapter(runner.packs, bundle / ONNX_DIR / "adapters" / "a.onnx_adapter",
                                                      tmp_path / "a.packed.onnx_adapter"))
    row, cut = full_ids[2:], width + 2
    _, exact = runner.step(row[:, :width], full_mask[2:, :width], positions_from_mask(full_mask[2:, :width]),
                           runner.empty_past(1), lora)
    chunk, _ = runner.step(row[:, width:cut + 1], full_mask[2:, :cut + 1],
                           positions_from_mask(full_mask[2:, :cut + 1])[:, width:], exact, lora)
    np.testing.assert_allclose(chunk[0], expected[2, width:cut + 1], atol=1e-4 * scale)
    with pytest.raises(DataError, match="one at a time"):
        runner.step(full_ids[:2, width:cut], full_mask[:2, :cut], positions_from_mask(full_mask[:2, :cut])[:, width:],
                    [np.zeros((2, runner.num_kv_heads, width, runner.head_dim), np.float32)] * len(runner.past_names))


def test_profiler_times_a_shared_cache_graph_as_generate_runs_it(bundles, tmp_path):
    """decoder_phases on a GroupQueryAttention graph: lengths from the mask, the same logits as the exported graph."""
    from lora_edge.profile.profiler import decoder_phases

    bundle, graph = bundles("llama", Form.MERGED)
    fused = decoder_phases(_fused_runner(bundle, graph, tmp_path).session, batch=2, seq=8, vocab_size=100)
    plain = decoder_phases(create_session(bundle / find_graph(bundle, graph).file), batch=2, seq=8, vocab_size=100)
    assert (fused.past_length, fused.present_length) == (plain.past_length, plain.present_length) == (8, 9)
    for phase in ("prefill", "decode", "decode"):  # the decode step runs again on the same buffers
        want, got = getattr(plain, phase)()[0], getattr(fused, phase)()[0]
        np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())


def test_int4_decoder_with_mapped_weights_generates_the_same(bundles, tmp_path):
    """decoder_settings (weights mapped from the file, loaded pages dropped, no arena): an int4 decoder's
    prefill logits and greedy tokens equal an ordinary session's, two generations in a row (each releases
    its cache)."""
    from lora_edge.quantize.quantizer import quantize_graph
    from lora_edge.runtime.session import decoder_settings

    bundle, graph = bundles("llama", Form.MERGED)
    result = quantize_graph(bundle / find_graph(bundle, graph).file, tmp_path / "merged.int4.onnx", "int4",
                            task="causal-lm")
    plain = DecoderRunner(create_session(result.path), max_positions=128)
    mapped = DecoderRunner(create_session(result.path, decoder_settings(1)), max_positions=128)
    ids = np.array([[5, 9, 14, 3, 27, 8]], dtype=np.int64)
    mask, positions = np.ones_like(ids), np.arange(ids.shape[1])[None]
    want, _ = plain.bound_step(ids, mask, positions, None)
    got, _ = mapped.bound_step(ids, mask, positions, None)
    np.testing.assert_array_equal(got, want)
    prompts = [[5, 9, 14, 3], [7, 7, 2, 30, 11]]
    expected = generate(plain, prompts, 12, pad_token_id=0).new_ids
    for _ in range(2):
        assert generate(mapped, prompts, 12, pad_token_id=0).new_ids == expected
        assert not mapped._bindings  # the generation's cache buffers are not kept
