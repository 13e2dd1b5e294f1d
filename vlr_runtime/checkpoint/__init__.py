"""Hugging Face import/export and sharded save/resume."""
