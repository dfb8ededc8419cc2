"""lawtune: LoRA fine-tuning and evaluation of reasoning LLMs on JEC-QA."""

__version__ = "0.1.0"
