"""Credits: the SQLite ledger with escrow and vesting (`ledger`) and its CLI (`cli`)."""
