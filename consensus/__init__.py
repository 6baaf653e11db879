"""Consensus: generations, votes, heartbeats and the referee. Built after the
commit protocol (issue 3 designs for it: every transaction carries the
generation it belongs to)."""
