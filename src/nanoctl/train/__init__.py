"""Training stages on one framework.

stage.py      the framework: run_stage (relaunch, lock, resume/force, the loop, checkpoints, result)
pretrain.py   base pretraining (the depth dial)      mid.py, sft.py, rl.py   post-training stages
parent.py     the parent checkpoint post-training starts from, and the options it shares
schedules.py  LR / Muon schedules          progress.py  the step line and console reporter
interrupts.py Ctrl+C / SIGTERM             runtime.py   seeds, threads, RNG state, GC, compile, fp16 scaling
resume.py     per-rank checkpoint plumbing and the loop's running record
"""
