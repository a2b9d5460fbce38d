import pytest

from tiny_models import DECODERS, ENCODERS


@pytest.mark.parametrize("arch", ENCODERS + DECODERS)
def test_tiny_models_load_and_run(arch, tiny_model, tiny_adapter):
    import torch
    from peft import PeftModel

    from lora_edge.core.choices import Task
    from lora_edge.core.models import load_base_model, load_tokenizer

    task = Task.SEQ_CLS if arch in ENCODERS else Task.CAUSAL_LM
    path = tiny_model(arch)
    model = load_base_model(path, task)
    tok = load_tokenizer(path)
    batch = tok(["turn the lights on", "hi"], return_tensors="pt", padding=True)
    base = model(**batch).logits
    peft_model = PeftModel.from_pretrained(model, str(tiny_adapter(arch)))
    adapted = peft_model(**batch).logits
    assert torch.isfinite(adapted).all()
    assert (adapted - base).abs().max() > 1e-4, "a random adapter must change the output"
