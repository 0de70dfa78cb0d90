"""adapters_lab: config-driven adapter fine-tuning of LLMs (LLM-Adapters, Hu et al. 2023)."""

__version__ = "0.1.0"
