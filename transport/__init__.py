"""The libp2p transport: one host wrapper (`host`), the py-libp2p workarounds it applies
(`patches`), DHT keys and record validation (`dht_keys`), discovery of nodes by model
(`discovery`), and the requester's side of a call to a node (`node_client`).

Everything here runs under trio, like py-libp2p itself.
"""
