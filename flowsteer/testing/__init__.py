"""Real traffic for trying flowsteer: used by the demo, the benchmarks and the tests, and documented for
users who want to check their own setup the same way.

- :mod:`flowsteer.testing.flows`: open chosen flows (client address and port) and see which member
  socket of a group received each one;
- :mod:`flowsteer.testing.load`: client threads that keep a server busy and count every failed request
  (:class:`~flowsteer.testing.load.Load` for a line protocol, :class:`~flowsteer.testing.load.HttpLoad`
  for HTTP/1.1 with or without keep-alive).
"""
