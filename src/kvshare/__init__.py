"""kvshare: find, build, fine-tune, evaluate and compare KV-cache-reduced variants of Llama-family LMs.

The package imports nothing heavy, so every stage starts fast; ``import kvshare.modeling``
registers the ``kvshare_llama`` model type with transformers' Auto classes, after which
converted checkpoints load with ``AutoModelForCausalLM.from_pretrained(path)``.
"""

__version__ = "0.1.0"
