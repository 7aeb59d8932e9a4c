"""Copies of a template: restoring one with its own identity (eagerly, or lazily with its working set
prefetched), forking copies from a restored zygote (fork mode), forking and snapshotting a running
one, the record of a restored copy, its journal on disk, and the proxy that publishes its port."""
