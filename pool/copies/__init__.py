"""Copies of a template: restoring one with its own identity, forking a running one, the record of a
restored copy, its journal on disk, and the proxy that publishes its port."""
