"""The runner: plans a table or a matrix, deploys a defense, runs and caches cells, writes results.

The one layer that knows both the plugins and the core. Imports point one way:
``cli -> (gates, report) -> runner -> attacks / defenses -> core``; see docs/architecture.md.

- ``settings``: the plugins a config names, checked against the registries; their settings.
- ``plan``: rows of the S2L table and cells of the matrix, without running anything.
- ``stages``: testbed -> pre-trained bundle -> memorization report, cached.
- ``cells``: one defense deployed through the provider; each (domain, row) measured and cached.
- ``summaries``: cells -> per-domain and pooled statistics, controls, trajectories.
- ``table``: the S2L table (``s2l-guard attack``) and its results.json.
- ``matrix``: every defense's table flattened into gate cells (``s2l-guard matrix``).
- ``ablation``: the paper's ablations (``s2l-guard ablate``).
- ``defense_summary``: what a defense did, in words.
"""
