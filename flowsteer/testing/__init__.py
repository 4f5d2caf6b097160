"""Real traffic for trying flowsteer: used by the demo, the benchmarks and the tests, and documented for
users who want to check their own setup the same way.

- :mod:`flowsteer.testing.sockets`: listeners and UDP sockets, and which of several sockets one
  connection or datagram reached (the lookup tests);
- :mod:`flowsteer.testing.flows`: open chosen flows (client address and port) and see which member
  socket of a group received each one;
- :mod:`flowsteer.testing.load`: client threads that keep a server busy and count every failed request
  (:class:`~flowsteer.testing.load.Load` for a line protocol, :class:`~flowsteer.testing.load.HttpLoad`
  for HTTP/1.1 with or without keep-alive).
"""
