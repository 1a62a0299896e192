"""Fuzzing what hostile clients and careless configs can hand the server.

A reply is the one thing every client fully controls: its tensors (any count, shape,
dtype, value, or bytes that are no array at all) and its metrics. Whatever arrives,
``validate_update`` and ``triage`` must reject it with a reason or accept a finite
float32 row of the adapter's size, never raise and never let a non-finite number reach
a rule. A config override is the operator's input: preflight must end in a plan or a
ConfigError naming the setting, never in another exception.
"""

from __future__ import annotations

import copy
import functools
import io
import math

import numpy as np
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters
from flwr.server.compat.grid_client_proxy import GridClientProxy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from omegaconf import OmegaConf

from fedlora.core.arrays import flatten
from fedlora.core.config import compose
from fedlora.core.errors import ConfigError
from strategies.preflight import preflight
from strategies.triage import triage
from strategies.validation import validate_update

REF = [np.zeros((4, 3), np.float32), np.zeros(5, np.float32)]
D = sum(a.size for a in REF)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Dtypes a client can put on the wire (np.save without pickles); object arrays, lists
# and None are given to the validator directly.
WIRE_DTYPES = [np.float16, np.float32, np.float64, np.longdouble, np.complex64, np.complex128, np.int8,
               np.int64, np.uint8, np.bool_]
FLOAT_EXTREMES = [0.0, -0.0, 1.0, np.nan, np.inf, -np.inf, 1e300, -1e300, 3.5e38, 3.4028235e38,
                  np.finfo(np.float32).tiny, 5e-324]


@st.composite
def hostile_array(draw, like=None):
    """One tensor: shaped ``like`` the expected one (so dtype and values are what is
    tested) or any other way (0-d, far more floats than the adapter has, transposed);
    any wire dtype; values from the float extremes."""
    shapes = st.sampled_from([(4, 3), (5,), (), (4, 3000), (3, 4), (12,), (0,), (4, 3, 1)]) | hnp.array_shapes(
        min_dims=0, max_dims=3, min_side=0, max_side=6)
    shape = like.shape if like is not None and draw(st.integers(0, 3)) else draw(shapes)
    dtype = np.dtype(draw(st.sampled_from(WIRE_DTYPES)))
    if dtype.kind not in "fc":
        return np.zeros(shape, dtype=dtype)
    with np.errstate(over="ignore"):  # 1e300 in float16/float32 is inf: one more extreme
        array = np.full(shape, draw(st.sampled_from(FLOAT_EXTREMES)), dtype=dtype)
        if array.size and draw(st.booleans()):
            array.flat[draw(st.integers(0, array.size - 1))] = draw(st.sampled_from(FLOAT_EXTREMES))
    return array


@st.composite
def hostile_update(draw):
    """A list of tensors: right or wrong in count, shape, dtype and values."""
    good = [np.full(a.shape, draw(st.sampled_from([0.5, -2.0])), np.float32) for a in REF]
    arrays = draw(st.lists(hostile_array(), min_size=0, max_size=4))
    mode = draw(st.sampled_from(["random", "one bad", "valid"]))
    if mode == "one bad":
        arrays = list(good)
        i = draw(st.integers(0, len(REF) - 1))
        arrays[i] = draw(hostile_array(like=REF[i]))
    elif mode == "valid":
        arrays = good
    return arrays


def _check_verdict(arrays, reason):
    if reason is None:
        assert len(arrays) == len(REF)
        assert all(a.shape == r.shape for a, r in zip(arrays, REF))
        row = flatten(arrays)
        assert row.dtype == np.float32 and row.size == D and np.all(np.isfinite(row))
    else:
        assert isinstance(reason, str) and reason


@FAST
@given(hostile_update())
def test_validate_update_accepts_only_what_aggregates_finitely(arrays):
    _check_verdict(arrays, validate_update(arrays, REF))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(["object", "list", "none", "scalar"]), min_size=1, max_size=3))
