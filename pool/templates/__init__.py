"""Templates: the spec (template.toml), the store (atomic publish, manifests, integrity, images sealed
at rest), the build (boot, warm up, checkpoint, record a working set, publish), image compatibility
with a node, and shipping between nodes."""
