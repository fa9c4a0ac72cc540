"""The cluster's JetStream KV buckets (leases, the shard map): opened, or made.

They are made with 3 replicas on a clustered NATS, so they outlive any one
nats-server, and with 1 on a single server (which refuses more). What decides is
the server's answer, not how many URLs this node was given: a node configured
with one URL (a DNS name, a balancer) in front of a 3-server cluster would
otherwise make the whole cluster's membership depend on one server (the route
partition test in tests/test_cluster.py found that).
"""
REPLICAS = 3
NOT_CLUSTERED = 10074        # JetStream: "replicas > 1 not supported in non-clustered mode"


async def open_bucket(js, bucket: str, **config):
    """The bucket if it exists, else a new one with `config` (KeyValueConfig fields)."""
    import nats.js.errors as e
    from nats.js.api import KeyValueConfig
    try:
        return await js.key_value(bucket)
    except e.BucketNotFoundError:
        pass
    try:
        return await js.create_key_value(KeyValueConfig(bucket=bucket, replicas=REPLICAS, **config))
    except e.APIError as exc:
        if exc.err_code != NOT_CLUSTERED:
            raise
    return await js.create_key_value(KeyValueConfig(bucket=bucket, replicas=1, **config))
