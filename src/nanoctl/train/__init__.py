"""Training stages: loop.py (shared pieces), base.py (pretrain); mid/sft/rl reuse loop.py."""
