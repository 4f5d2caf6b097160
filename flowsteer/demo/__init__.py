"""``make demo``: each hook shows its main job on real traffic in namespaces the demo creates."""
