"""Evaluation: bits per byte (bpb.py), CORE (core.py), chat tasks + ChatCORE (chat.py), `eval base` (base.py),
result records under <home>/reports/<tag>/ (results.py). Nothing heavy is imported here."""
