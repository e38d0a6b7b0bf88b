"""What every daemon and command shares: one-line errors (`errors`), logging set-up (`logs`),
TOML settings (`settings`), the ready file (`ready_file`), heap freezing (`heap`) and the
daemon start-up path (`daemon_start`). It imports no other package of the project."""
