"""lora: inspect, convert, merge and validate LoRA adapters, one tensor at a time."""

__version__ = "0.1.0"
