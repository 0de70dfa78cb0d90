"""The trainer: ``settings`` (checked options, the accelerator), ``loop`` (the recipe),
``step`` (one optimiser step), ``checkpoints`` (state that resumes exactly), ``metrics``
(throughput, MFU, the log line), ``validation`` and ``speed`` (the optional fast paths).
``training.loop.train`` is the entry point."""
