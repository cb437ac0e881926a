"""The service core: new items to rows, the index kept in step with the store, requests answered.

No HTTP, no Redis, no metrics: the store arrives as the `Store` protocol, the index as `VectorIndex`,
so the offline harness and the benchmarks run the same code as the service.
"""
