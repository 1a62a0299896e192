"""The data holder's policy on its node: the deployed ClientApp refuses a run that asks
for more epsilon than the node allows, for no DP, for files on the node or remote code,
and never sends a plain update where masking is required."""

import time

import pytest
from flwr.app import Context, Message, Metadata, RecordDict
from flwr.app.message_type import MessageType

from fedlora.client.app import admitted_config, app, make_client_app, secure_mod
from fedlora.client.policy import NodePolicy, PolicyRefusal
from fedlora.core.config import compose
from fedlora.core.errors import ConfigError
from fedlora.plan import _PLANS

NODE = {"partition-id": 0, "num-partitions": 4}


def _context(node_config, overrides=""):
    return Context(run_id=1, node_id=7, node_config={**NODE, **node_config}, state=RecordDict(),
                   run_config={"overrides": overrides})


def _train_message():
    # As the SuperNode receives it from the SuperLink: metadata set by the sender.
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=1, dst_node_id=7, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=60.0, message_type=MessageType.TRAIN)
    return Message(content=RecordDict(), metadata=metadata)


@pytest.mark.parametrize("node, overrides, needle", [
    ({"max-epsilon": 4.0}, [], "epsilon 8; its node-config max-epsilon is 4"),
    ({"max-epsilon": 4.0}, ["privacy=none"], "privacy=none"),
    ({"max-epsilon": 4.0}, ["+privacy.budgets.overrides={0: 6.0}", "privacy.target_epsilon=3"], "epsilon 6"),
    ({"privacy-unit": "sample"}, ["privacy=client", "privacy.delta=1e-3"], "privacy-unit=sample"),
    ({"max-epsilon": 9.0}, ["privacy.evaluation=plain"], "privacy.evaluation=plain"),
    ({"max-epsilon": 9.0}, ["privacy.noise_seed=3"], "noise_seed"),
    ({"require-secagg": "true"}, [], "SecAgg+"),
    ({}, ["model.trust_remote_code=true"], "allow-remote-code"),
    ({}, ["data=local", "data.path=/etc/passwd"], "data.path"),
    ({}, ["model.name_or_path=../../home/holder/model"], "model.name_or_path"),
    ({}, ["experiment=lm", "model.frozen_prefix_dir=/tmp/world-readable"], "model.frozen_prefix_dir"),
])
def test_the_node_refuses_what_its_policy_forbids(node, overrides, needle):
    policy = NodePolicy.from_node_config({**NODE, **node})
    with pytest.raises(PolicyRefusal, match="node-config") as err:
        policy.check(compose(overrides), 0)
    assert needle in str(err.value)


def test_a_run_within_the_policy_is_admitted():
    policy = NodePolicy.from_node_config({**NODE, "max-epsilon": 8, "privacy-unit": "sample"})
    assert policy.refusals(compose([]), 0) == []
    assert NodePolicy().refusals(compose(["privacy=none"]), 0) == []  # no policy: no DP requirement
    opened = NodePolicy(allow_remote_code=True, allow_data_paths=True)
    assert opened.refusals(compose(["data=local", "data.path=x.csv", "model.trust_remote_code=true"]), 0) == []


@pytest.mark.parametrize("node, key", [
    ({"max-epsilon": "lots"}, "max-epsilon"),
    ({"max-epsilon": -1}, "max-epsilon"),
    ({"privacy-unit": "user"}, "privacy-unit"),
    ({"require-secagg": "maybe"}, "require-secagg"),
])
def test_a_malformed_policy_names_its_key(node, key):
    with pytest.raises(ConfigError, match=key):
        NodePolicy.from_node_config(node)


def test_the_deployed_client_app_refuses_before_it_loads_anything():
    cached = dict(_PLANS)
    for overrides in ("privacy.target_epsilon=20", "privacy=none"):
        with pytest.raises(PolicyRefusal, match="this node refuses the run"):
            app(_train_message(), _context({"max-epsilon": 8.0}, overrides))
    with pytest.raises(PolicyRefusal, match="data.path"):
        app(_train_message(), _context({}, "data=local data.path=/etc/shadow"))
    assert _PLANS == cached  # no plan (and so no data) was built
    assert admitted_config(_context({"max-epsilon": 8.0}, "")).privacy.target_epsilon == 8.0


