"""Solvers that know nothing of MRI: conjugate gradient, primal-dual (PDHG) and the Adam fitting loop.

Each takes callables or operators and reports one :class:`~semrecon_core.solvers.status.SolverStatus` per
iteration to one :data:`~semrecon_core.solvers.status.Callback` whose ``False`` stops the loop.
"""
