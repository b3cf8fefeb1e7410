"""The paper's supplementary analyses and the views of a model, one job per module (import from the module itself):

- ``lognormal``: Fig. S1, normal fits of log soft multilabels (mean, std, skewness, kurtosis, KS);
- ``sweep``: Fig. S2, one MAR run per value of a ``mar`` option from one pretrained checkpoint;
- ``ranklist``: protocol status of each ranked gallery image, query choice, grid geometry;
- ``search``: gallery features from a feature file or a cached folder, exact top-k;
- ``curves``: per-step and evaluation series of a run's log.jsonl;
- ``plotting``: drawing only (matplotlib on the Agg canvas, pixel grids).

Nothing is imported here: a command loads only the modules it uses.
"""
