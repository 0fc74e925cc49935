"""The ZooKeeper wire protocol, sans I/O: jute, records, the opcode table, and one
connection object per side (:mod:`.connection` for the server,
:mod:`.client_connection` for the client). Import from the modules themselves."""

__all__: list[str] = []
