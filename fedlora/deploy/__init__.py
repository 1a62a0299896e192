"""Deployment on Flower's own engine: a SuperLink, SuperNodes and ``flwr run``.

``credentials`` makes the TLS certificates and SuperNode key pairs, ``launch`` starts
and registers the processes with the flags Flower 1.42 expects.
"""
