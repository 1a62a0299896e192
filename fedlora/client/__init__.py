"""The client side: the Flower ClientApp (:mod:`.app`), the NumPyClient that trains
one data holder's shard (:mod:`.numpy_client`), its local (DP-)training loops
(:mod:`.training`) and its own spend record (:mod:`.state`)."""
