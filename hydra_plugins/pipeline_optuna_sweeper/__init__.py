"""`hydra/sweeper=optuna`: Optuna's ask/tell on a persistent study, with pruning, as a Hydra sweeper.

`config.py` registers the option, `search_space.py` reads `hydra.sweeper.params` (Hydra's
override grammar), `optuna_sweeper.py` runs the trials. The job's side of pruning is
`pipeline.trials`.
"""
