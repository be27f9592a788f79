"""Training: the translation trainer and the HER2 classifier trainer.

Modules, by job: :mod:`.loop` (the :class:`~derestainer.training.loop.Trainer` and ``train``),
:mod:`.setup` (models, optimizers, data), :mod:`.step` (one D/G update with AMP and gradient
accumulation), :mod:`.sampling` (the seeded, resumable data order), :mod:`.validation`,
:mod:`.resume` (checkpoint glue), :mod:`.state` (training state and run checkpoints),
:mod:`.distributed` (multi-process helpers), :mod:`.logging` (run logs) and :mod:`.classifier`.

Nothing is re-exported here, so that importing one of them does not import the others.
"""
