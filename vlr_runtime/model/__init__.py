"""Qwen2.5-VL reward model on megatron-core."""
