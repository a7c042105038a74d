"""Operator use cases: start-up checks, schema gate, backups. The CLI parses and prints."""
