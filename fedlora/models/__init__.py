"""Models: resolving and loading Hugging Face checkpoints and tokenizers (:mod:`.hub`),
and the LoRA adapter that trains and travels (:mod:`.lora`)."""
