"""One node's runtime: its copies, warm pools, the policy for failures (faults), and the node-level
operations a coordinator asks of it."""
