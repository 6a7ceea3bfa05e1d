"""Training: the ``Trainer`` (trainer.py; stateful: state_dict / load_state_dict) and ``train``, its
``TrainConfig`` (config.py), checkpoints (plain and distributed, written through ``fileio``), DDP / FSDP2,
the NaN guard and preflight checks."""
