"""An example third-party kvport plugin: the `cpu_sdpa` attention backend."""
