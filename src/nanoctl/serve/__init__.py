"""`nanoctl serve`: an OpenAI-compatible server over continuously batched decoding (scheduler.py)."""