def test_no_plain_update_leaves_a_node_that_requires_secagg():
    # The server left the SecAgg+ setup out of a training message: refused before the client runs.
    with pytest.raises(PolicyRefusal, match="without the SecAgg\\+ setup"):
        secure_mod(_train_message(), _context({"require-secagg": "true"}), lambda m, c: pytest.fail("ran"))
    # Without the requirement the message goes on to the client.
    ran = []
    secure_mod(_train_message(), _context({}), lambda m, c: ran.append(m))
    assert ran


def test_a_secagg_run_never_sends_plain_updates_even_if_the_server_skips_the_protocol():
    from fedlora.plan import build_plan_cached

    plan = build_plan_cached(compose(["secure=secaggplus", "privacy=none", "federation.num_clients=4",
                                      "data.max_train_samples=200", "data.max_test_samples=50"]))
    client_app = make_client_app(plan)
    with pytest.raises(PolicyRefusal, match="SecAgg\\+"):
        client_app(_train_message(), _context({}))


# -- the node's own data file -----------------------------------------------------------
def test_a_hostile_data_path_is_refused_before_it_is_read(tmp_path):
    from fedlora.client.numpy_client import node_data_path

    root = tmp_path / "data"
    root.mkdir()
    (root / "mine.csv").write_text("text,label\ngood,1\n")
    secret = tmp_path / "secret.csv"
    secret.write_text("text,label\nsecret,0\n")
    (root / "link.csv").symlink_to(secret)
    fifo = root / "pipe.csv"
    import os

    os.mkfifo(fifo)
    base = {"partition-id": 0, "data-root": str(root)}
    assert node_data_path({**base, "data-path": str(root / "mine.csv")}) == str(root / "mine.csv")
    for hostile, needle in ((str(root / ".." / "secret.csv"), "outside the node's data-root"),
                            (str(root / "link.csv"), "outside the node's data-root"),
                            (str(root / "missing.csv"), "cannot be read"),
                            (str(root), "not a regular file"),
                            (str(fifo), "not a regular file"),
                            ("/dev/zero", "not a regular file")):
        with pytest.raises(ConfigError, match="node-config data-path") as err:
            node_data_path({**base, "data-path": hostile})
        assert needle in str(err.value)
    assert secret.read_text() == "text,label\nsecret,0\n"  # nothing read or changed


def test_the_supernode_command_carries_the_policy_to_the_node(tmp_path):
    from flwr.common.config import parse_config_args

    from fedlora.deploy.__main__ import _node_config, main, parser
    from fedlora.deploy.launch import node_config_text

    (tmp_path / "mine.csv").write_text("text,label\na,1\n")
    args = parser().parse_args(["supernode", "--insecure", "--superlink", "127.0.0.1:1", "--partition-id", "0",
                                "--data-path", str(tmp_path / "mine.csv"), "--data-root", str(tmp_path),
                                "--max-epsilon", "3", "--privacy-unit", "sample", "--require-secagg"])
    # What the SuperNode's ClientApp reads back from Flower's --node-config.
    node = parse_config_args([node_config_text(_node_config(args))])
    policy = NodePolicy.from_node_config(node)
    assert (policy.max_epsilon, policy.privacy_unit, policy.require_secagg) == (3.0, "sample", True)
    assert not policy.allow_remote_code and not policy.allow_data_paths
    assert "epsilon 8" in " ".join(policy.refusals(compose(["secure=secaggplus"]), 0))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert main(["supernode", "--insecure", "--superlink", "127.0.0.1:1", "--partition-id", "0",
                 "--data-path", str(tmp_path / "mine.csv"), "--data-root", str(outside)]) == 2
