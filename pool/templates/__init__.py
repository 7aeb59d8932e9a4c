"""Templates: the spec (template.toml), the store (atomic publish, manifests, integrity), the build
(boot, warm up, checkpoint, publish), image compatibility with a node, and shipping between nodes."""
