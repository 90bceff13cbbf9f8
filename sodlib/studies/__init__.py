"""Studies: what the notebooks, ``sodlib reproduce``, ``sodlib compare`` and ``sodlib bench`` run on the
library.

By purpose:

* the ablation tables — :mod:`.tables` (what each row trains), :mod:`.runner` (trains the runs the cache
  lacks), :mod:`.stats` (paired statistics and verdicts), :mod:`.mechanism_checks` (is each method acting),
  :mod:`.budget_trend` (the main effect at longer budgets), :mod:`.figure5` (paper A's Figure 5),
  :mod:`.mrqm_analysis` (MRQM's measurements);
* notebook helpers — :mod:`.spr_tables` (SPR on one image), :mod:`.target_dynamics` (ST's fixed point);
* plots — :mod:`.viz`, :mod:`.ablation_viz`, :mod:`.mrqm_viz`; :mod:`.explorer`
  (the interactive attention explorer);
* reproduction — :mod:`.reproduce` (the driver), :mod:`.experiments` (its opt-in steps), :mod:`.notebooks`
  (papermill), :mod:`.compare` (does a regenerated ``results/`` match git);
* guards and measurements — :mod:`.drift` (stale runs), :mod:`.numerics` (where two machines part),
  :mod:`.bench` (speed ratios); :mod:`.lab` (JupyterLab).

May import: any layer below it; nothing in the library imports it (only :mod:`sodlib.cli`).
"""
