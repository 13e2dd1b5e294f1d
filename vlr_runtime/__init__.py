"""vlr_runtime: training and scoring runtime for Qwen2.5-VL reward models on megatron-core."""

__version__ = "0.1.0"
