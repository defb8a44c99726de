"""rigplan: what LLM fine-tuning a GPU can do (check), measured (calibrate), and done (run).

The package root imports nothing heavy: `rigplan check` must stay torch-free and start in well under a second.
"""

__version__ = "0.1.0"
