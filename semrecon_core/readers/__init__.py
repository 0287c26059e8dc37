"""A blinded reader study in the browser: the paper's Figure 4 (``semrecon readers``).

Two or more readers score reconstructions without knowing how each was made, on a 5-point Likert scale for four
criteria; the scores of two methods of the same backbone are compared with the Wilcoxon signed-rank test.

- :mod:`~semrecon_core.readers.kit`: ``semrecon readers export``, a blinded kit from a study folder or from image
  files per method: PNG (and DICOM) under random ids, one display window per case, the key kept apart.
- :mod:`~semrecon_core.readers.store`: the scores in SQLite, one committed transaction per screen.
- :mod:`~semrecon_core.readers.app`: ``semrecon readers serve``, the scoring page (Flask), one secret URL per reader.
- :mod:`~semrecon_core.readers.analysis`: ``semrecon readers analyze``, mean ± sd, Wilcoxon, weighted κ, the figure.
"""
