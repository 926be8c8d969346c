"""The warm pool: entries, the host tier, leases, prefetch and attach."""
