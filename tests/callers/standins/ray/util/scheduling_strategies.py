"""``ray.util.scheduling_strategies``: in-process actors ignore where they would be scheduled."""


class NodeAffinitySchedulingStrategy:
    def __init__(self, *_, **__):
        pass


class PlacementGroupSchedulingStrategy(NodeAffinitySchedulingStrategy):
    pass
