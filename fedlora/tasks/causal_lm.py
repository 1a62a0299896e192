"""Causal-LM instruction tuning: LoRA on a decoder-only model, loss on the answer.

A row (:mod:`fedlora.data.instructions`) is a prompt (chat messages) and a response.
The prompt is rendered with the tokenizer's chat template where it has one (else the
Alpaca template, Taori et al. 2023), the response is what the assistant turn adds, and
the loss covers the response tokens only (``model.train_on_inputs=true``: every token),
as in instruction tuning since Ouyang et al. 2022.

Under DP-SGD one example is one whole sequence: its loss is the mean over its own
response tokens, and the batch loss the mean over examples, so Opacus's per-example
gradients (``loss_reduction="mean"``) are those of each sequence alone, whatever the
lengths of the others (Li et al. 2022, "Large Language Models Can Be Strong
Differentially Private Learners", take the same unit).

Rows are left-padded with explicit position ids: every sequence ends at the last
column, so the answer tokens of a batch sit in its last columns and the vocabulary
projection (a fifth of a small model's compute) runs on those columns only
(``logits_to_keep``); padding changes neither the positions nor the loss.

Evaluation on the server's held-out split: the loss and perplexity of the responses;
for a closed answer set the accuracy of the answer with the highest log-likelihood
(the multiple-choice scoring of Brown et al. 2020); exact match of greedy generation,
and a few generations for a person to read.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from peft import PeftModel, TaskType
from torch.utils.data import TensorDataset
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerBase

from fedlora.core.errors import ConfigError
from fedlora.models.hub import exported_revision, load_tokenizer, model_revision, note_model_commit, resolve_model_path
from fedlora.tasks import frozen_prefix
from fedlora.tasks.base import Task, autocast

# PEFT still calls transformers' deprecated name on every forward of a causal LM.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")

ANSWERS_FILE = "answers.json"
IGNORE = -100
# Stanford Alpaca's prompt, for tokenizers without a chat template.
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")


def _opt(model_cfg: Any, key: str, default: Any) -> Any:
    value = model_cfg.get(key) if hasattr(model_cfg, "get") else None
    return default if value is None else value


def device_of(model_cfg: Any) -> torch.device:
    """``model.device``: auto = the GPU when there is one, else the CPU."""
    name = str(_opt(model_cfg, "device", "auto"))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("model.device", f"{name} asked for but torch sees no GPU; use model.device=auto or cpu")
    return torch.device(name)


def dtype_of(model_cfg: Any) -> torch.dtype:
    """``model.dtype``: auto = bf16 on a GPU, fp32 on the CPU (where bf16 matmuls are
    emulated on most chips). LoRA factors stay fp32 either way (PEFT's
    ``autocast_adapter_dtype``), so per-example gradients, clipping and noise are fp32."""
    name = str(_opt(model_cfg, "dtype", "auto"))
    if name == "auto":
        return torch.bfloat16 if device_of(model_cfg).type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ConfigError("model.dtype", f"unknown dtype {name!r}; choose auto, fp32, bf16 or fp16")
    return table[name]


def _check_causal(config: Any, name: str) -> None:
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise ConfigError("model.name_or_path", f"{name!r} is a {', '.join(archs)}, not a causal language model; the "
                          "causal_lm task needs a decoder-only LM (e.g. HuggingFaceTB/SmolLM2-135M-Instruct, "
                          "Qwen/Qwen2.5-0.5B-Instruct)")


def load_causal_lm(model_cfg: Any, seed: int):
    """The base causal LM on its device, in its dtype; ``model.random_init`` builds a
    randomly initialised one of the same family (tests of the mechanics)."""
    revision = model_revision(model_cfg)
    path = resolve_model_path(str(model_cfg.name_or_path))
    trust = bool(_opt(model_cfg, "trust_remote_code", False))
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust, revision=revision)
        note_model_commit(model_cfg, config)
        _check_causal(config, str(model_cfg.name_or_path))
        torch.manual_seed(seed)
        if model_cfg.get("random_init"):
            for key, value in dict(model_cfg.random_init).items():
                setattr(config, key, value)
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust, dtype=dtype_of(model_cfg))
        else:
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust, dtype=dtype_of(model_cfg),
                                                         revision=revision)
    except (OSError, ValueError, KeyError) as err:
        raise ConfigError("model.name_or_path",
                          f"cannot load a causal language model from {model_cfg.name_or_path!r}: {err}") from err
    return model


@dataclass
class Rendered:
    """One example as token ids: its prompt and its response (truncated to fit)."""

    prompt: list[int]
    response: list[int]


def has_template(tokenizer: PreTrainedTokenizerBase, model_cfg: Any) -> bool:
    """Whether prompts are rendered with the tokenizer's chat template
    (``model.chat_template``: auto = where it has one)."""
    choice = _opt(model_cfg, "chat_template", "auto")
    present = bool(getattr(tokenizer, "chat_template", None))
    if choice == "auto":
        return present
    if bool(choice) and not present:
        raise ConfigError("model.chat_template", "the tokenizer has no chat template; set model.chat_template=auto")
    return bool(choice)


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], response: str,
           template: bool) -> Rendered:
    """Token ids of the prompt and of what the assistant's answer adds after it."""
    eos = tokenizer.eos_token or ""
    if not messages:  # plain text: next-token prediction on all of it
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return Rendered(bos, tokenizer(response + eos, add_special_tokens=False)["input_ids"])
    if template:
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": response}], tokenize=False)
        # The answer turn as the template closes it (e.g. "great<|im_end|>\n").
        answer = full[len(prompt):] if full.startswith(prompt) else response + eos
    else:
        user = "\n\n".join(m["content"] for m in messages if m["role"] != "assistant")
        prompt, answer = ALPACA.format(instruction=user), response + eos
    return Rendered(tokenizer(prompt, add_special_tokens=False)["input_ids"],
                    tokenizer(answer, add_special_tokens=False)["input_ids"])


