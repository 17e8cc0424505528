"""relora_dist: ReLoRA pretraining on DeepSpeed ZeRO-2/3."""

__version__ = "0.1.0"
