"""POLAR rewards for ms-swift's GRPO, as an ORM plugin (`PolarORM`, registered as ``polar``).

ms-swift (4.x) imports a plugin file with ``--external_plugins FILE``: it puts the file's folder first on
``sys.path`` and imports the file by its name, so the plugin file, `PLUGIN`, sits alone in this folder under a name
that shadows nothing. Importing it registers ``orms["polar"] = PolarORM``; ``--reward_funcs polar`` then scores
with it::

    swift rlhf --rlhf_type grpo ... \\
        --external_plugins $(python -c "import trl_polar.integrations.ms_swift as m; print(m.PLUGIN)") \\
        --reward_funcs polar

with ``TRL_POLAR_MODEL=/path/to/polar-rm`` (or ``TRL_POLAR_URL``) and the other ``TRL_POLAR_*`` settings of
`trl_polar.integrations` in the environment. ms-swift builds the class with ``args=`` (its GRPO arguments) and
calls it with the batch: ``completions`` (the last message's content of each sample) and, as keyword arguments,
every dataset column plus ``messages`` (the conversation, the completion last) and ``trainer_state``. The prompt is
``messages`` without the final assistant message; the reference is the ``solution`` column
(``TRL_POLAR_REFERENCE_COLUMN`` names another). A sample without a reward is None, which ms-swift turns into NaN,
its own "no reward" (`trl_polar.failures`, ``TRL_POLAR_ON_ERROR``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from trl_polar.integrations import get_reward, load_config, policy, to_python

NAME = "polar"
PLUGIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugin", "trl_polar_orm.py")
REFERENCE_COLUMN_ENV = "TRL_POLAR_REFERENCE_COLUMN"


def _prompt(messages: Any, index: int) -> Any:
    messages = to_python(messages)
    if isinstance(messages, str):
        return messages
    if not isinstance(messages, Sequence) or not messages or not all(isinstance(m, Mapping) for m in messages):
        raise ValueError(
            f"messages[{index}] must be the sample's conversation (a list of messages), got {messages!r:.80}."
        )
    # ms-swift appends the completion as the last (assistant) message: the prompt is what precedes it.
    return list(messages[:-1]) if messages[-1].get("role") == "assistant" else list(messages)


class PolarORM:
    """ms-swift outcome reward: r(prompt from ``messages``, reference from ``solution``, completion)."""

    def __init__(self, args: Any = None, **kwargs: Any) -> None:
        self.args = args
        self.reference_column = os.environ.get(REFERENCE_COLUMN_ENV, "solution")

    def __call__(self, completions: Sequence[str], messages: Sequence[Any] | None = None, **kwargs: Any) -> list:
        n = len(completions)
        if messages is None or len(messages) != n:
            raise ValueError(
                f"ms-swift passed {n} completions and {'no' if messages is None else len(messages)} messages; "
                "PolarORM reads each prompt from `messages`."
            )
        if self.reference_column not in kwargs:
            columns = sorted(k for k in kwargs if k != "trainer_state")
            raise ValueError(
                f"PolarORM needs the reference answer in the dataset column {self.reference_column!r}, but the "
                f"batch has only {columns}. Add it, or set {REFERENCE_COLUMN_ENV} to the column that holds it."
            )
        references = to_python(kwargs[self.reference_column])
        prompts = [_prompt(m, i) for i, m in enumerate(messages)]
        config = load_config()
        reward = get_reward(config=config, on_error=policy(config).on_error)
        return reward.compute(prompts, list(completions), references)[0]


def register() -> None:
    """``orms["polar"] = PolarORM`` in ms-swift's registry (what importing `PLUGIN` does)."""
    from swift.rewards import orms

    orms[NAME] = PolarORM
