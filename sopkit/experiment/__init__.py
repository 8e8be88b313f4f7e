"""Comparisons: what is trained, how it runs, where each trial is kept, and what it adds up to.

- :mod:`~sopkit.experiment.plan`: the plan of a comparison (``ComparePlan``, its jobs, the
  learning-rate grids) built from the command line and a preset.
- :mod:`~sopkit.experiment.presets`: named plans shipped as TOML (``presets/*.toml``).
- :mod:`~sopkit.experiment.runner`: trains a plan's unfinished trials, in this process or a pool.
- :mod:`~sopkit.experiment.workers`: a ``--jobs`` pool's workers end with the main process; a job
  that fails or kills its worker is recorded as failed and the grid goes on.
- :mod:`~sopkit.experiment.records`: a trial's identity (``TrialSpec`` and its stable key) and what is
  kept of it (``TrialRecord``).
- :mod:`~sopkit.experiment.store`: the SQLite database of trials, its schema version and migrations.
- :mod:`~sopkit.experiment.results`: from trials to per-strategy results (paper Section 5.1).
- :mod:`~sopkit.experiment.provenance`: versions, git revision and machine of every result.

Importing this package imports no torch: the runner loads it when it trains.
"""
