"""The entry's side of the mesh: the live view of nodes (`view`), which node serves a request
(`router`), and the relay with failover and receipts (`relay`)."""
