"""The gRPC edge: one concern a module.

- :mod:`~joblet.rpc.server`: the server actor (accept, connections, graceful drain).
- :mod:`~joblet.rpc.listeners`: the TCP and Unix sockets it accepts on.
- :mod:`~joblet.rpc.tls`: TLS policy (both sides' contexts, the handshake) and who a client
  certificate names.
- :mod:`~joblet.rpc.auth`: the roles and what each may call.
- :mod:`~joblet.rpc.transport`: purerpc's framing with our limits (sans-IO where it can be).
- :mod:`~joblet.rpc.dispatch`: one call, from its headers to its status.
- :mod:`~joblet.rpc.errors`: our errors as gRPC statuses, the one table.
- :mod:`~joblet.rpc.service` and :mod:`~joblet.rpc.convert`: ``joblet.JobService`` and its
  protobuf conversion.
- :mod:`~joblet.rpc.persist_service` and :mod:`~joblet.rpc.persist_codec`:
  ``joblet.persist.PersistService`` and its wire encoding.
"""
