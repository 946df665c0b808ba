"""bitsmith: quantize open-weight LLMs, run them, and measure what they kept."""
__version__ = "0.1.0"
