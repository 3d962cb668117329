"""A stand-in for the names OpenRLHF imports from vLLM: vLLM generates on GPUs, which the contract tests do not
have. Generation itself is stood in by the test's engine object; nothing here generates or scores."""


class SamplingParams:
    """vLLM's sampling parameters, as plain attributes (OpenRLHF reads ``max_tokens`` and ``logprobs``)."""

    def __init__(self, **kwargs):
        self.max_tokens = None
        self.logprobs = None
        self.__dict__.update(kwargs)
