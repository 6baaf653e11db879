"""Replication: slot streaming, pgoutput decoding, apply, and the 3PC
transaction protocol. Built in issue 3 (writes on every node); the proxy of
issue 2 only relays to its local node."""
