"""Heterogeneous and adaptive LoRA ranks: padding, FlexLoRA's SVD aggregation, pruning,
the adaptive rank, and a real client training at a lower rank."""

import numpy as np
import pytest
import torch

from fedlora.client.numpy_client import LoRAClient
from fedlora.core.config import compose
from fedlora.core.errors import ConfigError
from fedlora.models.ranks import (
    LoRALayout,
    RankPlan,
    component_energy,
    energy_rank,
    flexlora,
    mask,
    pad,
    pruned_rank,
    svd_order,
    truncate,
)
from fedlora.plan import build_plan_cached
from strategies.aggregators import get_aggregator

# Two adapted layers (A: r x in, B: out x r) and a head, in sorted-name order.
NAMES = ["classifier.weight", "l0.lora_A.weight", "l0.lora_B.weight", "l1.lora_A.weight", "l1.lora_B.weight"]
LAYOUT = LoRALayout.from_names(NAMES)


def adapter(rng, rank, out=6, inp=5):
    return [rng.normal(size=(2, 4)), rng.normal(size=(rank, inp)), rng.normal(size=(out, rank)),
            rng.normal(size=(rank, inp)), rng.normal(size=(out, rank))]


def flat(arrays):
    return np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])


def product(arrays, pair):
    a, b = LAYOUT.pairs[pair]
    return np.asarray(arrays[b], np.float64) @ np.asarray(arrays[a], np.float64)


def test_layout_pairs_each_b_with_its_a():
    assert LAYOUT.pairs == ((1, 2), (3, 4))
    assert LAYOUT.axes() == {1: 0, 2: 1, 3: 0, 4: 1}


def test_truncate_then_pad_keeps_shapes_and_zeroes_the_rest():
    arrays = adapter(np.random.default_rng(0), rank=8)
    small = truncate(arrays, LAYOUT, 3)
    assert [a.shape for a in small] == [(2, 4), (3, 5), (6, 3), (3, 5), (6, 3)]
    back = pad(small, LAYOUT, 8)
    assert [a.shape for a in back] == [a.shape for a in arrays]
    np.testing.assert_array_equal(back[1][:3], arrays[1][:3])
    assert not back[1][3:].any() and not back[2][:, 3:].any()
    np.testing.assert_array_equal(back[0], arrays[0])  # the head is no LoRA factor
    np.testing.assert_array_equal(mask(arrays, LAYOUT, 3)[4], back[4])


