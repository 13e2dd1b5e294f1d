"""Process groups, device/backend selection and the CPU compatibility layer for megatron-core."""
