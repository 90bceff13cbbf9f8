"""Training: the loop (``sodlib.training.engine.train``: AMP, EMA, resumable checkpoints, distributed,
TensorBoard), optimiser groups and schedules, the run cache (a folder per config hash with metrics and
provenance) and the post-training measurements that show whether each mechanism acted.

May import: everything below it (foundation, data, models, evaluation, losses, build, official, inference)
and this package; never studies or the command line.
"""
