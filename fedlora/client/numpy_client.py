"""The Flower NumPyClient: local (DP-)training of the shared LoRA adapter.

Per round: load the global adapter into the process's cached model, run the local
steps (Opacus DP-SGD under sample-level DP), and return only the adapter delta
``local - global`` with the client's privacy state in the metrics. The accountant
history is the client's own spend record on its own disk (:mod:`fedlora.client.state`),
written before the update leaves, so epsilon composes over every round the client
took part in, across restarts of the server or of the node.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import concatenate_datasets
from flwr.app import Context
from flwr.client import NumPyClient

from fedlora.attacks import alie_z, get_attack
from fedlora.client.state import EXPERIMENT_KEY, HISTORY_KEY, OwnRank, Residual, SpendLog, state_dir
from fedlora.client.training import (
    DPGenerators,
    TrainStats,
    train_dp,
    train_plain,
    train_probe,
)
from fedlora.core.arrays import flatten, subtract, unflatten
from fedlora.core.config import seed_for
from fedlora.core.errors import ConfigError
from fedlora.core.secure import prepare_update
from fedlora.data import TaskData, client_split
from fedlora.models.lora import get_arrays, rank_constraint, set_arrays
from fedlora.models.ranks import RANK_CAP_KEY, pruned_rank, truncate
from fedlora.plan import ExperimentPlan, build_plan_cached, config_key, remember_plan, weight_examples
from fedlora.privacy import DPPlan, epsilon_from_history, local_steps, probe_steps
from fedlora.privacy.evaluation import DP, NOISY_CORRECT, NOISY_EXAMPLES, noisy_counts
from fedlora.privacy.randomness import EVALUATION_NOISE, NOISE, SAMPLING
from fedlora.reply import FitReply
from fedlora.tasks.runtime import ModelBundle, cached_shard, get_bundle

ATTACK_SALT = 0xA77AC
COMPRESSION_SALT = 0xC0DEC


class LoRAClient(NumPyClient):
    """One data holder. Holds only its own shard; the model is per-process."""

    def __init__(
        self, plan: ExperimentPlan, partition_id: int, state_dir: Path | str, data_path: str | None = None
    ) -> None:
        self.plan = plan
        self.cfg = cfg = plan.cfg
        self.partition_id = partition_id
        self.state_dir = Path(state_dir)
        self.task = plan.task_data()
        mine = plan.client(partition_id)
        # What the rows come from: the model bundle (and its shard cache) outlives one
        # experiment's data settings within a process.
        self.data_key = (config_key(cfg.data), config_key(cfg.partition), plan.num_clients, data_path, int(cfg.seed),
                         config_key(cfg.get("audit")))
        if data_path:
            # The node's own file replaces its shard of the configured dataset.
            rows = plan.task.load_node_data(data_path, cfg.data, self.task.label_names)
            self.task = TaskData(train=rows, test=self.task.test, label_names=self.task.label_names)
            self.train_idx, self.val_idx = client_split(
                np.arange(len(rows)), float(cfg.data.validation_fraction), seed_for(cfg.seed, partition_id)
            )
            # Its weight: the declared size under DP (the plan's), its real size without.
            self.num_examples = weight_examples(cfg, plan.federation_train_size, len(self.train_idx))
        else:
            self.train_idx, self.val_idx = mine.train_indices, mine.val_indices
            self.num_examples = mine.num_examples
        self.dp = mine.dp
        self.attack = get_attack(str(cfg.attack.name))
        self.colluders = plan.malicious
        self.malicious = mine.malicious

    # -- helpers ---------------------------------------------------------------
    def _bundle(self) -> ModelBundle:
        return get_bundle(self.cfg, self.task.num_labels)

    def _data(self, bundle: ModelBundle, split: str, partition_id: int | None = None):
        pid = self.partition_id if partition_id is None else partition_id
        if pid == self.partition_id:
            idx = self.train_idx if split == "train" else self.val_idx
        else:
            other = self.plan.client(pid)
            idx = other.train_indices if split == "train" else other.val_indices
        flip = split == "train" and self.attack.poisons_data and pid in self.colluders
        key = (self.data_key, split, pid, flip)
        if split != "train":
            return cached_shard(bundle, key, lambda: self._tokenize(bundle, idx, flip))
        canaries = self.plan.client(pid).canaries
        return cached_shard(bundle, key, lambda: self.plan.task.training_data(
            bundle.model, self._tokenize(bundle, idx, flip, canaries), self.cfg.model,
            int(self.cfg.train.eval_batch_size)))

    def _tokenize(self, bundle: ModelBundle, idx, flip: bool, canaries: tuple[int, ...] = ()):
        rows = self.task.train.select(idx)
        if flip:  # data poisoning: the malicious client trains on flipped labels
            flipped = self.attack.poison_labels(np.asarray(rows["label"]), self.task.num_labels)
            rows = rows.remove_columns("label").add_column("label", flipped.tolist())
        if canaries:  # the privacy audit's canaries this client holds (fedlora.leakage.canaries)
            extra = self.plan.canaries.rows.select(canaries).cast(rows.features)
            rows = concatenate_datasets([rows, extra])
        return self.plan.task.encode(rows, bundle.tokenizer, self.cfg.model)

    def _train(self, bundle: ModelBundle, data, plan: DPPlan | None, pid: int, server_round: int,
               constraint=None):
        """One round of local training from the loaded global adapter: optional linear
        probe, then the fine-tuning steps (DP-SGD when ``plan`` is set).

        The experiment seed drives what must be reproducible (batch order without DP,
        dropout); under DP the noise and the Poisson masks come from secret generators
        (:mod:`fedlora.privacy.randomness`), never from the seed.
        """
        cfg = self.cfg
        seed = seed_for(cfg.seed, pid, server_round)
        torch.manual_seed(seed)  # dropout; DP noise never comes from this generator
        shuffle = torch.Generator().manual_seed(seed)
        secret = None
        if plan is not None:
            noise = self.plan.noise
            # The noise is drawn where the parameters live (Opacus adds it on their device).
            device = self.plan.task.device(cfg.model)
            secret = DPGenerators(noise=noise.torch_generator(pid, server_round, NOISE, device=device),
                                  sampling=noise.torch_generator(pid, server_round, SAMPLING))
        n_probe = probe_steps(cfg.train)
        probe = TrainStats(steps=0, loss=float("nan"), examples_seen=0)
        if n_probe:
            # Linear probing on the current adapter's features, then fine-tuning.
            features, targets, head = self.plan.task.probe_inputs(
                bundle.model, data, int(cfg.train.eval_batch_size), str(cfg.train.precision))
            probe = train_probe(head, features, targets, cfg.train, plan, n_probe, shuffle, secret)
        # Under DP the plan fixes the steps (from the declared size, not the real one).
        n_tune = local_steps(len(data), cfg.train) if plan is None else plan.steps_per_round - plan.probe_steps
        if plan is None:
            stats = train_plain(bundle.model, data, cfg.train, n_tune, shuffle, self.plan.task.loss, constraint)
        else:
            stats = train_dp(bundle.grad_sample_module(), data, cfg.train, plan, n_tune, secret, self.plan.task.loss,
                             constraint)
        return probe, stats

    def _colluders_honest_deltas(self, bundle: ModelBundle, parameters, own: np.ndarray, server_round: int):
        """ALIE / IPM: the colluders' honest deltas, trained on each colluder's shard from
        the same global adapter (the attackers pool their own data, nobody else's)."""
        rows = []
        for pid in self.colluders:
            if pid == self.partition_id:
                rows.append(own)
                continue
            set_arrays(bundle.model, bundle.names, parameters)
            data = self._data(bundle, "train", pid)
            self._train(bundle, data, self.plan.client(pid).dp, pid, server_round)
            rows.append(flatten(subtract(get_arrays(bundle.model, bundle.names), [np.asarray(p) for p in parameters])))
        return np.stack(rows)

    def _poison(self, bundle: ModelBundle, parameters, delta: list[np.ndarray], server_round: int):
        cfg = self.cfg
        flat = flatten(delta)
        honest = None
        params = dict(cfg.attack)
        if self.attack.colluding:
            honest = self._colluders_honest_deltas(bundle, parameters, flat, server_round)
            if self.attack.name == "alie" and params.get("z") is None:
                params["z"] = alie_z(self.plan.clients_per_round, len(self.colluders))
        rng = np.random.default_rng(seed_for(cfg.seed, self.partition_id, server_round, ATTACK_SALT))
        return unflatten(self.attack.poison_delta(flat, params, rng, honest), delta)

    def spend_log(self, config: dict[str, Any]) -> SpendLog:
        """This client's own spend record for the experiment the server names."""
        return SpendLog(self.state_dir, str(config.get(EXPERIMENT_KEY) or "experiment"), self.partition_id)

    # -- NumPyClient -------------------------------------------------------------
    def get_properties(self, config):
        # The server asks a node's client id once after a resume, to send it its own history.
        return {"partition_id": self.partition_id}

    def get_parameters(self, config):
        bundle = self._bundle()
        return get_arrays(bundle.model, bundle.names)

    def fit(self, parameters, config):
        server_round = int(config.get("server_round", 0))
        bundle = self._bundle()
        set_arrays(bundle.model, bundle.names, parameters)
        data = self._data(bundle, "train")
        plan = self.dp
        reply = FitReply(partition_id=self.partition_id, privacy_unit=self.plan.unit, num_examples=self.num_examples,
                         server_round=server_round)
        if plan is not None:
            log = self.spend_log(config)
            server_history = json.loads(str(config[HISTORY_KEY])) if config.get(HISTORY_KEY) else None
            history, reply.history_refused = log.adopt(server_history)
            # This round's spend: the plan fixes its steps (probe + fine-tuning).
            entry = (plan.noise_multiplier, plan.sample_rate, plan.steps_per_round, server_round)
            after = epsilon_from_history([h[:3] for h in history + [entry]], plan.delta, plan.accountant)
            if after > plan.target_epsilon:
                # Never spend past the budget: decline with a reply, train nothing.
                spent = epsilon_from_history([h[:3] for h in history], plan.delta, plan.accountant)
                reply.declined = True
                reply.reason = (f"privacy budget: eps {spent:.4f} spent of {plan.target_epsilon:g}; "
                                "another round would exceed it")
                self._privacy(reply, plan, history, spent)
                return [np.zeros_like(np.asarray(p)) for p in parameters], 0, reply.to_metrics(self.plan.release)
        rank = self._round_rank(config)
        constraint = None
        if rank is not None:
            # A rank-r client: the global adapter's first r components, the rest zero.
            constraint = rank_constraint(bundle.model, bundle.names, rank)
            constraint()
        probe, stats = self._train(bundle, data, plan, self.partition_id, server_round, constraint)
        reply.steps, reply.probe_steps = probe.steps + stats.steps, probe.steps
        reply.train_loss = stats.loss if stats.steps else probe.loss
        local = get_arrays(bundle.model, bundle.names)
        delta = subtract(local, [np.asarray(p) for p in parameters])
        if rank is not None:
            delta = self._at_rank(bundle, local, delta, rank, config)
            reply.lora_rank = rank
        if self.malicious:
            reply.attack = self.attack.name
            if self.attack.poisons_model:
                delta = self._poison(bundle, parameters, delta, server_round)
        # Sent only where the policy allows it (without DP, or the norm of a noised update).
        reply.update_norm = float(np.linalg.norm(flatten(delta)))
        if self.plan.secagg is not None:
            delta = self._prepare_secure(delta)
        if self.plan.codec.name != "none":
            delta = self._compress(delta, config, server_round)
        if plan is not None:
            # Recorded (fsync'd) before the update leaves: a server that dies before it
            # aggregates cannot make this client forget the spend.
            log.append([entry])
            self._privacy(reply, plan, history + [entry], after)
        if self.malicious:
            # Weight inflation and metric poisoning lie in the reply, not the update.
            reply.num_examples = self.attack.claimed_examples(self.num_examples, self.cfg.attack)
            return delta, reply.num_examples, self.attack.report(reply.to_metrics(self.plan.release), self.cfg.attack)
        return delta, self.num_examples, reply.to_metrics(self.plan.release)

    def _round_rank(self, config) -> int | None:
        """This round's LoRA rank where ranks vary (None otherwise): the declared one, capped
        by the server's adaptive rank (``rank_cap``) and by the client's own pruning."""
        ranks = self.plan.ranks
        if ranks is None or not ranks.varies:
            return None
        rank = min(ranks.rank_of(self.partition_id), int(config.get(RANK_CAP_KEY) or ranks.global_rank))
        if ranks.self_pruning is not None:
            rank = min(rank, self._rank_state(config).load(rank))
        return rank

    def _rank_state(self, config) -> OwnRank:
        return OwnRank(self.state_dir, str(config.get(EXPERIMENT_KEY) or "experiment"), self.partition_id)

    def _at_rank(self, bundle: ModelBundle, local, delta, rank: int, config) -> list[np.ndarray]:
        """The delta of the first ``rank`` components (what travels). Under
        ``lora.self_pruning`` the client also lowers its rank for later rounds when its
        trailing components hold too little of the trained adapter's energy (HetLoRA);
        that reads the trained, already noised adapter only: post-processing under DP."""
        layout, ranks = bundle.layout, self.plan.ranks
        if ranks.self_pruning is not None:
            self._rank_state(config).save(pruned_rank(truncate(local, layout, rank), layout, ranks.self_pruning))
        return truncate(delta, layout, rank)

    @staticmethod
    def _privacy(reply: FitReply, plan: DPPlan, history: list, spent: float) -> None:
        """The client's privacy facts: its public plan, its epsilon and its whole own
        history (the server's ledger is the union of these and its checkpoint)."""
        reply.epsilon, reply.delta, reply.accountant = spent, plan.delta, plan.accountant
        reply.sample_rate, reply.noise_multiplier, reply.max_grad_norm = (
            plan.sample_rate, plan.noise_multiplier, plan.max_grad_norm)
        reply.budget_epsilon = plan.target_epsilon
        # DP-SGD steps only: a noisy evaluation's entry is its own release, not a step.
        reply.total_steps = int(sum(h[2] for h in history if tuple(h[:3]) != plan.evaluation_entry))
        reply.dp_history = list(history)

    def _compress(self, delta: list[np.ndarray], config, server_round: int) -> list[np.ndarray]:
        """The delta as the codec sends it (fedlora.core.compression); under error feedback
        the unsent rest joins next round's delta, kept on this client's disk."""
        codec, sizes = self.plan.codec, [int(np.asarray(a).size) for a in delta]
        flat = flatten(delta)
        residual = Residual(self.state_dir, str(config.get(EXPERIMENT_KEY) or "experiment"), self.partition_id)
        if codec.error_feedback:
            flat = flat + residual.load(flat.size)
        # Stochastic rounding needs no secret: it acts on what is released anyway.
        rng = np.random.default_rng(seed_for(self.cfg.seed, self.partition_id, server_round, COMPRESSION_SALT))
        sent = codec.encode(flat, sizes, rng)
        if codec.error_feedback:
            residual.save(flat - codec.decode(sent, sizes))
        return sent

    def _prepare_secure(self, delta):
        """Before SecAgg+ masks it: clip the delta to the quantizer's range (fixed clipping,
        as Flower's clipping mods do). Nothing about the single update is reported: SecAgg+
        exists to hide it."""
        return prepare_update(delta, self.plan.secagg)

    def evaluate(self, parameters, config):
        release = self.plan.release
        if not release.client_evaluation:
            # privacy.evaluation=off: nothing about this client's validation data leaves it.
            return 0.0, 0, {"partition_id": self.partition_id}
        if release.evaluation == DP:
            return self._evaluate_dp(parameters, config)
        metrics, n = self._validation_metrics(parameters)
        if n == 0:
            return 0.0, 0, {"partition_id": self.partition_id}
        metrics = self._report(metrics)
        return metrics.pop("loss"), n, {**metrics, "partition_id": self.partition_id}

    def _report(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """What this client reports of ``metrics`` (a metric-poisoning client lies)."""
        return self.attack.report(metrics, self.cfg.attack) if self.malicious else metrics

    def _validation_metrics(self, parameters) -> tuple[dict[str, Any], int]:
        bundle = self._bundle()
        set_arrays(bundle.model, bundle.names, parameters)
        data = self._data(bundle, "val")
        if len(data) == 0:
            return {}, 0
        return self.plan.task.evaluate(bundle.model, data, int(self.cfg.train.eval_batch_size),
                                       str(self.cfg.train.precision)), len(data)

    def _evaluate_dp(self, parameters, config):
        """``privacy.evaluation=dp``: release the correct and example counts of this
        client's validation data through the Gaussian mechanism
        (:mod:`fedlora.privacy.evaluation`), its spend appended to the client's own record
        before the reply leaves, never past its budget. The loss is not released."""
        server_round = int(config.get("server_round", 0))
        plan, release = self.dp, self.plan.release
        reply = {"partition_id": self.partition_id, "privacy_unit": self.plan.unit}
        if plan.evaluation_entry is None:
            # federation.fraction_evaluate=0: the plan reserved no budget for evaluations.
            return 0.0, 0, release.evaluation_reply({**reply, "declined": True, "reason": "no evaluation planned"})
        log = self.spend_log(config)
        history = log.history()
        entry = (*plan.evaluation_entry, server_round)
        after = epsilon_from_history([h[:3] for h in history + [entry]], plan.delta, plan.accountant)
        if after > plan.target_epsilon:
            return 0.0, 0, release.evaluation_reply(
                {**reply, "declined": True, "reason": "privacy budget: another release would exceed it"})
        metrics, n = self._validation_metrics(parameters)
        if n == 0 or "accuracy" not in metrics:
            reason = "no validation rows" if n == 0 else "the task reports no accuracy to count"
            return 0.0, 0, release.evaluation_reply({**reply, "declined": True, "reason": reason})
        correct = int(round(float(metrics["accuracy"]) * n))
        rng = self.plan.noise.numpy_generator(self.partition_id, server_round, EVALUATION_NOISE)
        noisy_correct, noisy_examples = noisy_counts(correct, n, plan.evaluation_noise_multiplier, rng)
        log.append([entry])  # fsync'd before the release leaves
        history = history + [entry]
        reply.update({NOISY_CORRECT: noisy_correct, NOISY_EXAMPLES: noisy_examples, "epsilon": after,
                      "delta": plan.delta, "accountant": plan.accountant,
                      "dp_history": json.dumps([list(h) for h in history])})
        # num_examples is 1: the real count is what the noise protects.
        return 0.0, 1, release.evaluation_reply(self._report(reply))


def node_data_path(node_config: Any) -> str | None:
    """The node's own data file (``data-path``), resolved: a regular file (a folder, FIFO
    or device such as /dev/zero is refused before it is opened), and inside ``data-root``
    when the node config sets one (``..`` and symlinks are followed first, so neither
    leaves it)."""
    if not node_config.get("data-path"):
        return None
    given = str(node_config["data-path"])
    try:
        path = Path(given).expanduser().resolve(strict=True)
    except (OSError, RuntimeError) as err:
        raise ConfigError("node-config data-path", f"{given!r} cannot be read: {err.strerror or err}") from None
    if not path.is_file():
        raise ConfigError("node-config data-path", f"{given!r} is not a regular file")
    root = node_config.get("data-root")
    if root:
        base = Path(str(root)).expanduser().resolve()
        if not path.is_relative_to(base):
            raise ConfigError("node-config data-path", f"{given!r} resolves to {path}, outside the node's "
                              f"data-root {base}")
    return str(path)


def node_identity(node_config: Any, num_clients: int) -> tuple[int, str | None]:
    """(client id, own data file) from a SuperNode's ``--node-config``: ``partition-id``
    (the client id in budgets, seeds and reports) with either ``num-partitions`` (a shard
    of the configured dataset, which must be the federation's ``num_clients`` shards) or
    ``data-path`` (its own file)."""
    if "partition-id" not in node_config:
        raise ConfigError(
            "node-config", "partition-id is missing; start the SuperNode with --node-config "
            "'partition-id=<i> num-partitions=<n>' (or 'partition-id=<i> data-path=\"<file>\"')"
        )
    pid = int(node_config["partition-id"])
    data_path = node_data_path(node_config)
    if "num-partitions" not in node_config and data_path is None:
        raise ConfigError("node-config", "give num-partitions=<n> (a shard of the configured dataset) or data-path=<file>")
    num = int(node_config.get("num-partitions", num_clients))
    if num != num_clients:
        raise ConfigError(
            "node-config", f"num-partitions={num} but the experiment has federation.num_clients={num_clients}: "
            "every node must hold one of the same num_clients shards the server planned for"
        )
    if not 0 <= pid < num:
        raise ConfigError("node-config", f"partition-id={pid} must lie in [0, num-partitions={num})")
    return pid, data_path


def make_client_fn(plan: ExperimentPlan, default_state_dir: Path | str | None = None):
    """Flower's ``client_fn`` for the clients of ``plan``; the node's spend records go
    under its ``state-dir`` (node config), else ``default_state_dir`` (a simulation's run
    dir), else ``$FLWR_HOME/fedlora-client-state``."""

    # The function holds the config, not the plan: a simulation backend ships it with
    # every message (Flower's Ray backend pickles the ClientApp per task), and a plan of
    # 10,000 clients' shards would make each message cost what the federation's size
    # does. Each process builds the plan once from the config, as a deployed node does.
    cfg = plan.cfg
    remember_plan(plan)

    def client_fn(context: Context):
        mine = build_plan_cached(cfg)
        torch.set_num_threads(max(1, int(cfg.federation.client_resources.num_cpus)))
        pid, data_path = node_identity(context.node_config, mine.num_clients)
        root = state_dir(context.node_config, default_state_dir)
        return LoRAClient(mine, pid, root, data_path).to_client()

    return client_fn
