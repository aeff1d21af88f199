"""hf-metagpt: merge fine-tuned LLMs with MetaGPT, streamed layer by layer, published to the Hub."""

__version__ = "0.1.0"