def test_validate_update_rejects_what_is_no_float_array(kinds):
    make = {"object": lambda r: np.empty(r.shape, dtype=object), "list": lambda r: np.zeros(r.shape).tolist(),
            "none": lambda r: None, "scalar": lambda r: 1.0}
    arrays = [make[k](r) for k, r in zip(kinds, REF)] + [np.zeros(r.shape, np.float32) for r in REF[len(kinds):]]
    assert isinstance(validate_update(arrays, REF), str)


def test_float64_beyond_float32_range_is_rejected():
    """Finite in float64, infinite in the float32 row a rule sums: a NaN factory."""
    reason = validate_update([np.full((4, 3), 1e300), np.ones(5)], REF)
    assert reason is not None and "float32" in reason


def _npy(header: str, body: bytes = b"") -> bytes:
    magic = b"\x93NUMPY\x01\x00"
    text = header.encode("latin1")
    pad = 64 - (len(magic) + 2 + len(text) + 1) % 64
    text += b" " * pad + b"\n"
    return magic + len(text).to_bytes(2, "little") + text + body


def _pickled_object_array() -> bytes:
    # An object array needs pickles to load; the server never unpickles (allow_pickle=False).
    return _npy("{'descr': '|O', 'fortran_order': False, 'shape': (2,), }", b"\x80\x04N.")


def _saved(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, a=np.zeros((4, 3), np.float32))
    return buffer.getvalue()


BLOBS = st.sampled_from([
    b"", b"\x00", b"not numpy", _pickled_object_array(),
    _saved(np.zeros((4, 3), np.float32))[:-5],  # truncated body
    _npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4, 3), }"),  # header only
    _npy("{'descr': '<f4', 'fortran_order': False, 'shape': (10**12,), }"),  # claims a terabyte
    _npy("{'descr': 'garbage', 'fortran_order': False, 'shape': (5,), }", b"\x00" * 20),
    b"PK\x03\x04", _npz(),  # np.load opens zip magic as an .npz archive
]) | st.binary(max_size=64)

@st.composite
def hostile_reply(draw, pid):
    """Tensors as ndarrays of any shape, dtype and value, or bytes that are no array;
    any example count (FitRes carries whatever the client put there)."""
    if draw(st.booleans()):
        parameters = ndarrays_to_parameters(draw(hostile_update()))
    else:
        tensors = draw(st.lists(BLOBS, min_size=0, max_size=3))
        if draw(st.booleans()):  # one good tensor among the blobs
            tensors.insert(0, _saved(np.zeros((4, 3), np.float32)))
        parameters = Parameters(tensors=tensors, tensor_type="numpy.ndarray")
    num_examples = draw(st.one_of(st.integers(-5, 10**12),
                                  st.sampled_from([0, True, 2.5, math.nan, math.inf, "7", None, np.int64(3)])))
    return GridClientProxy(pid + 1, None, 0), FitRes(Status(Code.OK, ""), parameters, num_examples,
                                                     {"partition_id": pid})


@st.composite
def hostile_round(draw):
    n = draw(st.integers(1, 4))
    results = [draw(hostile_reply(pid)) for pid in range(n)]
    honest = [np.full(a.shape, 1.0, np.float32) for a in REF]
    if draw(st.booleans()):
        results.append((GridClientProxy(99, None, 0),
                        FitRes(Status(Code.OK, ""), ndarrays_to_parameters(honest), 10, {"partition_id": 98})))
    return results