def fit(example: Rendered, max_length: int) -> Rendered:
    """Cut an example to ``max_length`` tokens, keeping the answer: the middle of the
    prompt goes first (its start holds the template and instruction, its end the
    assistant header), the answer's tail only if the answer alone fills half the budget."""
    prompt, response = example.prompt, example.response
    if len(prompt) + len(response) <= max_length:
        return example
    if not prompt:
        return Rendered([], response[:max_length])
    response = response[: max(max_length - min(len(prompt), max_length // 2), 1)]
    budget = max_length - len(response)
    if len(prompt) > budget:
        head = budget // 2
        prompt = prompt[:head] + prompt[len(prompt) - (budget - head):] if budget > 0 else []
    return Rendered(prompt, response)


def left_pad(rows: list[list[int]], pad_id: int, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    width = width or max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            ids[i, width - len(row):] = torch.as_tensor(row)
            mask[i, width - len(row):] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of left-padded rows: each row counts from 0 at its first real token."""
    return (mask.cumsum(dim=-1) - 1).clamp(min=0)


@dataclass
class EvalSet:
    """What evaluation needs beyond the training tensors."""

    examples: list[Rendered]
    references: list[str]
    prompts: list[str]  # the last user message, for people reading generations
    labels: list[int]
    candidates: list[list[int]]  # the answer set's token ids (closed answer sets)
    pad_id: int
    max_length: int


class LMData(TensorDataset):
    """Left-padded ``(input_ids, attention_mask, labels)``; labels are -100 outside the
    loss (the prompt, padding). ``evalset`` keeps the rendered rows for evaluation."""

    evalset: EvalSet
    truncated: int = 0


def _cut_leading(*tensors: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drop the columns that are padding in every row of the batch."""
    real = (mask.sum(dim=0) > 0).nonzero()
    first = int(real.min()) if len(real) else mask.shape[1] - 1
    return tuple(t[:, first:] for t in tensors)


def device_of_model(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def token_nll(model: torch.nn.Module, inputs: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token NLL, valid mask), both (batch, k): the loss of every labelled token,
    computing logits for the last k columns only (all labelled tokens lie there).
    ``inputs`` are token ids, or the cached input of the lowest trained layer
    (:mod:`fedlora.tasks.frozen_prefix`), from which only the layers above it run."""
    device = device_of_model(model)
    inputs, mask, labels = _cut_leading(inputs, mask, labels, mask=mask)
    inputs, mask, labels = inputs.to(device), mask.to(device), labels.to(device)
    labelled = (labels != IGNORE).any(dim=0).nonzero()
    first = int(labelled.min()) if len(labelled) else labels.shape[1] - 1
    keep = max(labels.shape[1] - first + 1, 2)  # the logit at t predicts token t + 1
    keep = min(keep, labels.shape[1])
    if inputs.is_floating_point():
        logits = frozen_prefix.logits_from_cache(model, inputs, mask, positions(mask), keep)
    else:
        logits = model(input_ids=inputs, attention_mask=mask, position_ids=positions(mask),
                       logits_to_keep=keep, use_cache=False).logits
    targets = labels[:, labels.shape[1] - keep + 1:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
        ignore_index=IGNORE, reduction="none").view(targets.shape)
    return nll, targets != IGNORE


def stop_ids(tokenizer: PreTrainedTokenizerBase, model: torch.nn.Module) -> list[int]:
    """Every end-of-sequence id of the tokenizer and of the model's generation config,
    which may hold several (Llama 3 ends a turn with <|eot_id|> as well as <|end_of_text|>)."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        ids.update(value if isinstance(value, (list, tuple)) else [value])
    return sorted(i for i in ids if isinstance(i, int))


def normalise_answer(text: str) -> str:
    """Lower case, no punctuation or surrounding space: what exact match compares."""
    return re.sub(r"[^\w\s]", "", text).strip().lower()


class CausalLM(Task):
    name = "causal_lm"
    peft_task_type = TaskType.CAUSAL_LM
    metric = "accuracy"

    # -- data --------------------------------------------------------------------
    def load_data(self, data_cfg, seed):
        from fedlora.data.instructions import load_instruction_data_cached

        return load_instruction_data_cached(data_cfg, seed)

    def load_node_data(self, path, data_cfg, label_names):
        from fedlora.data.instructions import load_node_instructions

        return load_node_instructions(path, data_cfg, list(label_names))

    def check(self, tokenizer, data, cfg) -> None:
        """Refuse data the model cannot train on, before the federation starts."""
        if data.meta.get("format") == "chat" and len(data.train) and not has_template(tokenizer, cfg.model):
            raise ConfigError("data.format", "chat data needs a chat template but the tokenizer of "
                              f"{cfg.model.name_or_path!r} has none; use a chat model or alpaca-style columns")
        for part, rows in (("train", data.train), ("test", data.test)):
            sample = rows.select(range(min(len(rows), 256)))
            encoded = self.encode(sample, tokenizer, cfg.model)
            if len(sample) and encoded.truncated == len(sample):
                raise ConfigError("model.max_length", f"model.max_length={cfg.model.max_length} cuts off every "
                                  f"response of the {part} split (before its end); raise it")

    # -- model -------------------------------------------------------------------
    def device(self, model_cfg):
        return device_of(model_cfg)

    def load(self, model_cfg, num_labels, seed):
        tokenizer = load_tokenizer(model_cfg)
        model = load_causal_lm(model_cfg, seed)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return tokenizer, model

    def encode(self, rows: Dataset, tokenizer, model_cfg) -> LMData:
        template = has_template(tokenizer, model_cfg)
        max_length = int(model_cfg.max_length)
        all_tokens = bool(_opt(model_cfg, "train_on_inputs", False))
        examples, prompts, truncated = [], [], 0
        for prompt_json, response in zip(rows["prompt"], rows["response"]):
            messages = json.loads(prompt_json)
            whole = render(tokenizer, messages, response, template)
            examples.append(fit(whole, max_length))
            truncated += len(examples[-1].response) < len(whole.response)
            prompts.append(next((m["content"] for m in reversed(messages) if m["role"] == "user"), ""))
        ids, mask = left_pad([e.prompt + e.response for e in examples] or [[]], tokenizer.pad_token_id, max_length)
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE))
        if not all_tokens:
            for i, e in enumerate(examples):
                labels[i, : max_length - len(e.response)] = IGNORE
        n = len(examples)
        data = LMData(ids[:n], mask[:n], labels[:n])
        data.truncated = truncated  # examples whose answer lost its end to model.max_length
        data.evalset = EvalSet(examples=examples, references=list(rows["response"]), prompts=prompts,
                               labels=list(rows["label"]) if "label" in rows.column_names else [0] * n,
                               candidates=[], pad_id=int(tokenizer.pad_token_id), max_length=max_length)
        return data

    def encode_eval(self, rows, tokenizer, model_cfg, label_names):
        """The held-out rows, with the token ids of every answer of a closed answer set
        (as the template closes the assistant turn) for log-likelihood scoring."""
        data = self.encode(rows, tokenizer, model_cfg)
        template = has_template(tokenizer, model_cfg)
        data.evalset.candidates = [render(tokenizer, [{"role": "user", "content": "-"}], a, template).response
                                   for a in label_names]
        return data

    def training_data(self, model, data: LMData, model_cfg, batch_size: int) -> TensorDataset:
        """With ``model.cache_frozen_prefix`` and LoRA on the top layers only, the input of
        the lowest trained layer for every example, computed once; with LoRA on the top
        layer's MLP only, the input of that MLP block in the answer columns (see
        :mod:`fedlora.tasks.frozen_prefix`). Checked against the whole model on the first rows."""
        start = frozen_prefix.first_trained_layer(model)
        if not _opt(model_cfg, "cache_frozen_prefix", False) or start is None or len(data) == 0:
            return data
        ids, mask, labels = data.tensors
        top_mlp = frozen_prefix.top_mlp_only(model)
        width = ids.shape[1]
        if top_mlp:
            # The answer columns and the one before the first of them (its logit predicts it).
            labelled = (labels != IGNORE).any(dim=0).nonzero()
            width = min(width - int(labelled.min()) + 1 if len(labelled) else 2, width)

        def grab(chunk_ids: torch.Tensor, chunk_mask: torch.Tensor) -> torch.Tensor:
            pos = positions(chunk_mask)
            if top_mlp:
                return frozen_prefix.mlp_inputs(model, chunk_ids, chunk_mask, pos, width)
            return frozen_prefix.layer_inputs(model, start, chunk_ids, chunk_mask, pos)

        def build() -> frozen_prefix.PrefixData:
            device = device_of_model(model)
            hidden = None
            for lo in range(0, len(ids), batch_size):
                chunk_ids, chunk_mask = _cut_leading(ids[lo:lo + batch_size], mask[lo:lo + batch_size],
                                                     mask=mask[lo:lo + batch_size])
                h = grab(chunk_ids.to(device), chunk_mask.to(device)).float().cpu()
                if hidden is None:
                    hidden = torch.zeros((len(ids), width, h.shape[-1]))
                hidden[lo:lo + len(h), width - h.shape[1]:] = h
            return frozen_prefix.PrefixData(hidden, mask[:, -width:], labels[:, -width:])

        head = slice(0, min(4, len(ids)))
        with torch.no_grad():
            full = self.per_example_loss(model, (ids[head], mask[head], labels[head]))
            key = frozen_prefix.fingerprint(model, (ids, mask, labels), start, top_mlp, width,
                                           str(next(model.parameters()).dtype))
            cached = frozen_prefix.stored(_opt(model_cfg, "frozen_prefix_dir", None), key, build,
                                          lambda c: frozen_prefix.agrees(full, self.per_example_loss(model, c[head])))
            frozen_prefix.check_exact(full, self.per_example_loss(model, cached[head]))
        return cached

    def canaries(self, data, count, seed):
        from fedlora.leakage.canaries import secret_canaries

        return secret_canaries(count, seed)

    def per_example_loss(self, model, batch) -> torch.Tensor:
        """(batch,) losses: one sequence = one example, the mean over its own response tokens."""
        input_ids, mask, labels = batch
        nll, valid = token_nll(model, input_ids, mask, labels)
        return (nll * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)

    def loss(self, model, batch):
        return self.per_example_loss(model, batch).mean()

    # -- evaluation ----------------------------------------------------------------
    @torch.no_grad()
    def _scores(self, model, sequences: list[Rendered], batch_size: int, pad_id: int, max_length: int,
                precision: str) -> tuple[list[float], list[int]]:
        """(sum of log-probabilities of each response, its token count)."""
        sums, counts = [], []
        for start in range(0, len(sequences), batch_size):
            chunk = [fit(s, max_length) for s in sequences[start:start + batch_size]]
            ids, mask = left_pad([s.prompt + s.response for s in chunk], pad_id)
            labels = torch.full_like(ids, IGNORE)
            for i, s in enumerate(chunk):
                labels[i, ids.shape[1] - len(s.response):] = ids[i, ids.shape[1] - len(s.response):]
            with autocast(precision):
                nll, valid = token_nll(model, ids, mask, labels)
            sums += (-(nll * valid).sum(dim=1)).tolist()
            counts += valid.sum(dim=1).tolist()
        return sums, counts

    @torch.no_grad()
    def _answer_scores(self, model, prompts: list[list[int]], candidates: list[list[int]], batch_size: int,
                       pad_id: int, max_length: int, precision: str) -> list[list[float]]:
        """Log-likelihood of every answer after every prompt, the prompt run once.

        The answers share the prompt, so its keys and values are computed once and each
        answer's tokens continue from them (the cache is cut back after each); the
        scores equal those of one full sequence per (prompt, answer) pair. Prompts are
        cut to leave room for the longest answer."""
        device = device_of_model(model)
        longest = max(candidates, key=len)
        rows: list[list[float]] = []
        for start in range(0, len(prompts), batch_size):
            chunk = [fit(Rendered(p, longest), max_length).prompt for p in prompts[start:start + batch_size]]
            ids, mask = left_pad(chunk, pad_id)
            ids, mask = ids.to(device), mask.to(device)
            with autocast(precision):
                out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask), use_cache=True,
                            logits_to_keep=1)
            first = out.logits[:, -1].float().log_softmax(-1)
            cache, lengths, n = out.cache, mask.sum(dim=1, keepdim=True), len(chunk)
            scores = torch.zeros((n, len(candidates)))
            for k, answer in enumerate(candidates):
                tokens = torch.as_tensor(answer, device=device).repeat(n, 1)
                total = first[:, answer[0]]
                if len(answer) > 1:
                    step = tokens[:, :-1]  # the logit after token t scores token t + 1
                    full_mask = torch.cat([mask, torch.ones_like(step)], dim=1)
                    pos = lengths + torch.arange(step.shape[1], device=device)
                    with autocast(precision):
                        cont = model(input_ids=step, attention_mask=full_mask, position_ids=pos,
                                     cache=cache, use_cache=True).logits.float().log_softmax(-1)
                    total = total + cont.gather(-1, tokens[:, 1:, None]).squeeze(-1).sum(dim=1)
                    cache.crop(-step.shape[1])
                scores[:, k] = total.cpu()
            rows += scores.tolist()
        return rows

    @torch.no_grad()
    def generate(self, model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
        """Greedy answers to ``prompts`` (token ids), stopping at the tokenizer's or the
        model's end-of-sequence token."""
        device = device_of_model(model)
        pad_id = int(tokenizer.pad_token_id)
        eos = stop_ids(tokenizer, model)
        ids, mask = left_pad(prompts, pad_id)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad_id, eos_token_id=eos or None)
        return [tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True).strip() for row in out.cpu()]

    def evaluate(self, model, data, batch_size, precision="fp32"):
        ev: EvalSet = data.evalset
        n = len(ev.examples)
        if n == 0:
            return {"loss": float("nan"), "perplexity": float("nan")}
        was_training = model.training
        model.eval()
        try:
            metrics = self._evaluate(model, ev, int(batch_size), precision)
        finally:
            model.train(was_training)
        return metrics

    def _evaluate(self, model, ev: EvalSet, batch_size: int, precision: str) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        if ev.candidates:
            k = len(ev.candidates)
            rows = self._answer_scores(model, [e.prompt for e in ev.examples], ev.candidates, batch_size, ev.pad_id,
                                       ev.max_length, precision)
            gold = [int(y) for y in ev.labels]
            metrics["accuracy"] = sum(max(range(k), key=r.__getitem__) == y for r, y in zip(rows, gold)) / len(rows)
            # The reference answer is the gold candidate: its likelihood is the loss.
            nll = -sum(r[y] for r, y in zip(rows, gold))
            tokens = sum(len(ev.candidates[y]) for y in gold)
        else:
            sums, counts = self._scores(model, ev.examples, batch_size, ev.pad_id, ev.max_length, precision)
            nll, tokens = -sum(sums), sum(counts)
        loss = nll / max(tokens, 1)
        metrics["loss"] = loss
        metrics["perplexity"] = math.exp(min(loss, 50.0))
        return metrics

    def generations(self, model, tokenizer, data, count: int, max_new_tokens: int) -> tuple[float, list[dict]] | None:
        """(exact match of greedy generation over the first ``count`` examples, their
        prompts with the reference and generated answers)."""
        ev: EvalSet = data.evalset
        if count <= 0:
            return None
        picked = list(range(min(count, len(ev.examples))))
        if not picked:
            return float("nan"), []
        was_training = model.training
        model.eval()
        try:
            texts = self.generate(model, tokenizer, [ev.examples[i].prompt for i in picked], max_new_tokens)
        finally:
            model.train(was_training)
        hits = [normalise_answer(t) == normalise_answer(ev.references[i]) for t, i in zip(texts, picked)]
        samples = [{"prompt": ev.prompts[i], "reference": ev.references[i], "generated": t}
                   for t, i in zip(texts, picked)]
        return sum(hits) / len(hits), samples

    # -- the trained model ------------------------------------------------------------
    def export(self, model, out_dir, model_cfg, label_names):
        base = resolve_model_path(str(model_cfg.name_or_path))
        model.peft_config[model.active_adapter].base_model_name_or_path = base
        model.peft_config[model.active_adapter].revision = exported_revision(model_cfg)
        model.save_pretrained(str(out_dir))
        (Path(out_dir) / ANSWERS_FILE).write_text(json.dumps(list(label_names)))

    def load_trained(self, run_dir, cfg):
        adapter = Path(run_dir) / "adapter"
        answers_file = adapter / ANSWERS_FILE
        answers = json.loads(answers_file.read_text()) if answers_file.is_file() else []
        tokenizer, base = self.load(cfg.model, len(answers), int(cfg.seed))
        model = PeftModel.from_pretrained(base, str(adapter))
        model.eval()
        return tokenizer, model, answers
