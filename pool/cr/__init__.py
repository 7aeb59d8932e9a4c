"""Checkpoint/restore primitives: the one door to CRIU (criu), what its errors mean to a user (hints),
acting in another process's namespaces (netns), a copy's cgroup (cgroups), and booting an app in the
namespaces CRIU restores many times (sandbox)."""
