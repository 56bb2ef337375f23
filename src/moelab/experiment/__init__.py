"""Run assembly: a ``RunConfig`` becomes prepared data, a tokenizer, a model and a trained run.

Every command and study that trains goes through here (``moelab train``, the torchrun path,
``compare``, the budget ladder, ``study``), so data preparation, tokenizer choice, the model an
objective needs and the run's bookkeeping are written once:

- :mod:`moelab.experiment.run`: :func:`train_run` → :class:`TrainedRun` (model, validation split,
  final evaluation, metrics, all in memory);
- :mod:`moelab.experiment.runs`: many (model, seed) runs on one corpus, side by side (``--jobs``);
- :mod:`moelab.experiment.compare`: ``moelab compare`` over seeds with paired statistics;
- :mod:`moelab.experiment.ladder`: budgets with complete schedules (independent runs or WSD branches);
- :mod:`moelab.experiment.evaluate`: ``moelab eval``;
- :mod:`moelab.experiment.distributed`: ``moelab train`` under torchrun.
"""
