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
(``TRL_POLAR_REFERENCE_COLUMN`` names another).

Failures are per row (`trl_polar.failures`): a row without a reference, with an unreadable conversation, or whose
scoring fails gets None (ms-swift's own "no reward", it becomes NaN) under ``TRL_POLAR_ON_ERROR=none``, counted in a
warning, while the other rows are scored; under ``raise`` (the default) the call stops naming the row, the column
and the variable that changes the policy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from trl_polar.failures import ItemFailure
from trl_polar.integrations import get_reward, policy, settings, to_python

logger = logging.getLogger(__name__)

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


def _missing(reference: Any) -> bool:
    return reference is None or (isinstance(reference, str) and not reference.strip()) or reference == []


class PolarORM:
    """ms-swift outcome reward: r(prompt from ``messages``, reference from ``solution``, completion)."""

    def __init__(self, args: Any = None, **kwargs: Any) -> None:
        self.args = args

    def _rows(self, messages: Sequence[Any], references: Sequence[Any], column: str) -> tuple[list, dict[int, str]]:
        """Each row's prompt, and {row: why it cannot be scored}."""
        prompts, failures = [], {}
        for i, (conversation, reference) in enumerate(zip(messages, references, strict=True)):
            try:
                prompts.append(_prompt(conversation, i))
            except ValueError as err:
                prompts.append(None)
                failures[i] = str(err)
                continue
            if _missing(reference):
                failures[i] = f"row {i} has no reference in column {column!r}"
        return prompts, failures

    def __call__(self, completions: Sequence[str], messages: Sequence[Any] | None = None, **kwargs: Any) -> list:
        n = len(completions)
        if messages is None or len(messages) != n:
            raise ValueError(
                f"ms-swift passed {n} completions and {'no' if messages is None else len(messages)} messages; "
                "PolarORM reads each prompt from `messages`."
            )
        config = settings()
        column = config.reference_column
        if column not in kwargs:
            columns = sorted(k for k in kwargs if k != "trainer_state")
            raise ValueError(
                f"PolarORM needs the reference answer in the dataset column {column!r}, but the batch has only "
                f"{columns}. Add it, or set {REFERENCE_COLUMN_ENV} to the column that holds it."
            )
        references = to_python(kwargs[column])
        prompts, failures = self._rows(messages, references, column)
        ok = [i for i in range(n) if i not in failures]
        outcome = get_reward(config, on_error="none").evaluate(
            [prompts[i] for i in ok], [completions[i] for i in ok], [references[i] for i in ok]
        )
        rewards: list[float | None] = [None] * n
        for k, i in enumerate(ok):
            if k in outcome.failures:
                failures[i] = outcome.failures[k]
            else:
                rewards[i] = outcome.rewards[k]
        self._settle(failures, n, column, policy(config).on_error)
        return rewards

    @staticmethod
    def _settle(failures: dict[int, str], n: int, column: str, on_error: str) -> None:
        if not failures:
            return
        first = min(failures)
        summary = f"{len(failures)} of {n} rows got no POLAR reward; first, row {first}: {failures[first]}"
        if on_error == "raise":
            raise ItemFailure(
                f"{summary}. Fill the reference column {column!r} (or set {REFERENCE_COLUMN_ENV} to the column that "
                "holds it), or set TRL_POLAR_ON_ERROR=none to give such rows None (NaN in ms-swift) and score the "
                "rest.",
                failures,
                f"{column}[{first}]",
            )
        logger.warning("%s (TRL_POLAR_ON_ERROR=none: they get None, NaN in ms-swift).", summary)


def register() -> None:
    """``orms["polar"] = PolarORM`` in ms-swift's registry (what importing `PLUGIN` does)."""
    from swift.rewards import orms

    orms[NAME] = PolarORM
