"""Training the adapter from the latent cache.

    config.py       TrainingConfig: optimizer, schedule, clipping, epochs, batch, precision, caption dropout
    cache.py        the latent cache: load, validate, replayable epoch order
    objective.py    one step's noise-prediction objective (shared with the demo's pretraining)
    precision.py    mixed precision, autocast, peak memory
    checkpoint.py   per-epoch checkpoints: run fingerprint, one folder per run, atomic save, verified resume
    loop.py         setup, resume, epoch, finish; the caller owns the Accelerator
"""
