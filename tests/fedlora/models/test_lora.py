import numpy as np
import torch

from fedlora.client.training import train_plain
from fedlora.core.arrays import subtract
from fedlora.data.sources import load_task_data_cached
from fedlora.models.lora import (
    build_lora_model,
    get_arrays,
    set_arrays,
    trainable_names,
)
from fedlora.tasks import get_task
from fedlora.tasks.runtime import get_bundle


def _model(cfg):
    _, base = get_task(cfg.model).load(cfg.model, 2, 0)
    return build_lora_model(base, cfg.lora)


def test_delta_round_trip(tiny_cfg):
    cfg = tiny_cfg()
    model = _model(cfg)
    names = trainable_names(model)
    arrays = get_arrays(model, names)
    rng = np.random.default_rng(0)
    changed = [a + rng.normal(size=a.shape).astype(np.float32) for a in arrays]
    set_arrays(model, names, changed)
    back = get_arrays(model, names)
    for x, y in zip(changed, back):
        np.testing.assert_array_equal(x, y)
    delta = subtract(back, arrays)
    set_arrays(model, names, [a + d for a, d in zip(arrays, delta)])
    for x, y in zip(get_arrays(model, names), changed):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


def test_set_arrays_rejects_wrong_shape(tiny_cfg):
    model = _model(tiny_cfg())
    names = trainable_names(model)
    arrays = get_arrays(model, names)
    arrays[0] = np.zeros((3, 3), dtype=np.float32)
    try:
        set_arrays(model, names, arrays)
    except ValueError as err:
        assert "shape" in str(err)
    else:
        raise AssertionError("a mis-shaped tensor was accepted")


def test_lora_init_is_identical_across_builds(tiny_cfg):
    cfg = tiny_cfg()
    a, b = _model(cfg), _model(cfg)
    for (n1, p1), (n2, p2) in zip(a.named_parameters(), b.named_parameters()):
        assert n1 == n2
        assert torch.equal(p1, p2), n1


def test_ffa_lora_sends_no_a_and_a_stays_fixed(tiny_cfg):
    cfg = tiny_cfg("lora.freeze_a=true", "train.lr=0.5")
    task = load_task_data_cached(cfg.data, cfg.seed)
    bundle = get_bundle(cfg, task.num_labels)
    names = bundle.names
    assert not any("lora_A" in n for n in names)
    assert any("lora_B" in n for n in names)
    assert any("classifier" in n for n in names)
    a_before = {n: p.detach().clone() for n, p in bundle.model.named_parameters() if "lora_A" in n}
    b_before = [a.copy() for a in get_arrays(bundle.model, names)]
    classification = get_task(cfg.model)
    data = classification.encode(task.train.select(range(32)), bundle.tokenizer, cfg.model)
    train_plain(bundle.model, data, cfg.train, 3, torch.Generator().manual_seed(0), classification.loss)
    params = dict(bundle.model.named_parameters())
    for n, before in a_before.items():
        assert torch.equal(params[n], before), f"{n} moved under FFA-LoRA"
    after = get_arrays(bundle.model, names)
    moved = [not np.array_equal(x, y) for x, y in zip(after, b_before)]
    assert any(moved), "no B/head tensor was trained"
    full = get_bundle(tiny_cfg(), task.num_labels)
    assert sum(a.size for a in after) < sum(a.size for a in get_arrays(full.model, full.names))


def test_layers_to_transform_counts_negative_indices_from_the_top():
    import pytest

    from fedlora.core.errors import ConfigError
    from fedlora.models.lora import resolve_layers

    assert resolve_layers([-1], 30) == [29]
    assert resolve_layers([-2, -1, 3], 30) == [3, 28, 29]
    assert resolve_layers(None, 30) is None
    with pytest.raises(ConfigError, match="lora.layers_to_transform"):
        resolve_layers([30], 30)
    with pytest.raises(ConfigError, match="lora.layers_to_transform"):
        resolve_layers([-31], 30)
    with pytest.raises(ConfigError, match="lora.layers_to_transform"):
        resolve_layers([-1], None)
