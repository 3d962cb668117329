"""``vllm.inputs``."""


class TokensPrompt(dict):
    pass
