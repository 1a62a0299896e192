"""The frozen-prefix cache of the causal-LM task on a tiny random Llama: a step from the
cached input of the lowest adapted layer has the whole model's loss and per-example
gradients, DP-SGD on it moves the adapter, and it applies only where layers lie frozen."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from opacus import GradSampleModule

from fedlora.core.config import compose
from fedlora.core.errors import ConfigError
from fedlora.models.lora import build_lora_model, get_arrays, trainable_names
from fedlora.tasks import get_task
from fedlora.tasks.frozen_prefix import PrefixData, check_exact, first_trained_layer, top_mlp_only

TOP = ["experiment=lm", "model=tiny_llama", "model.random_init.num_hidden_layers=4", "model.cache_frozen_prefix=true",
       "model.frozen_prefix_dir=null",
       "lora.layers_to_transform=[2,3]", "tracking=none"]


# LoRA on attention of the top two layers; LoRA on the top layer's MLP only (the cache
# then holds the input of that MLP block in the answer columns).
CACHES = [[], ["lora.target_modules=[gate_proj,up_proj,down_proj]", "lora.layers_to_transform=[3]"]]


def build(*overrides: str):
    cfg = compose([*TOP, *overrides])
    task = get_task(cfg.model)
    tokenizer, base = task.load(cfg.model, 2, 0)
    model = build_lora_model(base, cfg.lora, task.peft_task_type)
    with torch.no_grad():  # B = 0 at initialisation: give the adapted layers an effect
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.train()
    rows = Dataset.from_dict({
        "prompt": [json.dumps([{"role": "user", "content": "word " * (3 + 4 * i) + "?"}]) for i in range(6)],
        "response": ["great" if i % 2 else "not great at all" for i in range(6)], "label": [i % 2 for i in range(6)]})
    return cfg, task, model, task.encode(rows, tokenizer, cfg.model)


def test_the_lowest_trained_layer_is_found_and_nothing_is_cached_without_a_frozen_prefix():
    cfg, task, model, data = build()
    assert first_trained_layer(model) == 2
    assert isinstance(task.training_data(model, data, cfg.model, 4), PrefixData)
    cfg, task, model, data = build("lora.layers_to_transform=null")
    assert first_trained_layer(model) is None
    assert task.training_data(model, data, cfg.model, 4) is data
    cfg, task, model, data = build("model.cache_frozen_prefix=false")
    assert task.training_data(model, data, cfg.model, 4) is data
    cfg, task, model, data = build(*CACHES[1])
    assert top_mlp_only(model)
    cached = task.training_data(model, data, cfg.model, 4)
    # Only the answer columns (the longest answer, "not great at all" + the end of the
    # turn, and the column before it) are kept, not the prompts.
    longest = int((data.tensors[2] != -100).sum(dim=1).max())
    assert cached.tensors[0].shape[1] == longest + 1 < data.tensors[0].shape[1]


@pytest.mark.parametrize("overrides", CACHES, ids=["top_layers", "top_mlp"])
def test_loss_and_per_example_gradients_equal_the_whole_models(overrides):
    cfg, task, model, data = build(*overrides)
    cached = task.training_data(model, data, cfg.model, 4)  # built in chunks of 4 rows of other widths
    gsm = GradSampleModule(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def per_example(batch):
        for p in params:
            p.grad_sample = None
        task.loss(gsm, batch).backward()
        out = torch.cat([p.grad_sample.reshape(len(batch[0]), -1) for p in params], dim=1)
        gsm.zero_grad(set_to_none=True)
        return out

    with torch.no_grad():
        full_loss = task.per_example_loss(model, data.tensors)
        cached_loss = task.per_example_loss(model, cached.tensors)
    assert torch.allclose(full_loss, cached_loss, atol=1e-5)
    full, fast = per_example(data.tensors), per_example(cached.tensors)
    assert full.abs().max() > 0
    assert torch.allclose(full, fast, atol=1e-5, rtol=1e-4)
    gsm._close()


@pytest.mark.parametrize("overrides", CACHES, ids=["top_layers", "top_mlp"])
def test_dp_sgd_from_the_cache_moves_the_adapter(dp_steps, overrides):
    cfg, task, model, data = build(*overrides)
    cached = task.training_data(model, data, cfg.model, 3)
    names = trainable_names(model)
    before = get_arrays(model, names)
    stats = dp_steps(model, cached, cfg.train, task.loss, steps=2, sample_rate=0.5, batch=3)
    after = get_arrays(model, names)
    assert stats.steps == 2
    assert all(n.startswith("base_model.model.model.layers.") for n in names)
    assert any(abs(a - b).max() > 0 for n, a, b in zip(names, after, before) if "lora_B" in n)


def test_a_forward_that_is_not_the_models_is_refused():
    check_exact(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 1e-6]))
    with pytest.raises(ConfigError, match="model.cache_frozen_prefix"):
        check_exact(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]))


def test_a_prefix_kept_on_disk_is_reused_and_one_of_other_weights_is_rebuilt(tmp_path):
    cfg, task, model, data = build(*CACHES[1], f"model.frozen_prefix_dir={tmp_path}")
    first = task.training_data(model, data, cfg.model, 4)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1
    # Another process of the client reads the file: same tensors, nothing recomputed.
    stamp = files[0].stat().st_mtime_ns
    again = task.training_data(model, data, cfg.model, 4)
    assert files[0].stat().st_mtime_ns == stamp
    assert all(torch.equal(a, b) for a, b in zip(first.tensors, again.tensors))
    # A file whose activations do not match the model (corrupted, or stale) is rebuilt.
    hidden, mask, labels = torch.load(files[0], weights_only=True)
    torch.save([hidden + 1.0, mask, labels], files[0])
    rebuilt = task.training_data(model, data, cfg.model, 4)
    assert torch.equal(rebuilt.tensors[0], first.tensors[0])
    # Other frozen weights are another key: a second file, not the first one's features.
    with torch.no_grad():
        model.get_base_model().model.embed_tokens.weight.mul_(1.5)
    other = task.training_data(model, data, cfg.model, 4)
    assert len(list(tmp_path.glob("*.pt"))) == 2
    assert not torch.equal(other.tensors[0], first.tensors[0])
