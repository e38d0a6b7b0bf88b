"""The volunteer node daemon: engine, admission, stream handler, adverts, drain, CLI."""