@FAST
@given(hostile_round())
def test_triage_sorts_every_reply_and_passes_on_only_finite_rows(results):
    batch = triage(results, [RuntimeError("a crashed client")], REF, bytes_down=0)
    # Every reply is accounted for once: a client record (accepted, declined or rejected
    # with its reason), or a refusal without one (cid None, its node named).
    refused = [r for r in batch.rejected if r.get("cid") is None and r.get("node_id") is not None]
    assert len(batch.clients) + len(refused) == len(results)
    accepted = [c for c in batch.clients if c.get("accepted")]
    assert all(isinstance(r.get("reason"), str) and r["reason"] for r in batch.rejected)
    assert batch.updates.shape == (len(accepted), D) and batch.updates.dtype == np.float32
    assert np.all(np.isfinite(batch.updates))
    assert batch.weights.shape == (len(accepted),) and np.all(np.isfinite(batch.weights))
    assert np.all(batch.weights > 0)
    if any(res.metrics == {"partition_id": 98} for _, res in results):
        # The honest reply is accepted whatever its neighbours sent.
        assert 98 in batch.row_cids


# -- preflight ------------------------------------------------------------------------

TINY = [
    "model=tiny_bert", "data.max_train_samples=120", "data.max_test_samples=40", "federation.num_clients=2",
    "federation.rounds=3", "train.batch_size=16", "train.local_steps=2", "train.probe_steps=0",
]
# What a Hydra override can hand over: numbers of every sign and size, NaN/inf, strings,
# booleans, null, lists and maps.
OVERRIDE = st.one_of(
    st.integers(-3, 300), st.sampled_from([0, 1, 2, 10**9, -(10**9)]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 0.5, 1.0, 1.5, -0.5, 1e-300]),
    st.sampled_from(["", "abc", "1e400", "nan", "-1", "package:nope", "main", "a..b"]),
    st.booleans(), st.none(), st.just([1, 2]), st.just({"a": 1}),
)
NO_DP_KEYS = [
    "federation.num_clients", "federation.rounds", "federation.fraction_fit", "federation.fraction_evaluate",
    "federation.min_fit_clients", "federation.min_fit_results", "federation.selection",
    "train.batch_size", "train.local_steps", "train.lr", "lora.r", "lora.alpha",
    "data.max_train_samples", "data.validation_fraction", "strategy.norm_bound", "strategy.aggregator",
    "model.revision", "seed",
]
DP_KEYS = ["privacy.target_epsilon", "privacy.delta", "privacy.max_grad_norm", "privacy.max_noise_multiplier",
           "privacy.accountant", "privacy.evaluation_epsilon_fraction"]


@functools.cache
def tiny_config(privacy: str):
    """The tiny test config without DP (preflight in milliseconds) or with sample-level DP."""
    return compose([*TINY, f"privacy={privacy}"])


def _preflight_ends_in_a_plan_or_a_config_error(base, changes):
    cfg = copy.deepcopy(base)
    for key, value in changes.items():
        OmegaConf.update(cfg, key, value, merge=False)
    try:
        plan = preflight(cfg)
    except ConfigError as err:
        assert err.setting and str(err).startswith(err.setting)
        return None
    assert plan.num_clients == int(cfg.federation.num_clients)
    return plan


@settings(max_examples=120, deadline=None)
@given(st.dictionaries(st.sampled_from(NO_DP_KEYS), OVERRIDE, min_size=1, max_size=3))
def test_preflight_of_any_override_ends_in_a_plan_or_a_config_error(changes):
    _preflight_ends_in_a_plan_or_a_config_error(tiny_config("none"), changes)


# Values a DP plan should refuse: calibrating noise for a valid one costs seconds, so
# valid values are left out.
HOSTILE_NUMBER = st.one_of(
    st.sampled_from([0, -1, 0.0, -0.5, math.nan, math.inf, -math.inf, "", "abc", "1e400", True, None, [1], {"a": 1}]),
    st.floats(max_value=0.0),
)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.sampled_from(DP_KEYS), HOSTILE_NUMBER, min_size=1, max_size=2))
def test_preflight_of_a_hostile_privacy_setting_ends_in_a_plan_or_a_config_error(changes):
    _preflight_ends_in_a_plan_or_a_config_error(tiny_config("sample"), changes)
