"""Conversions: Hugging Face import/export, sparse upcycling, MoEfication, expert merging and pruning."""
