"""Training engines (Unsloth on CUDA, transformers + PEFT elsewhere), data, TRL training, export."""
