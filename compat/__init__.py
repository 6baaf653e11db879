"""PostgreSQL 15's own regression SQL run through a cluster node and against
a standalone PostgreSQL 15, outputs compared, and the nodes' dumps compared
after every file (issue 11, "How to check it"). Entry point:
``python -m compat.run``; how it works and what it normalises:
docs/compat.md.
"""
