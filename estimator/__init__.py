"""Pure-Python memory and speed model of LoRA/QLoRA fine-tuning, and the planner. Never imports torch."""
