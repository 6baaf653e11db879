"""Jepsen-style fault testing for mmproxy: workloads that record histories
(``harness.workloads``), the history format (``harness.history``) and pure
checkers (``harness.checkers``)."""