def test_zero_padding_with_equal_ranks_is_the_rule_itself():
    rng = np.random.default_rng(1)
    rows = np.stack([flat(pad(truncate(adapter(rng, 8), LAYOUT, 8), LAYOUT, 8)) for _ in range(3)])
    plain = np.stack([r.copy() for r in rows])
    weights = np.array([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(get_aggregator("fedavg")(rows, weights), get_aggregator("fedavg")(plain, weights))


def test_zero_padding_averages_a_component_with_the_zeros_of_clients_without_it():
    rng = np.random.default_rng(2)
    big, small = adapter(rng, 4), adapter(rng, 2)
    rows = np.stack([flat(big), flat(pad(small, LAYOUT, 4))])
    mean = get_aggregator("fedavg")(rows, np.array([1.0, 1.0]))
    b0 = _split(mean, big)[2]  # l0.lora_B
    np.testing.assert_allclose(b0[:, 3], big[2][:, 3] / 2, rtol=1e-6)
    np.testing.assert_allclose(b0[:, 1], (big[2][:, 1] + small[2][:, 1]) / 2, rtol=1e-6)


def test_flexlora_keeps_the_best_rank_r_approximation_of_the_mean_product():
    rng = np.random.default_rng(3)
    rank = 4
    global_arrays = [a.astype(np.float32) for a in adapter(rng, rank)]
    ranks = [4, 2, 3]
    rows, locals_ = [], []
    for r in ranks:
        local = mask([g + rng.normal(scale=0.5, size=g.shape) for g in global_arrays], LAYOUT, r)
        locals_.append(local)
        # The delta a rank-r client sends (first r components), padded by the server.
        delta = truncate([l - g for l, g in zip(local, global_arrays)], LAYOUT, r)
        rows.append(flat(pad(delta, LAYOUT, rank)))
    weights = np.array([2.0, 1.0, 1.0])
    update = flexlora(global_arrays, np.stack(rows).astype(np.float32), weights, ranks, LAYOUT)
    new = [g + u for g, u in zip(global_arrays, _split(update, global_arrays))]
    assert [a.shape for a in new] == [a.shape for a in global_arrays]
    w = weights / weights.sum()
    for pair in range(2):
        mean = sum(wk * product(local, pair) for wk, local in zip(w, locals_))
        u, s, vt = np.linalg.svd(mean)
        best = (u[:, :rank] * s[:rank]) @ vt[:rank]
        np.testing.assert_allclose(product(new, pair), best, rtol=1e-4, atol=1e-4)
    # The head takes the weighted mean of its deltas.
    head = sum(wk * (local[0] - global_arrays[0]) for wk, local in zip(w, locals_))
    np.testing.assert_allclose(new[0], global_arrays[0] + head, rtol=1e-5, atol=1e-5)


def test_flexlora_of_one_client_reproduces_its_product():
    rng = np.random.default_rng(4)
    global_arrays = [a.astype(np.float32) for a in adapter(rng, 4)]
    local = [g + rng.normal(size=g.shape).astype(np.float32) for g in global_arrays]
    row = flat([l - g for l, g in zip(local, global_arrays)])[None].astype(np.float32)
    new = [g + u for g, u in zip(global_arrays, _split(flexlora(global_arrays, row, np.ones(1), [4], LAYOUT),
                                                          global_arrays))]
    np.testing.assert_allclose(product(new, 0), product(local, 0), rtol=1e-4, atol=1e-4)


def _split(flat_update, like):
    out, i = [], 0
    for a in like:
        out.append(flat_update[i:i + a.size].reshape(a.shape))
        i += a.size
    return out


def test_svd_order_keeps_the_products_and_sorts_the_components():
    arrays = adapter(np.random.default_rng(5), rank=5)
    ordered, spectra = svd_order(arrays, LAYOUT)
    for pair in range(2):
        np.testing.assert_allclose(product(ordered, pair), product(arrays, pair), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(spectra[pair], np.linalg.svd(product(arrays, pair), compute_uv=False)[:5],
                                   rtol=1e-6)
    energy = component_energy(ordered, LAYOUT)
    assert np.all(np.diff(energy) <= 1e-6)  # strongest first


def test_energy_rank_is_the_smallest_rank_holding_the_share():
    s = np.sqrt(np.array([50.0, 30.0, 15.0, 5.0]))  # energies 50, 30, 15, 5 of 100
    assert energy_rank([s], 0.5) == 1
    assert energy_rank([s], 0.8) == 2
    assert energy_rank([s], 0.81) == 3
    assert energy_rank([s], 1.0) == 4
    assert energy_rank([s, np.array([1.0, 0, 0, 0])], 0.81) == 3  # the largest over the pairs


def test_self_pruning_drops_weak_trailing_components():
    rng = np.random.default_rng(6)
    arrays = adapter(rng, 4)
    for i in (2, 4):
        arrays[i][:, 2:] *= 1e-3  # components 2 and 3 carry almost nothing
    assert pruned_rank(arrays, LAYOUT, 0.05) == 2
    assert pruned_rank(adapter(rng, 4), LAYOUT, 1e-6) == 4


def test_rank_plan_from_config():
    cfg = compose(["federation.num_clients=6", "+federation.client_ranks=[2,4,8]"])
    plan = RankPlan.from_config(cfg)
    assert plan.client_ranks == (2, 4, 8, 2, 4, 8) and plan.global_rank == 8 and plan.heterogeneous
    drawn = RankPlan.from_config(compose(["federation.num_clients=20", "federation.client_rank_choices=[2,16]"]))
    assert set(drawn.client_ranks) == {2, 16}
    assert drawn == RankPlan.from_config(compose(["federation.num_clients=20", "federation.client_rank_choices=[2,16]"]))
    assert not RankPlan.from_config(compose([])).varies
    with pytest.raises(ConfigError, match="federation.client_ranks"):
        RankPlan.from_config(compose(["federation.num_clients=2", "+federation.client_ranks=[2,4,8]"]))
    with pytest.raises(ConfigError, match="federation.client_ranks"):
        RankPlan.from_config(compose(["+federation.client_ranks=[0,4]"]))
    with pytest.raises(ConfigError, match="lora.aggregation"):
        RankPlan.from_config(compose(["lora.aggregation=stack"]))
    with pytest.raises(ConfigError, match="lora.adaptive_energy"):
        RankPlan.from_config(compose(["lora.adaptive_energy=1.5"]))


@pytest.mark.parametrize("privacy", ["privacy=none", "privacy=sample"])
def test_a_client_of_lower_rank_trains_and_sends_only_its_components(tiny_cfg, tmp_path, privacy):
    cfg = tiny_cfg(privacy, "+federation.client_ranks=[2,8]", "lora.r=8", "train.local_steps=3")
    plan = build_plan_cached(cfg)
    client = LoRAClient(plan, 0, tmp_path)
    start = client.get_parameters({})
    from fedlora.tasks.runtime import get_bundle
    bundle = get_bundle(cfg, plan.num_labels)
    delta, _, metrics = client.fit([p.copy() for p in start], {"server_round": 1, "experiment_id": "e"})
    assert metrics["lora_rank"] == 2
    expected = truncate(start, bundle.layout, 2)
    assert [d.shape for d in delta] == [e.shape for e in expected]
    assert any(np.abs(d).sum() > 0 for d in delta)
    # The trained model is exactly rank 2: every later component is zero.
    params = dict(bundle.model.named_parameters())
    for name in bundle.names:
        if "lora_A" in name:
            assert not params[name][2:].detach().any()
        if "lora_B" in name:
            assert not params[name][:, 2:].detach().any()
    # The global adapter's rank is the largest client rank; the rank-8 client sends all of it.
    other = LoRAClient(plan, 1, tmp_path)
    full, _, m1 = other.fit([p.copy() for p in start], {"server_round": 1, "experiment_id": "e"})
    assert m1["lora_rank"] == 8 and [d.shape for d in full] == [s.shape for s in start]
    # The server's cap lowers it.
    capped, _, m2 = other.fit([p.copy() for p in start], {"server_round": 2, "experiment_id": "e", "rank_cap": 3})
    assert m2["lora_rank"] == 3


def test_every_rank_shares_the_scaling_of_lora_r(tiny_cfg):
    from fedlora.tasks.runtime import get_bundle
    cfg = tiny_cfg("privacy=none", "+federation.client_ranks=[2,16]", "lora.r=8", "lora.alpha=16")
    model = get_bundle(cfg, 2).model
    scalings = {m.scaling["default"] for m in model.modules() if isinstance(getattr(m, "scaling", None), dict)}
    assert scalings == {2.0}  # alpha / lora.r, not alpha / 16
    assert all(tuple(p.shape)[0] == 16 for n, p in model.named_parameters() if "lora_A" in n)


def test_rank_constraint_keeps_trailing_components_zero_under_dp(tiny_cfg):
    from fedlora.models.lora import rank_constraint
    from fedlora.tasks.runtime import get_bundle
    cfg = tiny_cfg("privacy=none", "+federation.client_ranks=[2,4]", "lora.r=4")
    bundle = get_bundle(cfg, 2)
    zero = rank_constraint(bundle.model, bundle.names, 2)
    params = dict(bundle.model.named_parameters())
    name = next(n for n in bundle.names if "lora_B" in n)
    with torch.no_grad():
        params[name].add_(1.0)
    zero()
    assert not params[name][:, 2:].any() and params[name][:, :2].abs().sum() > 0


def _strategy(ranks_plan, global_arrays, **kwargs):
    from strategies.fedlora_strategy import FedLoRAStrategy
    return FedLoRAStrategy(initial_arrays=global_arrays, ranks=ranks_plan, layout=LAYOUT, **kwargs)


def _replies(deltas_and_ranks):
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    out = []
    for pid, (delta, rank) in enumerate(deltas_and_ranks):
        metrics = {"partition_id": pid, "steps": 1}
        if rank is not None:
            metrics["lora_rank"] = rank
        res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([np.asarray(d, np.float32) for d in delta]), 1,
                     metrics)
        out.append((GridClientProxy(pid + 1, None, 0), res))
    return out


def test_the_strategy_pads_mixed_ranks_and_rejects_a_false_rank():
    rng = np.random.default_rng(7)
    global_arrays = [a.astype(np.float32) for a in adapter(rng, 4)]
    plan = RankPlan(reference_rank=4, client_ranks=(4, 2, 2))
    strategy = _strategy(plan, global_arrays)
    big = [rng.normal(size=a.shape) for a in global_arrays]
    small = truncate([rng.normal(size=a.shape) for a in global_arrays], LAYOUT, 2)
    liar = truncate([rng.normal(size=a.shape) for a in global_arrays], LAYOUT, 2)
    strategy.aggregate_fit(1, _replies([(big, 4), (small, 2), (liar, 3)]), [])
    expected = [g + (np.asarray(b, np.float32) + np.asarray(s, np.float32)) / 2
                for g, b, s in zip(global_arrays, big, pad(small, LAYOUT, 4))]
    for got, want in zip(strategy.global_arrays, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_adaptive_rank_caps_the_next_round_and_survives_a_checkpoint():
    rng = np.random.default_rng(8)
    global_arrays = [np.zeros_like(a, dtype=np.float32) for a in adapter(rng, 4)]
    plan = RankPlan(reference_rank=4, client_ranks=(), adaptive_energy=0.9)
    strategy = _strategy(plan, global_arrays)
    # One strong direction per layer: its share of the energy is far above 0.9.
    delta = [rng.normal(size=a.shape) for a in global_arrays]
    for a_i, b_i in LAYOUT.pairs:
        delta[a_i][1:] *= 1e-3
        delta[b_i][:, 1:] *= 1e-3
    strategy.aggregate_fit(1, _replies([(delta, 4)]), [])
    assert strategy.rank_cap == 1
    instructions = strategy.fit_round(1, _Manager(), lambda r, cm, ins: [(None, ins)])
    assert instructions[0][1].config["rank_cap"] == 1
    other = _strategy(plan, [np.zeros_like(a) for a in global_arrays])
    other.restore(strategy.checkpoint(1))
    assert other.rank_cap == 1


class _Manager:
    def num_available(self):
        return 1
