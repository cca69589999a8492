"""kvshare: find, build, fine-tune, evaluate and compare KV-cache-reduced variants of Llama-family LMs.

Importing the package registers the ``kvshare_llama`` model type with
transformers' Auto classes, so converted checkpoints load with
``AutoModelForCausalLM.from_pretrained(path)``.
"""

from kvshare import modeling as _modeling  # noqa: F401  (registers the Auto classes)

__version__ = "0.1.0"
