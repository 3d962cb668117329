"""``ray.util.placement_group``: imported by the callers' resource-pool modules, never called by the reward paths."""


class PlacementGroup:
    pass


def placement_group(*_, **__):
    raise RuntimeError("the Ray stand-in places nothing")
