"""Studies: what the notebooks and ``sodlib reproduce`` / ``sodlib bench`` run on top of the library —
ablation tables and their paired statistics, the reproduction driver, notebook helpers and plots, MRQM's
analyses, benchmarks, the drift check, the interactive explorer and the JupyterLab launcher.

May import: any layer below it; nothing in the library imports it (only :mod:`sodlib.cli`).
"""
