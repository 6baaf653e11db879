"""Helpers shared by every layer (config < common < replication, consensus
< proxy): SQL quoting, structured logging, failpoints. Nothing here imports
another mmproxy package."""
