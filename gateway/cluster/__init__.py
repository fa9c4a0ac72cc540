"""Switchboard on several machines: membership and shard ownership in NATS
JetStream KV, cross-node routing over core NATS (docs/cluster.md)."""
