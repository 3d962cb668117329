"""``ray.actor.ActorHandle``, for type annotations."""


class ActorHandle:
    pass
