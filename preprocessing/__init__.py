"""Pure data steps (layer: preprocessing, the bottom; no Prefect): image decoding and checks, face detection, LSUN
LMDB reading, de-duplication, the shard format, object storage, and where work runs."""
