"""Engine replicas behind one front end (data parallelism).

    router.py          which replica gets a request: least outstanding, prefix affinity
    data_parallel.py   DataParallelEngine: N replica clients + the router, one engine client
    ray_support.py     the clear "install Ray" error (imports no Ray)
    ray_actor.py       the engine core inside a Ray actor (imports no Ray itself)
    ray_replica.py     the API side of one Ray replica, and starting/joining a Ray cluster

Only ray_replica.py imports Ray, and only when `--distributed-executor ray` is asked for:
kvport imports and serves without Ray installed. Nothing here imports torch.
"""
